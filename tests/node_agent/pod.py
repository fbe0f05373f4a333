"""One pod on the test node: its folder, IP, volumes, hosts file, containers and reported status.

Layout (like /var/lib/kubelet/pods/UID): `WORKDIR/pods/UID/volumes/NAME` (emptyDir, configMap,
secret), `.../logs/CONTAINER/N.log` (N = restart count), `.../etc-hosts`, `.../run` (the containers'
/run: links to the volumes mounted under /run or /var/run, such as the ServiceAccount token's). An emptyDir goes with
the pod, as on a cluster; its logs are kept (WORKDIR/logs/NS_NAME_UID/) for post-mortems. A
persistentVolumeClaim must be Bound to a hostPath or local PersistentVolume, whose folder is used
as is; other volume kinds are refused (FailedMount), and the pod then stays ContainerCreating, as
it would on a node that cannot mount them.
"""

from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path

from .api import ApiError, ns_path
from .container import ConfigError, Container, Paths, in_pod_namespace
from .node import now

REFRESH_S = 10.0  # how often configMap/secret volumes are brought up to date (the kubelet: ~1 min)
RUN_PATHS = ("/var/run/", "/run/")  # mount paths under these are also found there (the pod's own /run)


class VolumeError(Exception):
    pass


class PodRuntime:
    def __init__(self, agent, pod: dict, ip: str):
        meta = pod["metadata"]
        self.agent, self.api = agent, agent.api
        self.uid, self.name, self.namespace = meta["uid"], meta["name"], meta["namespace"]
        self.pod, self.spec, self.ip = pod, pod["spec"], ip
        self.hostname = self.spec.get("hostname") or self.name
        self.root = agent.workdir / "pods" / self.uid
        self.hosts = self.root / "etc-hosts"
        self.run_dir = self.root / "run"  # the containers' /run
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.hosts.write_text("")
        self.volumes: dict[str, Path] | None = None
        self.paths = Paths({})
        self.refreshed = 0.0
        self.hosts_text = ""
        self.containers = [Container(self, c) for c in self.spec["containers"]]
        self.start_time = now()
        self.terminating = False
        self.reported: dict | None = None
        self.said: dict[tuple, float] = {}

    # -- the loop ---------------------------------------------------------------------------------
    def sync(self, pod: dict, services: list[tuple[str, list[str]]]) -> None:
        self.pod, self.spec = pod, pod["spec"]
        self.write_hosts(services)
        if pod["metadata"].get("deletionTimestamp") and not self.terminating:
            grace = pod["metadata"].get("deletionGracePeriodSeconds",
                                        self.spec.get("terminationGracePeriodSeconds", 30))
            self.terminate(float(grace))
        if self.terminating:
            for c in self.containers:
                if c.run is not None and c.run.proc.poll() is not None:
                    c.exited(c.run)
            return
        if self.spec.get("initContainers"):
            return self.failed_mount("initContainers are not supported by the test node agent")
        try:
            if self.volumes is None or time.monotonic() - self.refreshed > REFRESH_S:
                self.mount_volumes()
        except VolumeError as exc:
            return self.failed_mount(str(exc))
        for c in self.containers:
            c.sync()

    def terminate(self, grace: float) -> None:
        if self.terminating:
            return
        self.terminating = True
        if any(c.alive for c in self.containers):
            self.event("Killing", f"Stopping container {', '.join(c.name for c in self.containers)}", warning=False)
        for c in self.containers:
            c.stop(grace)

    @property
    def stopped(self) -> bool:
        return not any(c.alive for c in self.containers)

    def cleanup(self) -> None:
        """The pod's folder goes (emptyDirs with it); its logs are kept in WORKDIR/logs/NS_NAME_UID."""
        if (self.root / "logs").is_dir():
            shutil.move(self.root / "logs", self.agent.workdir / "logs" / f"{self.namespace}_{self.name}_{self.uid}")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- volumes ----------------------------------------------------------------------------------
    def mount_volumes(self) -> None:
        volumes = {}
        for volume in self.spec.get("volumes") or []:
            name = volume["name"]
            here = self.root / "volumes" / name
            if "emptyDir" in volume:
                here.mkdir(parents=True, exist_ok=True)
            elif "configMap" in volume or "secret" in volume:
                kind = "configMap" if "configMap" in volume else "secret"
                ref = volume[kind]
                try:
                    data = self.key_source(kind, ref.get("name") or ref.get("secretName"), ref.get("optional", False))
                except ConfigError as exc:
                    raise VolumeError(f"volume {name}: {exc}") from None
                items = ref.get("items") or [{"key": k, "path": k} for k in data]
                here.mkdir(parents=True, exist_ok=True)
                for item in items:
                    if item["key"] not in data:
                        raise VolumeError(f"volume {name}: no key {item['key']}")
                    target = here / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if not target.exists() or target.read_text() != data[item["key"]]:
                        target.write_text(data[item["key"]])
            elif "persistentVolumeClaim" in volume:
                here = self.claimed(volume["persistentVolumeClaim"]["claimName"])
            elif "hostPath" in volume:
                here = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    here.mkdir(parents=True, exist_ok=True)
            else:
                kinds = sorted(set(volume) - {"name"})
                raise VolumeError(f"volume {name}: {', '.join(kinds)} is not supported by the test node agent")
            volumes[name] = here
        mounts = {}
        for c in self.spec["containers"]:
            for m in c.get("volumeMounts") or []:
                mounts[m["mountPath"]] = volumes[m["name"]] / m.get("subPath", "")
        for path, here in mounts.items():  # at their real paths in the containers' /run
            under_run = next((path[len(p):] for p in RUN_PATHS if path.startswith(p)), None)
            if under_run:
                link = self.run_dir / under_run
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(here)
        self.volumes, self.paths, self.refreshed = volumes, Paths(mounts), time.monotonic()

    def namespace_setup(self):
        """preexec_fn of the pod's processes: its /etc/hosts and /run (see container.py)."""
        return in_pod_namespace(self.hosts, self.run_dir)

    def claimed(self, claim: str) -> Path:
        try:
            pvc = self.api.get(ns_path(self.namespace, "persistentvolumeclaims", claim))
        except ApiError as exc:
            raise VolumeError(f"persistentvolumeclaim {claim!r} not found") from exc
        if (pvc.get("status") or {}).get("phase") != "Bound":
            raise VolumeError(f"persistentvolumeclaim {claim!r} is not bound")
        pv = self.api.get(f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")["spec"]
        source = pv.get("hostPath") or pv.get("local")
        if not source:
            raise VolumeError(f"persistentvolume {pvc['spec']['volumeName']}: only hostPath and local volumes "
                              f"are supported by the test node agent")
        return Path(source["path"])

    def key_source(self, kind: str, name: str, optional: bool = False) -> dict[str, str]:
        """The data of a ConfigMap or Secret (decoded)."""
        plural = "configmaps" if kind == "configMap" else "secrets"
        try:
            obj = self.api.get(ns_path(self.namespace, plural, name))
        except ApiError as exc:
            if optional and exc.status == 404:
                return {}
            raise ConfigError(f"{kind} {name!r} not found") from exc
        if kind == "secret":
            return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        return dict(obj.get("data") or {})

    def failed_mount(self, message: str) -> None:
        self.event("FailedMount", message, warning=True)

    # -- what containers see ----------------------------------------------------------------------
    def field(self, path: str) -> str:
        meta = self.pod["metadata"]
        simple = {"metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
                  "spec.nodeName": self.agent.node.name,
                  "spec.serviceAccountName": self.spec.get("serviceAccountName", ""),
                  "status.hostIP": self.agent.node.address, "status.podIP": self.ip, "status.podIPs": self.ip}
        if path in simple:
            return simple[path]
        for prefix, values in (("metadata.labels", meta.get("labels") or {}),
                               ("metadata.annotations", meta.get("annotations") or {})):
            if path.startswith(prefix + "['") and path.endswith("']"):
                return values.get(path[len(prefix) + 2:-2], "")
        raise ConfigError(f"fieldRef {path} is not supported by the test node agent")

    def write_hosts(self, services: list[tuple[str, list[str]]]) -> None:
        """The pod's /etc/hosts: itself, then the Services' names (what the cluster's DNS answers)."""
        own = f"{self.hostname}.{self.spec['subdomain']}.{self.namespace}.svc.cluster.local\t" if self.spec.get(
            "subdomain") else ""
        lines = ["# Kubernetes-managed hosts file (detstream test node agent).", "127.0.0.1\tlocalhost",
                 "::1\tlocalhost ip6-localhost ip6-loopback", f"{self.ip}\t{own}{self.hostname}",
                 f"# Services of namespace {self.namespace}, from their EndpointSlices"]
        lines += [f"{ip}\t{' '.join(names)}" for ip, names in services]
        text = "\n".join(lines) + "\n"
        if text != self.hosts_text:
            with open(self.hosts, "w") as f:  # in place: the file is bind-mounted into the processes
                f.write(text)
            self.hosts_text = text

    # -- what the API server is told --------------------------------------------------------------
    def status(self) -> dict:
        statuses = [c.status() for c in self.containers]
        never_ran = any("waiting" in s["state"] and "lastState" not in s for s in statuses)
        done = [s["state"]["terminated"] for s in statuses if "terminated" in s["state"]]
        if len(done) == len(statuses):
            phase = "Succeeded" if all(d["exitCode"] == 0 for d in done) else "Failed"
        else:
            phase = "Pending" if never_ran else "Running"
        ready = all(s["ready"] for s in statuses)
        t = self.reported_transition(ready)
        conditions = [{"type": "Initialized", "status": "True", "lastTransitionTime": self.start_time},
                      {"type": "ContainersReady", "status": str(ready), "lastTransitionTime": t},
                      {"type": "Ready", "status": str(ready), "lastTransitionTime": t}]
        return {"phase": phase, "hostIP": self.agent.node.address, "podIP": self.ip, "podIPs": [{"ip": self.ip}],
                "startTime": self.start_time, "conditions": conditions, "containerStatuses": statuses}

    def reported_transition(self, ready: bool) -> str:
        if self.reported is not None:
            old = next(c for c in self.reported["conditions"] if c["type"] == "Ready")
            if old["status"] == str(ready):
                return old["lastTransitionTime"]
        return now()

    def report(self) -> None:
        status = self.status()
        if status == self.reported:
            return
        try:
            self.api.patch(ns_path(self.namespace, "pods", self.name, "status"), {"status": status}, strategic=True)
            self.reported = status
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        key = (reason, message)
        if time.monotonic() - self.said.get(key, -1e9) < 60:
            return  # the kubelet's recorder aggregates repeats too
        self.said[key] = time.monotonic()
        self.agent.event(self.pod, reason, message, warning, field=f"spec.containers{{{self.containers[0].name}}}")
