"""The real control plane (tests/cluster): etcd + kube-apiserver + kube-controller-manager v1.20.2,
driven through the machine's `kubectl`. Skipped only when DETSTREAM_SKIP_CLUSTER=1. The first run builds
Kubernetes (5-10 min on an idle 2-core machine, far longer on a busy one; then cached): hence the long timeout."""

from __future__ import annotations

import base64
import json

import pytest

from cluster.fixtures import SKIP
from helpers import wait_for

pytestmark = [pytest.mark.skipif(SKIP, reason="DETSTREAM_SKIP_CLUSTER=1"), pytest.mark.timeout(3600)]


def configmap(name: str, ns: str, owner: dict | None = None) -> str:
    meta = {"name": name, "namespace": ns}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"],
                                    "uid": owner["metadata"]["uid"]}]
    return json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": name}})


def test_lists_namespaces(kubectl):
    names = kubectl("get", "namespaces", "-o", "jsonpath={.items[*].metadata.name}").split()
    assert {"default", "kube-system", "kube-public"} <= set(names)
    version = json.loads(kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == "v1.20.2"


def test_garbage_collector_deletes_owned_objects(kubectl):
    kubectl("create", "namespace", "gc")
    kubectl("apply", "-f", "-", input=configmap("a", "gc"))
    owner = json.loads(kubectl("get", "configmap", "a", "-n", "gc", "-o", "json"))
    kubectl("apply", "-f", "-", input=configmap("b", "gc", owner=owner))
    assert kubectl("get", "configmap", "b", "-n", "gc", "-o", "jsonpath={.metadata.ownerReferences[0].uid}") \
        == owner["metadata"]["uid"]

    kubectl("delete", "configmap", "a", "-n", "gc", "--wait=true")
    wait_for(lambda: kubectl.run("get", "configmap", "b", "-n", "gc", check=False).returncode != 0,
             timeout=120, every=0.5, what="garbage collection of configmap b")
    assert "NotFound" in kubectl.run("get", "configmap", "b", "-n", "gc", check=False).stderr


def test_service_account_token_is_limited_by_rbac(kubectl):
    ns = "rbac"
    kubectl("create", "namespace", ns)
    kubectl("create", "configmap", "x", "-n", ns, "--from-literal=k=v")
    kubectl("create", "serviceaccount", "reader", "-n", ns)
    kubectl("create", "role", "cm-get", "-n", ns, "--verb=get", "--resource=configmaps")
    kubectl("create", "rolebinding", "reader-cm-get", "-n", ns, "--role=cm-get", f"--serviceaccount={ns}:reader")

    # Kubernetes 1.20: the token controller (kube-controller-manager) makes a token Secret per ServiceAccount.
    secret = wait_for(lambda: kubectl("get", "serviceaccount", "reader", "-n", ns, "-o",
                                      "jsonpath={.secrets[0].name}"), timeout=90, every=0.5,
                      what="the reader token Secret")
    token = base64.b64decode(kubectl("get", "secret", secret, "-n", ns, "-o", "jsonpath={.data.token}")).decode()

    got = kubectl.run("get", "configmap", "x", "-n", ns, "-o", "jsonpath={.data.k}", token=token)
    assert got.stdout == "v"
    denied = kubectl.run("delete", "configmap", "x", "-n", ns, token=token, check=False)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr, denied.stderr
    assert 'User "system:serviceaccount:rbac:reader" cannot delete resource "configmaps"' in denied.stderr
    assert kubectl("get", "configmap", "x", "-n", ns, "-o", "name") == "configmap/x\n"  # still there


CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.test.detstream.io}
spec:
  group: test.detstream.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, properties: {size: {type: integer}}}
          status: {type: object, properties: {phase: {type: string}}}
"""

WIDGET = """
apiVersion: test.detstream.io/v1
kind: Widget
metadata: {name: w, namespace: crd}
spec: {size: 3}
"""


def test_custom_resource_definition_with_status(kubectl):
    kubectl("create", "namespace", "crd")
    kubectl("apply", "-f", "-", input=CRD)
    kubectl("wait", "--for=condition=Established", "crd/widgets.test.detstream.io", "--timeout=60s")
    # discovery of the new group can lag a moment behind Established
    wait_for(lambda: kubectl.run("apply", "-f", "-", input=WIDGET, check=False).returncode == 0,
             timeout=30, every=0.5, what="the Widget to be accepted")
    assert kubectl("get", "widget", "w", "-n", "crd", "-o", "jsonpath={.spec.size}") == "3"

    # status is a subresource: writable through /status, and ignored in a write to the main resource
    kubectl("patch", "widget", "w", "-n", "crd", "--subresource=status", "--type=merge",
            "-p", '{"status": {"phase": "Ready"}}')
    kubectl("patch", "widget", "w", "-n", "crd", "--type=merge",
            "-p", '{"spec": {"size": 4}, "status": {"phase": "X"}}')
    widget = json.loads(kubectl("get", "widget", "w", "-n", "crd", "-o", "json"))
    assert widget["spec"]["size"] == 4 and widget["status"]["phase"] == "Ready"
