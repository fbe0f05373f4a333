"""The operator's only door to the Kubernetes API: apply children, prune strays, list pods.

Children are applied with server-side apply under one field manager, so applying the same
desired state twice changes nothing and a restarted operator converges without duplicates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kubernetes
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

FIELD_MANAGER = "detstream-operator"
PRUNED_KINDS = (("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "StatefulSet"), ("apps/v1", "Deployment"),
                ("networking.k8s.io/v1", "NetworkPolicy"))


def owner_reference(body: Mapping[str, Any]) -> dict:
    meta = body["metadata"]
    return {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


class Cluster:
    def __init__(self):
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        self.client = DynamicClient(kubernetes.client.ApiClient())
        self._resources: dict[tuple[str, str], object] = {}

    def resource(self, api_version: str, kind: str):
        key = (api_version, kind)
        if key not in self._resources:
            self._resources[key] = self.client.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    def apply(self, obj: dict, owner: Mapping[str, Any]) -> None:
        obj["metadata"]["ownerReferences"] = [owner_reference(owner)]
        self.resource(obj["apiVersion"], obj["kind"]).server_side_apply(
            body=obj, field_manager=FIELD_MANAGER, force_conflicts=True)

    def prune(self, namespace: str, session: str, keep: set[tuple[str, str]]) -> list[str]:
        """Delete the session's objects that are no longer wanted (e.g. a lane removed)."""
        gone = []
        for api_version, kind in PRUNED_KINDS:
            found = self.resource(api_version, kind).get(namespace=namespace,
                                                          label_selector=f"detstream.io/session={session}")
            for item in found.items:
                if (kind, item.metadata.name) not in keep:
                    try:
                        self.resource(api_version, kind).delete(name=item.metadata.name, namespace=namespace)
                    except NotFoundError:
                        pass
                    gone.append(f"{kind}/{item.metadata.name}")
        return gone

    def services(self, namespace: str, session: str, role: str) -> list[dict]:
        found = self.resource("v1", "Service").get(
            namespace=namespace, label_selector=f"detstream.io/session={session},app.kubernetes.io/component={role}")
        return sorted((item.to_dict() for item in found.items if item.spec.clusterIP != "None"),
                      key=lambda svc: svc["metadata"]["name"])

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def pods(self, namespace: str, session: str) -> list[dict]:
        found = self.resource("v1", "Pod").get(namespace=namespace, label_selector=f"detstream.io/session={session}")
        return [item.to_dict() for item in found.items]
