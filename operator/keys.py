"""Session keys on Kubernetes: one Secret per session, each pod mounting only what its role needs.

When a session asks for CURVE (`spec.security.dataPlane: curve`) or mutual TLS
(`spec.security.controlPlane: mtls`), the operator makes its keys once, with the same
`services.security.generate` and folder layout the local runner uses, into the Secret
`SESSION-keys` owned by the session (so it goes with it). A pod of role R mounts, at KEYS_DIR:
every stage's CURVE public key, and only R's own CURVE secret keys and TLS certificates; the CA's
key and the launcher's client certificate are never mounted. The operator itself reads the
launcher certificate from the Secret to call the stages over mutual TLS.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

from detstream.services.dataplane.security import EXTERNAL, generate
from detstream.services.model.plan import Plan
from detstream.services.model.session import Session

KEYS_DIR = "/etc/detstream-keys"
LAUNCHER = "launcher"


def needs_keys(session: Session) -> bool:
    security = session.spec.security
    return security.data_plane == "curve" or security.control_plane == "mtls"


def secret_name(session: Session) -> str:
    return f"{session.name}-keys"


def secret_key(path: str) -> str:
    """A Secret's keys cannot hold '/': curve/public/worker-0.key -> curve_public_worker-0.key."""
    return path.replace("/", "_")


def key_secret(session: Session, plan: Plan, labels: dict) -> dict:
    """A new Secret with freshly made keys for every stage of the plan."""
    security = session.spec.security
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generate(folder, plan, curve=security.data_plane == "curve", tls=security.control_plane == "mtls")
        data = {secret_key(str(p.relative_to(folder))): base64.b64encode(p.read_bytes()).decode()
                for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": secret_name(session), "namespace": session.namespace, "labels": labels},
            "data": data}


def key_names(plan: Plan, role: str) -> list[str]:
    """Whose keys pods of `role` use: every worker pod is index 0 on Kubernetes (one Deployment), so
    all use worker-0's, and scaling the workers needs no new keys."""
    return ["worker-0"] if role == "worker" else [s.name for s in plan.of_role(role)]


def role_files(session: Session, plan: Plan, role: str) -> list[str]:
    """The files a pod of `role` needs (paths inside KEYS_DIR)."""
    security = session.spec.security
    mine = key_names(plan, role)
    everyone = [name for r in dict.fromkeys(s.role for s in plan.stages) for name in key_names(plan, r)]
    files = []
    if security.data_plane == "curve":
        files += [f"curve/public/{name}.key" for name in everyone] + [f"curve/public/{EXTERNAL}.key"]
        files += [f"curve/private/{name}.key_secret" for name in mine]
    if security.control_plane == "mtls":
        files += ["tls/ca.crt"] + [f"tls/{name}.{ext}" for name in mine for ext in ("crt", "key")]
    return files


def keys_volume(session: Session, plan: Plan, role: str) -> dict:
    items = [{"key": secret_key(f), "path": f} for f in role_files(session, plan, role)]
    # 0440 with the pod's fsGroup: readable by the stage's user (10001) and nobody else.
    return {"name": "keys", "secret": {"secretName": secret_name(session), "items": items, "defaultMode": 0o440}}


def covers(secret: dict, session: Session, plan: Plan) -> bool:
    """Whether an existing Secret has every key this plan's pods will mount (a new lane needs more)."""
    have = set(secret.get("data") or {})
    wanted = {secret_key(f) for role in {s.role for s in plan.stages} for f in role_files(session, plan, role)}
    return wanted <= have


def launcher_files(secret: dict) -> tuple[bytes, bytes, bytes]:
    """(CA certificate, client certificate, client key) of the operator, from the session's Secret."""
    data = secret.get("data") or {}
    read = lambda name: base64.b64decode(data[secret_key(f"tls/{name}")])  # noqa: E731
    return read("ca.crt"), read(f"{LAUNCHER}.crt"), read(f"{LAUNCHER}.key")
