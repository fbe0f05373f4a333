"""The agent's loop: schedule, run, report, resolve, clean up. Level-triggered: every LOOP_S it lists
the pods, Services and EndpointSlices of its namespaces and converges on them.

- Scheduler: a pod with no node, the default scheduler and a nodeSelector this node satisfies is
  bound to the node (a Binding, as kube-scheduler posts); other pods are left Pending.
- Kubelet: pods bound to the node are run (pod.py, container.py); a pod being deleted gets SIGTERM,
  then SIGKILL after its grace period, then is removed from the API server (the kubelet's final
  delete); a pod that vanished is killed at once.
- Pod IPs: each pod gets the next free address of a loopback /24 (127.A.B.2, .3, ...), so two
  replicas listen on the same port as on a cluster. A.B is derived from the agent's pid so that
  agents of concurrent test runs do not collide (or given: --pod-network).
- DNS: each pod's /etc/hosts lists the namespace's Services with the addresses of their
  EndpointSlices (ready endpoints only, what kube-proxy would route to), as SERVICE, SERVICE.NS, SERVICE.NS.svc
  and SERVICE.NS.svc.cluster.local, and the hostnames of a headless Service's pods. A Service whose
  port differs from its target port cannot be emulated without kube-proxy: it is left out, with a
  warning.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

from .api import Api, ApiError, ns_path
from .node import RENEW_S, Node, now
from .pod import PodRuntime

LOOP_S = 0.5
REPORT_NODE_S = 60.0

log = logging.getLogger("node-agent")


def default_network() -> str:
    pid = os.getpid()
    return f"127.{1 + pid % 250}.{(pid // 250) % 256}"


class NodeAgent:
    def __init__(self, api: Api, node_name: str, namespaces: list[str], workdir: Path, network: str = ""):
        self.api = api
        self.node = Node(api, node_name)
        self.namespaces = namespaces
        self.workdir = Path(workdir).resolve()
        self.network = network or default_network()
        self.pods: dict[str, PodRuntime] = {}
        self.said: set[tuple] = set()
        self.slices = ""
        self.renewed = self.reported = 0.0

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.node.register()
        log.info("node %s registered; pods get addresses %s.2-254; watching %s", self.node.name, self.network,
                 ", ".join(self.namespaces))
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    self.sync()
                except (ApiError, OSError) as exc:
                    log.warning("sync: %s", exc)
                stop.wait(max(0.0, LOOP_S - (time.monotonic() - t0)))
        finally:
            self.shutdown()

    def sync(self) -> None:
        t = time.monotonic()
        if t - self.renewed > RENEW_S:
            self.node.renew()
            self.renewed = t
        if t - self.reported > REPORT_NODE_S:
            self.node.report()
            self.reported = t
        seen = set()
        for ns in self.namespaces:
            services = self.service_names(ns)
            for pod in self.api.items(ns_path(ns, "pods")):
                node = pod["spec"].get("nodeName")
                if not node:
                    self.schedule(pod)
                elif node == self.node.name:
                    seen.add(pod["metadata"]["uid"])
                    try:
                        self.run_pod(pod, services)
                    except ApiError as exc:  # one pod's trouble must not stop the others
                        log.warning("pod %s: %s", pod["metadata"]["name"], exc)
        for uid, rt in list(self.pods.items()):
            if uid not in seen:  # gone from the API server (after our final delete, or forced): kill, forget
                rt.terminate(grace=2)
                if self.reap(rt):
                    rt.cleanup()
                    del self.pods[uid]
                    log.info("pod %s/%s removed", rt.namespace, rt.name)

    def run_pod(self, pod: dict, services: dict[str, list[tuple[str, list[str]]]]) -> None:
        uid = pod["metadata"]["uid"]
        rt = self.pods.get(uid)
        if rt is None:
            if pod["metadata"].get("deletionTimestamp"):  # deleted before it ran here: nothing to stop
                self.api.delete(ns_path(pod["metadata"]["namespace"], "pods", pod["metadata"]["name"]),
                                {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
                return
            rt = self.pods[uid] = PodRuntime(self, pod, self.allocate_ip())
            log.info("pod %s/%s: IP %s", rt.namespace, rt.name, rt.ip)
        rt.sync(pod, services.get(rt.namespace, []))
        rt.report()
        if rt.terminating and rt.stopped:  # the kubelet's final delete, once its containers are gone
            try:
                self.api.delete(ns_path(rt.namespace, "pods", rt.name),
                                {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
            except ApiError as exc:
                if exc.status not in (404, 409):
                    raise

    def api_service_env(self) -> dict[str, str]:
        """KUBERNETES_SERVICE_HOST/PORT, as the kubelet gives every container: the API server's address
        (on a cluster the `kubernetes` Service's ClusterIP, which kube-proxy routes there)."""
        url = urllib.parse.urlsplit(self.api.server)
        return {"KUBERNETES_SERVICE_HOST": url.hostname, "KUBERNETES_SERVICE_PORT": str(url.port or 443)}

    def allocate_ip(self) -> str:
        used = {rt.ip for rt in self.pods.values()}
        for host in range(2, 255):
            ip = f"{self.network}.{host}"
            if ip not in used:
                return ip
        raise RuntimeError("no free pod IP on the test node")

    # -- the scheduler's part ---------------------------------------------------------------------
    def schedule(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        if meta.get("deletionTimestamp") or spec.get("schedulerName", "default-scheduler") != "default-scheduler":
            return
        wanted = spec.get("nodeSelector") or {}
        if any(self.node.labels.get(k) != v for k, v in wanted.items()) or spec.get("affinity"):
            self.event_once(pod, "FailedScheduling", f"0/1 nodes are available: 1 node(s) didn't match node "
                                                     f"selector {wanted} (affinity is not supported)", True,
                            component="default-scheduler")
            return
        try:
            self.api.create(ns_path(meta["namespace"], "pods", meta["name"], "binding"), {
                "apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"], "uid": meta["uid"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node.name}})
        except ApiError as exc:
            if exc.status in (404, 409):
                return
            raise
        self.event(pod, "Scheduled", f"Successfully assigned {meta['namespace']}/{meta['name']} to {self.node.name}",
                   False, component="default-scheduler")

    # -- cluster DNS, as hosts entries --------------------------------------------------------------
    def service_names(self, ns: str) -> dict[str, list[tuple[str, list[str]]]]:
        """Name -> addresses as the cluster DNS serves them, from the EndpointSlices (what CoreDNS and
        kube-proxy read; the older Endpoints refuse loopback addresses, EndpointSlices of 1.20 take them)."""
        slices: dict[str, list[dict]] = {}
        for item in self.api.items(f"/apis/{self.slice_api()}/namespaces/{ns}/endpointslices"):
            service = (item["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
            if service and item.get("addressType") == "IPv4":
                slices.setdefault(service, []).append(item)
        entries: dict[str, list[str]] = {}
        for svc in self.api.items(ns_path(ns, "services")):
            name, spec = svc["metadata"]["name"], svc["spec"]
            found = slices.get(name, [])
            ports = {p.get("name") or "": p["port"] for s in found for p in s.get("ports") or []}
            moved = [p for p in spec.get("ports") or [] if ports.get(p.get("name") or "", p["port"]) != p["port"]]
            if moved:
                self.warn_once(("ports", ns, name), "Service %s/%s maps port %s to %s: not emulated without "
                               "kube-proxy; its name is not resolved", ns, name, moved[0]["port"],
                               ports[moved[0].get("name") or ""])
                continue
            for endpoint in (e for s in found for e in s.get("endpoints") or []):
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue  # kube-proxy routes to ready endpoints only
                for ip in endpoint.get("addresses") or []:
                    names = entries.setdefault(ip, [])
                    names += [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
                    if spec.get("clusterIP") == "None" and endpoint.get("hostname"):
                        host = f"{endpoint['hostname']}.{name}"
                        names += [host, f"{host}.{ns}.svc.cluster.local"]
        return {ns: sorted(entries.items())}

    def slice_api(self) -> str:
        if not self.slices:
            groups = self.api.get("/apis/discovery.k8s.io").get("versions") or []
            versions = [v["groupVersion"] for v in groups]
            self.slices = "discovery.k8s.io/v1" if "discovery.k8s.io/v1" in versions else "discovery.k8s.io/v1beta1"
        return self.slices

    # -- events -----------------------------------------------------------------------------------
    def event(self, obj: dict, reason: str, message: str, warning: bool, field: str = "",
              component: str = "kubelet") -> None:
        meta, t = obj["metadata"], now()
        involved = {"apiVersion": "v1", "kind": obj.get("kind", "Pod"), "namespace": meta["namespace"],
                    "name": meta["name"], "uid": meta["uid"]}
        if field:
            involved["fieldPath"] = field
        try:
            self.api.create(ns_path(meta["namespace"], "events"), {
                "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": meta["name"] + "."},
                "involvedObject": involved, "reason": reason, "message": message[:1024],
                "type": "Warning" if warning else "Normal", "firstTimestamp": t, "lastTimestamp": t, "count": 1,
                "source": {"component": component, "host": self.node.name}})
        except ApiError as exc:
            log.warning("event %s on %s: %s", reason, meta["name"], exc)

    def event_once(self, obj, reason, message, warning, **kw) -> None:
        key = (obj["metadata"]["uid"], reason, message)
        if key not in self.said:
            self.said.add(key)
            self.event(obj, reason, message, warning, **kw)

    def warn_once(self, key, *args) -> None:
        if key not in self.said:
            self.said.add(key)
            log.warning(*args)

    # -- the end ----------------------------------------------------------------------------------
    def shutdown(self, grace: float = 5.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL), remove the pods' folders and the node."""
        for rt in self.pods.values():
            rt.terminate(grace)
        deadline = time.monotonic() + grace + 2
        while time.monotonic() < deadline and not all(self.reap(rt) for rt in self.pods.values()):
            time.sleep(0.1)
        for rt in self.pods.values():
            for c in rt.containers:
                if c.run is not None:
                    c.run.signal(9)
                    c.run.proc.wait()
            rt.cleanup()
        self.pods.clear()
        self.node.remove()
        shutil.rmtree(self.workdir / "pods", ignore_errors=True)
        log.info("node %s: every pod stopped, node removed", self.node.name)

    @staticmethod
    def reap(rt: PodRuntime) -> bool:
        for c in rt.containers:
            if c.run is not None and c.run.proc.poll() is not None:
                c.exited(c.run)
        return rt.stopped
