"""`helm install` / `helm upgrade` / `helm uninstall` of charts/detstream against a real kube-apiserver
(v1.20.2 with its controller-manager, tests/cluster/), and the chart's RBAC proven sufficient and minimal.

There is no scheduler or kubelet: the operator Deployment's pod stays Pending (so the image does not
matter). The operator under test runs instead as a local process, with the arguments of the installed
Deployment and a kubeconfig that holds nothing but the token of the chart's ServiceAccount (1.20: the
token controller writes it into a Secret), so the API server authorizes it exactly as the pod's.
(tests/test_e2e_cluster.py runs the installed operator pod itself, on the test node agent.)
"""

from __future__ import annotations

import base64
import json
import os

import pytest
import yaml

from cluster.fixtures import RBAC_DENIAL
from helpers import DETSTREAM, ROOT, Background, manifest, wait_for

CHART = ROOT / "charts" / "detstream"
CRDS = {"streamingsessions.detstream.io", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}
# Records, not objects of a release; and kinds the listing below need not ask for.
UNLISTED = {"events", "events.events.k8s.io", "componentstatuses"}

pytestmark = pytest.mark.timeout(900)  # the first test may wait for the control plane to start


def wait_until(predicate, what: str, timeout: float = 60.0):
    return wait_for(predicate, timeout, what)


def get_json(kubectl, *args):
    out = kubectl.run("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


_listable: list[str] = []


def release_objects(kubectl, release: str) -> set[tuple[str, str, str, bool]]:
    """Every object, namespaced or cluster-scoped, labelled as the release's: (kind, namespace, name,
    made by a controller rather than by Helm)."""
    if not _listable:
        names = kubectl("api-resources", "--verbs=list", "-o", "name").split()
        _listable.extend(n for n in names if n not in UNLISTED)
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/managed-by=Helm"
    items = json.loads(kubectl("get", ",".join(_listable), "-A", "-l", selector, "-o", "json"))["items"]
    return {(i["kind"], i["metadata"].get("namespace", ""), i["metadata"]["name"],
             bool(i["metadata"].get("ownerReferences"))) for i in items}


def made_by_helm(objects) -> set[tuple[str, str, str]]:
    return {(kind, ns, name) for kind, ns, name, owned in objects if not owned}


def manifest_objects(helm, release: str, namespace: str) -> set[tuple[str, str, str]]:
    docs = [d for d in yaml.safe_load_all(helm("get", "manifest", release, "-n", namespace).stdout) if d]
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    return {(d["kind"], "" if d["kind"] in cluster_scoped else d["metadata"].get("namespace", namespace),
             d["metadata"]["name"]) for d in docs}


def operator_container(kubectl, namespace: str, name: str) -> dict:
    return get_json(kubectl, "deployment", name, "-n", namespace)["spec"]["template"]["spec"]["containers"][0]


# ------------------------------------------------------------------------------ install/upgrade/uninstall

def test_install_upgrade_uninstall_leave_only_the_crds(kubectl, helm):
    release, ns, other = "life", "helm-life", "helm-life-b"
    kubectl("create", "namespace", other)  # a second watched namespace, for the upgrade
    assert release_objects(kubectl, release) == set()

    helm("install", release, str(CHART), "-n", ns, "--create-namespace")
    installed = release_objects(kubectl, release)
    fullname, cluster_name = f"{release}-detstream", f"{ns}-{release}-detstream-observer"
    expected = {("ServiceAccount", ns, fullname), ("Deployment", ns, fullname), ("Role", ns, fullname),
                ("RoleBinding", ns, fullname), ("ClusterRole", "", cluster_name),
                ("ClusterRoleBinding", "", cluster_name),
                *{("ConfigMap", ns, f"{fullname}-dashboard-{d}") for d in ("operator", "overview", "pipeline")}}
    assert made_by_helm(installed) == expected == manifest_objects(helm, release, ns)
    assert {(k, n) for k, n, _, owned in installed if owned} <= {("ReplicaSet", ns), ("Pod", ns)}
    assert set(kubectl("get", "crd", "-o", "name").replace("customresourcedefinition.apiextensions.k8s.io/",
                                                                   "").split()) >= CRDS
    assert operator_container(kubectl, ns, fullname)["args"][-3:] == ["--namespace", ns, "--standalone"]
    # The Deployment controller acts on it (its ReplicaSet and Pod carry the release's labels too).
    wait_until(lambda: {"ReplicaSet", "Pod"} <= {k for k, _, _, owned in release_objects(kubectl, release) if owned},
               "the Deployment's ReplicaSet and Pod")

    # Upgrade: dashboards off, a second watched namespace.
    helm("upgrade", release, str(CHART), "-n", ns, values={"dashboards": {"enabled": False},
                                                          "watchNamespaces": [ns, other]})
    upgraded = made_by_helm(release_objects(kubectl, release))
    assert upgraded == manifest_objects(helm, release, ns)
    assert not {o for o in upgraded if o[0] == "ConfigMap"}, "the dashboards are gone"
    assert {("Role", other, fullname), ("RoleBinding", other, fullname)} <= upgraded
    assert upgraded == (expected - {o for o in expected if o[0] == "ConfigMap"}) | {
        ("Role", other, fullname), ("RoleBinding", other, fullname)}
    rules = [get_json(kubectl, "role", fullname, "-n", n)["rules"] for n in (ns, other)]
    assert rules[0] == rules[1]
    args = operator_container(kubectl, ns, fullname)["args"]
    assert args[args.index("--metrics-port") + 2:] == ["--namespace", ns, "--namespace", other, "--standalone"]
    status = json.loads(helm("status", release, "-n", ns, "-o", "json").stdout)
    assert status["version"] == 2 and status["info"]["status"] == "deployed"

    token_secret = get_json(kubectl, "serviceaccount", fullname, "-n", ns)["secrets"][0]["name"]
    helm("uninstall", release, "-n", ns)
    # Helm deletes what it made; the garbage collector then the ReplicaSet and Pod, the token
    # controller the ServiceAccount's token Secret.
    wait_until(lambda: release_objects(kubectl, release) == set(), "nothing left of the release")
    wait_until(lambda: get_json(kubectl, "secret", token_secret, "-n", ns) is None, "the token Secret gone")
    assert json.loads(kubectl("get", "secrets", "-A", "-l", f"owner=helm,name={release}", "-o", "json"))["items"] == []
    assert set(kubectl("get", "crd", "-o", "name").replace("customresourcedefinition.apiextensions.k8s.io/",
                                                                   "").split()) >= CRDS, "Helm keeps the CRDs"
    kubectl.run("delete", "namespace", ns, other, "--wait=false", check=False)


# ------------------------------------------------------------------------------------------------ RBAC

MODES = {
    "namespaced": {"release": "nsop", "namespace": "rbac-ns", "sessions": "rbac-ns", "values": {}},
    "cluster-wide": {"release": "cwop", "namespace": "rbac-cw", "sessions": "rbac-cw-sessions",
                     "values": {"rbac": {"clusterWide": True}, "peering": {"enabled": True}}},
}


def service_account_token(kubectl, namespace: str, name: str) -> tuple[str, str]:
    secret = wait_until(lambda: (get_json(kubectl, "serviceaccount", name, "-n", namespace) or {}).get("secrets"),
                        "the ServiceAccount's token Secret")[0]["name"]
    data = wait_until(lambda: (get_json(kubectl, "secret", secret, "-n", namespace) or {}).get("data", {}).get("token"),
                      "the token")
    return secret, base64.b64decode(data).decode()


def token_kubeconfig(cp, token: str, path) -> None:
    """A kubeconfig with the token only: a client certificate would authenticate as admin first."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "test", "cluster": {"server": cp.server, "certificate-authority": str(cp.ca_file)}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": "sa"}}]}))
    path.chmod(0o600)


def start_local_operator(container: dict, kubeconfig, namespace: str, log_path) -> Background:
    """`detstream operator` with the installed Deployment's arguments, as a local process."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")},
           **env, "KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": namespace}
    # the chart's arguments; the ports last (the last occurrence wins), off: this is not a pod
    return Background(DETSTREAM + container["args"] + ["--liveness-port", "0", "--metrics-port", "0"], log_path, env)


def can_i(kubectl, token: str, verb: str, resource: str, namespace: str | None) -> str:
    resource, _, sub = resource.partition("/")  # kubectl reads TYPE/NAME: a subresource is a flag
    scope = (["-n", namespace] if namespace else []) + ([f"--subresource={sub}"] if sub else [])
    return kubectl.run("auth", "can-i", verb, resource, *scope, token=token, check=False).stdout.strip()


def children(kubectl, namespace: str, session: str) -> set[tuple[str, str]]:
    items = get_json(kubectl, "configmaps,services,statefulsets,deployments,networkpolicies", "-n", namespace,
                     "-l", f"detstream.io/session={session}")["items"]
    return {(i["kind"], i["metadata"]["name"]) for i in items}


@pytest.mark.parametrize("mode", list(MODES))
def test_the_chart_rbac_is_enough_for_the_operator_and_no_more(mode, kubectl, helm, tmp_path):
    m = MODES[mode]
    release, ns, sessions = m["release"], m["namespace"], m["sessions"]
    fullname = f"{release}-detstream"
    helm("install", release, str(CHART), "-n", ns, "--create-namespace", values=m["values"])
    if sessions != ns:
        kubectl("create", "namespace", sessions)
    operator = None
    try:
        token_secret, token = service_account_token(kubectl, ns, fullname)
        config = tmp_path / "serviceaccount.kubeconfig"
        token_kubeconfig(kubectl.cp, token, config)
        assert "client-certificate" not in config.read_text() and "client-key" not in config.read_text()
        container = operator_container(kubectl, ns, fullname)
        operator = start_local_operator(container, config, ns, tmp_path / "operator.log")

        # A session: children created and owned, status written (Pending: no kubelet).
        doc = manifest("rbac", lanes=2)
        kubectl("apply", "-n", sessions, "-f", "-", input=yaml.safe_dump(doc))
        lanes2 = {("Service", "rbac-distributor-1")}  # the second lane's Service
        wanted = {("ConfigMap", "rbac-plan"), ("Deployment", "rbac-worker"), ("StatefulSet", "rbac-writer"),
                  ("NetworkPolicy", "rbac-stages"), ("Service", "rbac-writer-0"), *lanes2}
        wait_until(lambda: wanted <= children(kubectl, sessions, "rbac"), "the session's children", timeout=90)
        session = wait_until(lambda: (lambda s: (s.get("status") or {}).get("phase") == "Pending" and s)(
            get_json(kubectl, "sess", "rbac", "-n", sessions)), "status Pending")
        assert session["status"]["observedGeneration"] == session["metadata"]["generation"]
        assert "detstream.io/drain" in session["metadata"]["finalizers"]
        uid = session["metadata"]["uid"]
        for item in get_json(kubectl, "deployments,statefulsets,configmaps", "-n", sessions,
                             "-l", "detstream.io/session=rbac")["items"]:
            assert [o["uid"] for o in item["metadata"]["ownerReferences"]] == [uid], item["metadata"]["name"]

        # Prune (list + delete), scale (apply again), then delete: the finalizer is released.
        doc["spec"]["lanes"] = 1
        kubectl("apply", "-n", sessions, "-f", "-", input=yaml.safe_dump(doc))
        wait_until(lambda: not lanes2 & children(kubectl, sessions, "rbac"), "the second lane pruned")
        kubectl("scale", "-n", sessions, "sess/rbac", "--replicas=3")
        wait_until(lambda: get_json(kubectl, "deployment", "rbac-worker", "-n", sessions)["spec"]["replicas"] == 3,
                   "3 workers")
        if mode == "cluster-wide":  # peering: the operator announces itself in the ClusterKopfPeering
            wait_until(lambda: (get_json(kubectl, "clusterkopfpeering", "detstream") or {}).get("status"),
                       "the operator in the peering object")
        kubectl("delete", "-n", sessions, "sess/rbac", "--timeout=60s")
        wait_until(lambda: not children(kubectl, sessions, "rbac"), "garbage collection of the children")
    finally:
        if operator:
            operator.stop()
            print(operator.log()[-6000:])  # shown when the test fails
    log = operator.log()
    assert "Handler 'reconcile' succeeded" in log and "Handler 'drain' succeeded" in log, log[-3000:]
    denials = [line for line in log.splitlines() if RBAC_DENIAL.search(line)]
    assert not denials, "\n".join(denials)

    # What it does not need, it may not do: asked (SelfSubjectAccessReview) ...
    allowed = [("patch", "streamingsessions", sessions), ("patch", "streamingsessions/status", sessions),
               ("create", "deployments.apps", sessions), ("delete", "services", sessions),
               ("list", "pods", sessions), ("create", "events", sessions),
               ("watch", "customresourcedefinitions", None)]
    denied = [("delete", "nodes", None), ("get", "nodes", None), ("create", "clusterroles", None),
              ("create", "clusterrolebindings", None), ("create", "rolebindings", sessions),
              ("escalate", "roles", sessions), ("impersonate", "serviceaccounts", sessions),
              ("delete", "customresourcedefinitions", None), ("get", "secrets", ns), ("list", "secrets", sessions),
              ("get", "secrets", "kube-system"), ("create", "pods", sessions), ("delete", "pods", sessions),
              ("create", "streamingsessions", sessions), ("delete", "streamingsessions", sessions),
              ("update", "streamingsessions", sessions), ("update", "deployments.apps", sessions),
              ("get", "configmaps", sessions), ("watch", "pods", sessions)]
    if mode == "namespaced":
        allowed += [("list", "namespaces", None)]
        denied += [("create", "deployments.apps", "default"), ("list", "streamingsessions", "default"),
                   ("list", "kopfpeerings.kopf.dev", ns)]
    else:
        allowed += [("patch", "clusterkopfpeerings.kopf.dev", None), ("list", "streamingsessions", "default")]
        denied += [("list", "namespaces", None), ("get", "secrets", "default")]
    answers = {(verb, res, where): can_i(kubectl, token, verb, res, where) for verb, res, where in allowed + denied}
    assert {k: v for k, v in answers.items() if k in allowed and v != "yes"} == {}
    assert {k: v for k, v in answers.items() if k in denied and v != "no"} == {}

    # ... and tried (server-side dry runs, so that a wrongly allowed request changes nothing).
    tries = [["get", "secret", token_secret, "-n", ns], ["get", "secrets", "-n", "kube-system"],
             ["delete", "crd", "streamingsessions.detstream.io", "--dry-run=server"],
             ["delete", "nodes", "--all", "--dry-run=server"],
             ["create", "clusterrole", "probe", "--verb=get", "--resource=pods", "--dry-run=server"],
             ["run", "probe", "--image=probe", "-n", sessions, "--dry-run=server"]]
    if mode == "namespaced":  # a cluster-wide operator may run stages in any namespace, by design
        tries.append(["create", "deployment", "probe", "--image=probe", "-n", "kube-system", "--dry-run=server"])
    for args in tries:
        out = kubectl.run(*args, token=token, check=False)
        assert out.returncode != 0 and "forbidden" in out.stderr.lower(), (args, out.stdout, out.stderr)
    assert kubectl.run("get", "sess", "-n", sessions, token=token).returncode == 0  # the token itself works

    helm("uninstall", release, "-n", ns)
    wait_until(lambda: release_objects(kubectl, release) == set(), "nothing left of the release")
    kubectl.run("delete", "namespace", *sorted({ns, sessions}), "--wait=false", check=False)
