"""Session keys on Kubernetes: one Secret per session; each pod mounts only its role's secrets."""

import base64

import kubernetes_validate
import pytest

from detstream.operator import keys
from detstream.operator.resources import cluster_plan, labels
from detstream.services.dataplane.security import Keys, KeysMissing
from detstream.services.model.session import load_session

from helpers import manifest

SECURE = {"dataPlane": "curve", "controlPlane": "mtls"}


@pytest.fixture(scope="module")
def made():
    session = load_session(manifest("s1", security=SECURE, lanes=2))
    plan = cluster_plan(session)
    return session, plan, keys.key_secret(session, plan, labels(session))


def mount(secret, files, folder):
    """What the kubelet does with the volume's items: one file per item."""
    for path in files:
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(secret["data"][keys.secret_key(path)]))
    return Keys(folder)


def test_secret_is_valid_and_holds_every_stage(made):
    session, plan, secret = made
    kubernetes_validate.validate(secret, kubernetes_validate.latest_version(), strict=True)
    assert keys.covers(secret, session, plan)
    assert {f"curve_private_{s.name}.key_secret" for s in plan.stages} <= set(secret["data"])


def test_a_pod_mounts_only_its_roles_secrets(made, tmp_path):
    session, plan, secret = made
    files = keys.role_files(session, plan, "worker")
    assert "tls/ca.key" not in files and not any("launcher" in f for f in files)
    assert not any(f.startswith("curve/private/distributor") or f.startswith("tls/writer") for f in files)
    worker = mount(secret, files, tmp_path)
    worker.curve_secret("worker-0")                   # its own keys load
    worker.server_credentials("worker-0")
    assert worker.curve_public("distributor-1")       # every public key is there
    with pytest.raises(KeysMissing):
        worker.curve_secret("distributor-0")          # nobody else's secret


def test_a_new_lane_needs_new_keys(made):
    session, _, secret = made
    grown = load_session(manifest("s1", security=SECURE, lanes=3))
    assert not keys.covers(secret, grown, cluster_plan(grown))


def test_the_operator_gets_the_launcher_certificate(made):
    ca, cert, key = keys.launcher_files(made[2])
    assert b"BEGIN CERTIFICATE" in ca and b"BEGIN CERTIFICATE" in cert and b"PRIVATE KEY" in key


def test_pods_mount_their_roles_keys_and_probe_over_http_under_mtls(made):
    from detstream.operator.resources import children

    session = made[0]
    for obj in children(session, "img"):
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        role = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = obj["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "keys")
        assert [i["path"] for i in volume["secret"]["items"]] == keys.role_files(session, cluster_plan(session), role)
        (c,) = pod["containers"]
        assert {"name": "DETSTREAM_KEYS", "value": keys.KEYS_DIR} in c["env"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}  # plain HTTP, not mTLS


def test_plain_sessions_have_no_keys():
    from detstream.operator.resources import children

    for obj in children(load_session(manifest("plain")), "img"):
        if "template" in obj.get("spec", {}):
            assert all(v["name"] != "keys" for v in obj["spec"]["template"]["spec"]["volumes"])
