"""Operator: time from `kubectl apply` of StreamingSessions to all their children created, on a real
control plane.

    python -m benchmarks.operator [--sessions 1 20]

A fresh Kubernetes control plane (etcd + kube-apiserver + kube-controller-manager on 127.0.0.1,
tests/cluster/controlplane.py; its binaries are built once by `make cluster`), the CRD from
charts/detstream/crds/, and `detstream operator --standalone -n NS` as a process. For each count
N: N sessions (like examples/4dstem.yaml) in one `kubectl apply`, timed from the apply's start
until every session's ConfigMap, Services, StatefulSets and Deployment exist (polled through the
API every 50 ms).

Baseline in the same run: the very same child objects (as the operator builds them) created
directly through the API (8 requests at a time) into another namespace, timed the same way: the
API server's own time to create them. Printed: seconds for each
count, and operator / direct. Results: benchmarks/results/operator.json. Run as a module
(`python -m benchmarks.operator`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.processes import end, spawn
from benchmarks.report import ROOT, Report

KINDS = ("ConfigMap", "Service", "StatefulSet", "Deployment")


def session_doc(name: str) -> dict:
    return {"apiVersion": "detstream.io/v1alpha1", "kind": "StreamingSession", "metadata": {"name": name},
            "spec": {"scan": {"rows": 32, "cols": 32}, "source": {"kind": "simulator", "replicas": 2},
                     "workers": {"replicas": 2},
                     "plugin": {"name": "electron-counting",
                                "params": {"dark": "simulated", "backgroundThreshold": 32, "xrayThreshold": 50}}}}


def expected_children(doc: dict, namespace: str) -> set[tuple[str, str]]:
    from detstream.operator import resources
    from detstream.services.model.session import load_session
    d = dict(doc, metadata=dict(doc["metadata"], namespace=namespace))
    return {(c["kind"], c["metadata"]["name"]) for c in resources.children(load_session(d), "detstream:bench")
            if c["kind"] in KINDS}


def rendered_children(doc: dict, namespace: str) -> list[dict]:
    from detstream.operator import resources
    from detstream.services.model.session import load_session
    d = dict(doc, metadata=dict(doc["metadata"], namespace=namespace))
    return [c for c in resources.children(load_session(d), "detstream:bench") if c["kind"] in KINDS]


class Cluster:
    """Listing what exists in a namespace, through the API (kubernetes client)."""

    def __init__(self, kubeconfig: Path):
        from kubernetes import client, config
        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core, self.apps = client.CoreV1Api(self.api), client.AppsV1Api(self.api)

    def create(self, namespace: str, objects: list[dict], threads: int = 8) -> None:
        """POST every object, `threads` requests at a time (as a controller makes them)."""
        from concurrent.futures import ThreadPoolExecutor

        from kubernetes import utils
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda o: utils.create_from_dict(self.api, o, namespace=namespace), objects))

    def existing(self, namespace: str) -> set[tuple[str, str]]:
        found = set()
        for kind, lister in (("ConfigMap", self.core.list_namespaced_config_map),
                             ("Service", self.core.list_namespaced_service),
                             ("StatefulSet", self.apps.list_namespaced_stateful_set),
                             ("Deployment", self.apps.list_namespaced_deployment)):
            found |= {(kind, i.metadata.name) for i in lister(namespace).items}
        return found


def kubectl_exe() -> str:
    local = ROOT / ".tools" / "bin" / "kubectl"
    return str(local) if local.exists() else (shutil.which("kubectl") or "kubectl")


def timed_apply(kubectl, cluster: Cluster, namespace: str, docs: list[dict], wanted: set, timeout: float,
                direct: bool = False) -> float:
    """Seconds from applying `docs` (with kubectl, or created directly through the API) until `wanted` exist."""
    t0 = time.monotonic()
    if direct:
        cluster.create(namespace, docs)
    else:
        kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))
    while not wanted <= cluster.existing(namespace):
        if time.monotonic() - t0 > timeout:
            missing = sorted(wanted - cluster.existing(namespace))[:5]
            raise RuntimeError(f"children missing after {timeout:g} s, e.g. {missing}")
        time.sleep(0.05)
    return time.monotonic() - t0


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.operator", description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    report = Report("operator", sessions=args.sessions)
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from cluster.controlplane import ControlPlane, bin_dir
    except ImportError:
        report.figure("skipped", "skipped: tests/cluster/controlplane.py is not there", skipped=True)
        return report.save()
    finally:
        sys.path.remove(str(ROOT / "tests"))
    kube = bin_dir()
    missing = [str(kube / n) for n in ("kube-apiserver", "kube-controller-manager") if not (kube / n).exists()]
    missing += [t for t in ("etcd", "openssl") if not shutil.which(t) and not Path(f"/usr/bin/{t}").exists()]
    missing += [] if Path(kubectl_exe()).exists() or shutil.which(kubectl_exe()) else ["kubectl"]
    if missing:  # never build Kubernetes from a benchmark (ControlPlane would: 5-10 minutes)
        report.figure("skipped", f"skipped: missing {', '.join(missing)} (make cluster builds the control plane once; "
                      f"make tools installs kubectl)", skipped=True)
        return report.save()

    with tempfile.TemporaryDirectory(prefix="detstream-bench-operator-") as tmp, ControlPlane(Path(tmp) / "cp") as cp:
        env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig)}
        exe = kubectl_exe()

        def kubectl(*a, input=None):
            r = subprocess.run([exe, f"--kubeconfig={cp.kubeconfig}", *a], input=input, capture_output=True,
                               text=True, env=env, timeout=120)
            if r.returncode:
                raise RuntimeError(f"kubectl {' '.join(a)}: {r.stderr.strip()}")
            return r.stdout

        kubectl("apply", "-f", str(ROOT / "charts" / "detstream" / "crds"))
        kubectl("wait", "--for", "condition=established", "--timeout=60s", "crd/streamingsessions.detstream.io")
        cluster = Cluster(cp.kubeconfig)
        log = open(Path(tmp) / "operator.log", "wb")
        operator = spawn([sys.executable, "-m", "detstream.services.launcher.cli", "operator", "--standalone",
                          "-n", "bench", "--liveness-port", "0", "--metrics-port", "0"], env=env, stdout=log,
                         stderr=subprocess.STDOUT)
        try:
            kubectl("create", "namespace", "bench")
            kubectl("create", "namespace", "direct")
            # The operator is up once it has made the children of a first session (not timed).
            timed_apply(kubectl, cluster, "bench", [session_doc("warmup")],
                        expected_children(session_doc("warmup"), "bench"), args.timeout)
            results = {}
            for n in args.sessions:
                docs = [session_doc(f"s{n}-{i}") for i in range(n)]
                wanted = set().union(*(expected_children(d, "bench") for d in docs))
                op = timed_apply(kubectl, cluster, "bench", docs, wanted, args.timeout)
                objects = [c for d in docs for c in rendered_children(d, "direct")]
                direct = timed_apply(kubectl, cluster, "direct", objects,
                                     {(c["kind"], c["metadata"]["name"]) for c in objects}, args.timeout, direct=True)
                results[n] = {"operator_s": op, "direct_s": direct, "children": len(wanted)}
                report.figure(f"sessions_{n}", f"{n} session(s): all {len(wanted)} children {op:.2f} s after kubectl "
                              f"apply ({op / n:.2f} s per session); the same objects created directly: {direct:.2f} s; "
                              f"operator / direct = {op / direct:.1f}", **results[n], ratio=op / direct)
        finally:
            end([operator])
            log.close()
    return report.save()


if __name__ == "__main__":
    main()
