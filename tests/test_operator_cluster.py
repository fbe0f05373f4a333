"""The operator against a real kube-apiserver (v1.20.2, tests/cluster/), driven through kubectl as a
user drives it. There is no scheduler or kubelet here, so stage pods stay Pending: these tests
cover what the operator makes of sessions; tests/test_e2e_cluster.py runs the pods."""

import dataclasses
import json
import os
import sys
import time

import pytest
import yaml

from detstream.operator import resources
from detstream.services.model.schema import SpecError
from detstream.services.model.session import load_session

from helpers import DETSTREAM, ROOT, Background, manifest
from helpers import wait_for as wait_until

NS = "optest"
CHILD_KINDS = "configmaps,services,statefulsets,deployments"


def start_operator(cp, log_path, *extra) -> Background:
    """`detstream operator` as a process, with its own kubeconfig."""
    return Background(DETSTREAM + ["operator", "-n", NS, "--liveness-port", "0", "--metrics-port", "0", *extra],
                      log_path, env={**os.environ, "KUBECONFIG": str(cp.kubeconfig)})


@pytest.fixture(scope="module")
def cluster(kubectl, tmp_path_factory):
    kubectl("apply", "-f", str(ROOT / "charts" / "detstream" / "crds"))
    # The API server publishes a new CRD's OpenAPI (for explain and validation) a few seconds after.
    wait_until(lambda: kubectl.run("explain", "streamingsession.spec", check=False).returncode == 0, what="CRD")
    kubectl("create", "namespace", NS)
    operator = start_operator(kubectl.cp, tmp_path_factory.mktemp("operator") / "operator.log", "--standalone")
    yield kubectl, operator
    operator.stop()
    kubectl.run("delete", "namespace", NS, "--wait=false", check=False)


def apply(kubectl, doc):
    return kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(doc))


def get(kubectl, what, name=None):
    out = kubectl.run("get", "-n", NS, what, *([name] if name else []), "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def children(kubectl, session):
    items = get(kubectl, CHILD_KINDS + ",pods")["items"]
    return [i for i in items if i["metadata"].get("labels", {}).get("detstream.io/session") == session]


def converged(kubectl, session, workers=2):
    kinds = {(i["kind"], i["metadata"]["name"]) for i in children(kubectl, session)}
    wanted = {("ConfigMap", f"{session}-plan"), ("Deployment", f"{session}-worker"),
              ("StatefulSet", f"{session}-distributor"), ("StatefulSet", f"{session}-writer"),
              ("Service", f"{session}-writer-0")}
    return wanted <= kinds


def test_explain_documents_the_spec(cluster):
    kubectl, _ = cluster
    out = kubectl("explain", "streamingsession.spec.transport.workerTimeoutS")
    assert "declared dead" in out
    recursive = kubectl("explain", "streamingsession.spec", "--recursive")
    for field in ("scan", "detector", "lanes", "workers", "plugin", "transport", "kubernetes", "highWaterMark"):
        assert field in recursive


def test_apply_creates_owned_children_and_columns(cluster):
    kubectl, _ = cluster
    kubectl("apply", "-n", NS, "-f", str(ROOT / "examples" / "4dstem.yaml"))
    wait_until(lambda: converged(kubectl, "demo"), what="children of demo")
    uid = get(kubectl, "sess", "demo")["metadata"]["uid"]
    for child in children(kubectl, "demo"):
        if child["kind"] != "Pod":
            (owner,) = child["metadata"]["ownerReferences"]
            assert owner["uid"] == uid and owner["controller"], child["metadata"]["name"]
    statefulsets = {i["metadata"]["name"]: i["spec"]["replicas"] for i in get(kubectl, "statefulsets")["items"]
                    if i["metadata"]["name"].startswith("demo-")}
    assert statefulsets == {"demo-source": 2, "demo-distributor": 1, "demo-writer": 1}
    wait_until(lambda: (get(kubectl, "sess", "demo").get("status") or {}).get("phase") == "Pending", what="status")
    table = kubectl("get", "sess", "demo", "-n", NS)
    assert table.split()[:6] == ["NAME", "PHASE", "WORKERS", "WRITTEN", "LOST", "AGE"]
    assert table.split()[6:10] == ["demo", "Pending", "0/2", "0"]
    assert "detstream.io/drain" in get(kubectl, "sess", "demo")["metadata"]["finalizers"]


def test_a_session_not_healthy_within_its_startup_timeout_is_reported(cluster):
    # No kubelet runs here: the pods stay Pending. Past spec.transport.startupTimeoutS the operator says
    # so, in the StagesReady condition and in one warning Event, and goes on waiting (not Failed: on a
    # cluster a pod may be slow for a while, pulling its image or waiting for a node).
    kubectl, _ = cluster
    apply(kubectl, manifest("slow", transport={"startupTimeoutS": 2}))

    def overdue():
        status = get(kubectl, "sess", "slow").get("status") or {}
        ready = {c["type"]: c for c in status.get("conditions", [])}.get("StagesReady", {})
        return ready.get("reason") == "StartupTimeout" and (status, ready)
    status, ready = wait_until(overdue, what="StagesReady reason StartupTimeout")
    assert status["phase"] == "Pending" and ready["status"] == "False"
    assert ready["message"].startswith("not every stage is healthy after 2 s (spec.transport.startupTimeoutS): ")
    assert "slow-writer-0 (Pending)" in ready["message"]

    def warnings():
        out = kubectl("get", "events", "-n", NS, "--field-selector", "involvedObject.name=slow", "-o", "json")
        return [e for e in json.loads(out)["items"] if e["reason"] == "StartupTimeout"]
    (event,) = wait_until(warnings, what="the StartupTimeout event")
    assert event["type"] == "Warning" and "slow-writer-0 (Pending)" in event["message"]
    time.sleep(3)  # a few more observations: they do not repeat it
    assert len(warnings()) == 1 and warnings()[0].get("count", 1) == 1
    kubectl("delete", "-n", NS, "sess/slow")


def test_scale_resizes_the_worker_pool(cluster):
    kubectl, _ = cluster
    apply(kubectl, manifest("scaled"))
    wait_until(lambda: converged(kubectl, "scaled"), what="children")
    kubectl("scale", "-n", NS, "sess/scaled", "--replicas=5")
    wait_until(lambda: get(kubectl, "deployment", "scaled-worker")["spec"]["replicas"] == 5, what="5 workers")
    wait_until(lambda: (get(kubectl, "sess", "scaled").get("status") or {}).get("workers") == "0/5", what="status 0/5")


def worker_replicasets(kubectl):
    return sorted(i["metadata"]["name"] for i in get(kubectl, "replicasets")["items"]
                  if i["metadata"]["name"].startswith("tuned-worker-") and i["spec"]["replicas"])


def plan_params(kubectl, session):
    plan = json.loads(get(kubectl, "configmap", f"{session}-plan")["data"]["plan.json"])
    return plan["spec"]["plugin"]["params"]


def test_parameters_change_live_other_changes_roll(cluster):
    kubectl, _ = cluster
    doc = manifest("tuned", plugin={"name": "electron-counting", "params": {"backgroundThreshold": 32,
                                                                          "xrayThreshold": 50}})
    apply(kubectl, doc)
    wait_until(lambda: worker_replicasets(kubectl), what="worker ReplicaSet")
    before_rs = worker_replicasets(kubectl)
    before_pods = sorted(p["metadata"]["uid"] for p in children(kubectl, "tuned") if p["kind"] == "Pod")
    doc["spec"]["plugin"]["params"]["backgroundThreshold"] = 30
    apply(kubectl, doc)
    wait_until(lambda: plan_params(kubectl, "tuned")["backgroundThreshold"] == 30, what="plan updated")
    assert worker_replicasets(kubectl) == before_rs
    assert sorted(p["metadata"]["uid"] for p in children(kubectl, "tuned") if p["kind"] == "Pod") == before_pods
    doc["spec"]["transport"] = {"highWaterMark": 64}
    apply(kubectl, doc)
    wait_until(lambda: worker_replicasets(kubectl) != before_rs, what="a rolled worker ReplicaSet")


def test_invalid_specs_are_refused(cluster):
    kubectl, _ = cluster
    bad = manifest("broken", workers={"replicas": -1})
    result = kubectl.run("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert result.returncode != 0 and "spec.workers.replicas" in result.stderr
    doc = manifest("guarded")
    apply(kubectl, doc)
    wait_until(lambda: converged(kubectl, "guarded"), what="children")
    template = get(kubectl, "statefulset", "guarded-writer")["spec"]["template"]
    doc["spec"]["detector"] = {"sectors": 5}  # the API server takes it; the operator must not
    apply(kubectl, doc)

    def refused():
        status = get(kubectl, "sess", "guarded").get("status") or {}
        cond = {c["type"]: c for c in status.get("conditions", [])}
        spec_valid = cond.get("SpecValid", {})
        return spec_valid.get("status") == "False" and spec_valid
    spec_valid = wait_until(refused, what="SpecValid=False")
    assert "spec.detector.sectors: must divide detector.cols (576)" in spec_valid["message"]
    assert spec_valid["observedGeneration"] == get(kubectl, "sess", "guarded")["metadata"]["generation"]
    assert get(kubectl, "statefulset", "guarded-writer")["spec"]["template"] == template  # last valid spec runs


def test_what_validate_accepts_the_api_server_takes_and_the_reverse(cluster):
    """Every child of the longest valid name (and of every Kubernetes-only string) is taken by the API server
    (server-side dry run); a name `detstream validate` refuses (field case 12) is refused there too."""
    kubectl, _ = cluster
    doc = manifest("a" * 40, lanes=12, source={"kind": "external", "replicas": 4}, output={"volumeClaim": "scans.v1"},
                   kubernetes={"nodeSelector": {"example.org/gpu": "a100", "zone": "1"},
                               "ingestServiceType": "NodePort",
                               "externalSourceRanges": ["192.0.2.7/24", "2001:db8::/32"]})
    doc["metadata"]["namespace"] = NS
    session = load_session(doc)
    kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(resources.children(session, "img")))
    with pytest.raises(SpecError):
        load_session({**doc, "metadata": {"name": "4dstem-au", "namespace": NS}})
    digit = dataclasses.replace(session, name="4dstem-au")
    result = kubectl.run("create", "--dry-run=server", "-f", "-", check=False,
                         input=yaml.safe_dump_all(resources.services(digit, resources.cluster_plan(digit))))
    assert result.returncode != 0 and 'Service "4dstem-au-distributor" is invalid' in result.stderr
    assert "regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?'" in result.stderr  # DNS-1035, as validate
    apply(kubectl, manifest("4dstem-au"))  # the API server takes the session itself; the operator refuses it

    def refused():
        status = get(kubectl, "sess", "4dstem-au").get("status") or {}
        return status.get("phase") == "Failed" and status["message"]
    assert wait_until(refused, what="phase Failed").startswith("invalid spec: metadata.name: must start with a letter")
    assert not [c for c in children(kubectl, "4dstem-au") if c["kind"] != "Pod"]


def test_secure_sessions_get_their_keys_secret_once(cluster):
    kubectl, _ = cluster
    doc = manifest("secure", security={"dataPlane": "curve", "controlPlane": "mtls"})
    apply(kubectl, doc)
    secret = wait_until(lambda: get(kubectl, "secret", "secure-keys"), what="the keys Secret")
    (owner,) = secret["metadata"]["ownerReferences"]
    assert owner["uid"] == get(kubectl, "sess", "secure")["metadata"]["uid"]
    # the Secret comes first (the pods mount it), the workloads within the same reconcile
    template = wait_until(lambda: get(kubectl, "statefulset", "secure-writer"),
                          what="the writer's StatefulSet")["spec"]["template"]["spec"]
    volume = next(v for v in template["volumes"] if v["name"] == "keys")
    assert {"path": "tls/writer-0.key", "key": "tls_writer-0.key"} in volume["secret"]["items"]
    doc["spec"]["workers"]["replicas"] = 3
    apply(kubectl, doc)
    wait_until(lambda: get(kubectl, "deployment", "secure-worker")["spec"]["replicas"] == 3, what="scaled")
    assert get(kubectl, "secret", "secure-keys")["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]


def test_observed_generation_follows_generation(cluster):
    kubectl, _ = cluster
    doc = manifest("generations")
    apply(kubectl, doc)
    for replicas in (3, 4):
        doc["spec"]["workers"]["replicas"] = replicas
        apply(kubectl, doc)
        wait_until(lambda: (lambda s: s["metadata"]["generation"] == (s.get("status") or {}).get("observedGeneration"))
                   (get(kubectl, "sess", "generations")), what="observedGeneration")


def test_delete_runs_the_finalizer_and_removes_the_children(cluster):
    kubectl, _ = cluster
    apply(kubectl, manifest("doomed"))
    wait_until(lambda: converged(kubectl, "doomed"), what="children")
    kubectl("delete", "-n", NS, "sess/doomed", "--timeout=60s")
    wait_until(lambda: not children(kubectl, "doomed"), timeout=60, what="garbage collection")


def test_operator_restart_converges_without_duplicates(cluster):
    kubectl, operator = cluster
    doc = manifest("restarted")
    apply(kubectl, doc)
    wait_until(lambda: converged(kubectl, "restarted"), what="children")
    operator.stop()
    doc["spec"]["workers"]["replicas"] = 3
    doc["spec"]["lanes"] = 2
    apply(kubectl, doc)  # changed while no operator runs
    operator.start()
    wait_until(lambda: get(kubectl, "deployment", "restarted-worker")["spec"]["replicas"] == 3
               and get(kubectl, "statefulset", "restarted-distributor")["spec"]["replicas"] == 2, what="converged")
    names = [(c["kind"], c["metadata"]["name"]) for c in children(kubectl, "restarted") if c["kind"] != "Pod"]
    assert len(names) == len(set(names))
    assert ("Service", "restarted-distributor-1") in names


def test_twenty_sessions_converge(cluster):
    kubectl, _ = cluster
    docs = [manifest(f"many-{i}") for i in range(20)]
    t0 = time.monotonic()
    apply_all = "---\n".join(yaml.safe_dump(d) for d in docs)
    kubectl("apply", "-n", NS, "-f", "-", input=apply_all)
    wait_until(lambda: all(converged(kubectl, d["metadata"]["name"]) for d in docs), timeout=180,
               what="20 sessions converged")
    print(f"20 sessions: all children created {time.monotonic() - t0:.1f} s after kubectl apply", file=sys.stderr)


def test_two_replicas_only_one_acts(cluster, tmp_path):
    kubectl, operator = cluster
    operator.stop()  # a standalone operator takes no part in peering
    kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "detstream"}}))
    # The higher priority first: a peer starts paused and acts only once it has read the peering
    # object, so the second one, seeing the first already there, never acts.
    peers = [None, start_operator(kubectl.cp, tmp_path / "peer-1.log", "--peering", "detstream", "--priority", "11")]
    try:
        wait_until(lambda: len(get(kubectl, "kopfpeering", "detstream").get("status") or {}) == 1, what="peer 1")
        peers[0] = start_operator(kubectl.cp, tmp_path / "peer-0.log", "--peering", "detstream", "--priority", "10")
        wait_until(lambda: len(get(kubectl, "kopfpeering", "detstream").get("status") or {}) == 2, what="both peers")
        apply(kubectl, manifest("peered"))
        wait_until(lambda: converged(kubectl, "peered"), what="children")
        time.sleep(2 * 2.0)  # two observe intervals: a second acting peer would have logged by now
        assert "Handler 'reconcile' succeeded" in peers[1].log()  # the higher priority acts
        assert "'reconcile'" not in peers[0].log() and "'observe'" not in peers[0].log()
    finally:
        for peer in filter(None, peers):
            peer.stop()
        operator.start()


def test_without_peering_flags_the_operator_acts_and_a_missing_peering_object_is_named(cluster, tmp_path):
    # As `detstream operator -n NS` is run by hand: no KopfPeering exists, and none is needed.
    kubectl, operator = cluster
    operator.stop()
    plain = start_operator(kubectl.cp, tmp_path / "plain.log")
    try:
        apply(kubectl, manifest("unpeered"))
        wait_until(lambda: converged(kubectl, "unpeered"), what="children made by an operator without flags")
    finally:
        plain.stop()
        operator.start()
    # Asked for a peering object that is not there, it says so and exits, instead of waiting for ever.
    peered = start_operator(kubectl.cp, tmp_path / "peered.log", "--peering", "nowhere")
    assert peered.proc.wait(60) == 2
    assert (f"detstream operator: --peering nowhere: no KopfPeering 'nowhere' in namespace {NS}: create it "
            "(the chart does with peering.enabled=true), or run without --peering") in peered.log()
    assert "Traceback" not in peered.log()


def test_a_namespace_with_a_resource_quota_accepts_the_sessions_pods(cluster):
    # A quota on CPU and memory makes the API server refuse any pod that does not declare them.
    kubectl, _ = cluster
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "stages"},
             "spec": {"hard": {"requests.cpu": "1000", "requests.memory": "1000Gi", "limits.memory": "1000Gi"}}}
    apply(kubectl, quota)
    try:
        wait_until(lambda: (get(kubectl, "resourcequota", "stages").get("status") or {}).get("hard"),
                   what="the quota in force")
        apply(kubectl, manifest("quota"))

        def pods():
            return [c for c in children(kubectl, "quota") if c["kind"] == "Pod"]
        made = wait_until(lambda: len(pods()) == 5 and pods(), what="every stage pod admitted (2 workers)")
        for pod in made:
            (stage,) = pod["spec"]["containers"]
            assert set(stage["resources"]["requests"]) == {"cpu", "memory"}, pod["metadata"]["name"]
    finally:
        kubectl("delete", "-n", NS, "resourcequota", "stages")
