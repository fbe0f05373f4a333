"""The Node object and its heartbeat, as a kubelet keeps them.

The node lifecycle controller (kube-controller-manager) marks a node NotReady, taints it and
evicts its pods when its Lease in `kube-node-lease` is not renewed: the agent renews it every
few seconds and reports the Ready condition.
"""

from __future__ import annotations

import datetime
import os
import platform

from .api import Api, ApiError

LEASE_S = 40
RENEW_S = 5.0
CAPACITY = {"cpu": str(os.cpu_count() or 1), "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}


def now(micro: bool = False) -> str:
    t = datetime.datetime.now(datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


class Node:
    def __init__(self, api: Api, name: str, address: str = "127.0.0.1"):
        self.api, self.name, self.address = api, name, address
        self.labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(),
                                                                                         platform.machine()),
                       "node.detstream.io/test-agent": "true"}
        self.uid = ""

    def register(self) -> None:
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": self.labels}}
        try:
            self.uid = self.api.create("/api/v1/nodes", body)["metadata"]["uid"]
        except ApiError as exc:
            if exc.status != 409:
                raise
            self.uid = self.api.get(f"/api/v1/nodes/{self.name}")["metadata"]["uid"]
        self.report()
        self.renew()

    def report(self) -> None:
        t = now()
        conditions = [{"type": kind, "status": "False", "reason": f"KubeletHas{ok}", "lastHeartbeatTime": t,
                       "lastTransitionTime": t} for kind, ok in (("MemoryPressure", "SufficientMemory"),
                                                                   ("DiskPressure", "NoDiskPressure"),
                                                                   ("PIDPressure", "SufficientPID"))]
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": t,
                           "lastTransitionTime": t, "message": "detstream test node agent is posting ready status"})
        uname = platform.uname()
        self.api.patch(f"/api/v1/nodes/{self.name}/status", {"status": {
            "capacity": CAPACITY, "allocatable": CAPACITY, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": self.address}, {"type": "Hostname", "address": self.name}],
            "nodeInfo": {"machineID": self.name, "systemUUID": self.name, "bootID": self.name,
                         "kernelVersion": uname.release, "osImage": "detstream test node agent",
                         "containerRuntimeVersion": "process://0", "kubeletVersion": "v1.20.2",
                         "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux",
                         "architecture": self.labels["kubernetes.io/arch"]}}}, strategic=True)

    def renew(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_S, "renewTime": now(micro=True)}
        try:
            self.api.patch(path, {"spec": spec})
        except ApiError as exc:
            if exc.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.uid}
            self.api.create(path.rsplit("/", 1)[0], {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                                    "metadata": {"name": self.name, "ownerReferences": [owner]},
                                                    "spec": spec})

    def remove(self) -> None:
        for path in (f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}",
                     f"/api/v1/nodes/{self.name}"):
            try:
                self.api.delete(path)
            except ApiError:
                pass
