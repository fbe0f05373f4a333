"""The Helm chart, rendered by the real `helm` (`make tools` installs it into .tools/bin).

- `helm lint --strict`;
- `helm template` with default values, with every optional feature on (cluster-wide RBAC,
  metrics, PodMonitor, PrometheusRule, peering) and with several watched namespaces; every
  rendered object validated against the Kubernetes schemas of a current release
  (kubernetes-validate, strict); the CRD kinds it does not know (ServiceMonitor, PodMonitor,
  PrometheusRule, KopfPeering) checked against small schemas below, written from the
  prometheus-operator and kopf APIs for the fields the chart uses;
- the operator Deployment meets the restricted Pod Security Standard;
- RBAC is exactly the operator's list, in one place, for both modes;
- values.schema.json rejects wrong types with a message naming the field;
- the GitHub workflows pass actionlint.

Without helm/actionlint these tests skip, unless $CI is set: then they fail.
(helm install against a real API server comes with the operator.)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from helpers import ROOT, manifest, require

CHART = ROOT / "charts" / "detstream"
RELEASE, NAMESPACE = "ds", "detstream"
KUBERNETES_VERSIONS = sorted({"1.25.0", kubernetes_validate.latest_version()})  # the oldest it knows, the newest
ALL_ON = {"rbac": {"clusterWide": True}, "metrics": {"enabled": True, "additionalLabels": {"release": "kps"}},
          "podMonitor": {"enabled": True, "additionalLabels": {"release": "kps"}},
          "prometheusRule": {"enabled": True, "additionalLabels": {"release": "kps"}},
          "peering": {"enabled": True}, "replicas": 2}
NAMESPACED_ALL_ON = {**ALL_ON, "rbac": {"clusterWide": False}, "watchNamespaces": ["beamline-a", "beamline-b"]}
SCENARIOS = {"default": {}, "all-on": ALL_ON, "namespaced-all-on": NAMESPACED_ALL_ON}


def helm(*args: str, values: dict | None = None, tmp_path: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [require("helm"), *args]
    if values:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        cmd += ["-f", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def render(values: dict, tmp_path: Path) -> list[dict]:
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=values, tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(params=list(SCENARIOS), ids=list(SCENARIOS))
def rendered(request, tmp_path):
    return request.param, render(SCENARIOS[request.param], tmp_path)


def test_helm_lint_strict(tmp_path):
    for values in SCENARIOS.values():
        out = helm("lint", "--strict", str(CHART), values=values, tmp_path=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["apiVersion"], chart["name"], chart["version"], chart["appVersion"]) == ("v2", "detstream", "0.1.0",
                                                                                          "0.1.0")
    project = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in project, "appVersion follows the Python package's version"


# ---------------------------------------------------------------- what gets rendered

def test_default_values_render_the_namespaced_operator(tmp_path):
    docs = render({}, tmp_path)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
                            "Deployment", "ConfigMap", "ConfigMap", "ConfigMap"])
    (deploy,) = of_kind(docs, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert deploy["spec"]["replicas"] == 1
    assert container["image"] == "ghcr.io/detstream/detstream:0.1.0"
    assert container["args"] == ["operator", "--liveness-port", "8080", "--metrics-port", "9090",
                                 "--namespace", NAMESPACE, "--standalone"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["DETSTREAM_IMAGE"]["value"] == container["image"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    assert container["resources"] == yaml.safe_load((CHART / "values.yaml").read_text())["resources"]
    labels = deploy["metadata"]["labels"]
    for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by", "helm.sh/chart"):
        assert key in labels, key
    assert labels["helm.sh/chart"] == "detstream-0.1.0"
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deploy["spec"]["template"]["metadata"]["labels"].items()


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels only, as the sessions' policies use) picks these labels."""
    assert set(selector) == {"matchLabels"}, selector
    return selector["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("values", [{}, {"nameOverride": "daq"}, {"fullnameOverride": "beamline-operator"}],
                         ids=["default", "nameOverride", "fullnameOverride"])
def test_the_sessions_network_policy_lets_the_charts_operator_reach_the_control_ports(values, tmp_path):
    """On a cluster that enforces NetworkPolicy, the operator can start a session only if the session's
    policy admits its pod to the control port; other pods (another session's stages) are not admitted."""
    from detstream.operator import resources
    from detstream.services.model.plan import CLUSTER_PORTS
    from detstream.services.model.session import load_session

    (deploy,) = of_kind(render(values, tmp_path), "Deployment")
    operator_pod = deploy["spec"]["template"]["metadata"]["labels"]
    session = load_session({**manifest("s1"), "metadata": {"name": "s1", "namespace": "lab"}})
    policy = next(o for o in resources.children(session, "img") if o["kind"] == "NetworkPolicy")
    control = [{"port": CLUSTER_PORTS["control"], "protocol": "TCP"}]
    admitted = [peer for rule in policy["spec"]["ingress"] if rule.get("ports") in (None, control)
                for peer in rule["from"] if "podSelector" in peer]
    assert any(selects(peer["podSelector"], operator_pod) and peer.get("namespaceSelector") == {}
               for peer in admitted), (operator_pod, admitted)
    other_session = resources.labels(load_session(manifest("s2")), "worker")
    assert not any(selects(peer["podSelector"], other_session) for peer in admitted)


def test_all_features_on(tmp_path):
    docs = render(ALL_ON, tmp_path)
    kinds = {d["kind"] for d in docs}
    assert {"ClusterRole", "ClusterRoleBinding", "Service", "ServiceMonitor", "PodMonitor", "PrometheusRule",
            "ClusterKopfPeering"} <= kinds
    assert not {"Role", "RoleBinding", "KopfPeering"} & kinds
    (deploy,) = of_kind(docs, "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and "--namespace" not in args
    assert args[-2:] == ["--peering", "detstream"]
    assert deploy["spec"]["replicas"] == 2
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        (obj,) = of_kind(docs, kind)
        assert obj["metadata"]["labels"]["release"] == "kps", kind
    (pm,) = of_kind(docs, "PodMonitor")
    assert pm["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/part-of": "detstream"}}
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    assert {r["targetLabel"] for r in endpoint["relabelings"]} == {"session", "stage"}
    (sm,) = of_kind(docs, "ServiceMonitor")
    (svc,) = of_kind(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    # the operator's per-session gauges keep the session's namespace (detstream_session_frames)
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    assert svc["spec"]["ports"][0]["port"] == 9090


def test_watched_namespaces_get_roles_and_peerings(tmp_path):
    docs = render(NAMESPACED_ALL_ON, tmp_path)
    watched = ["beamline-a", "beamline-b"]
    assert sorted(r["metadata"]["namespace"] for r in of_kind(docs, "Role")) == watched
    assert sorted(r["metadata"]["namespace"] for r in of_kind(docs, "RoleBinding")) == watched
    assert sorted(p["metadata"]["namespace"] for p in of_kind(docs, "KopfPeering")) == watched
    for binding in of_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-detstream",
                                        "namespace": NAMESPACE}]
    (deploy,) = of_kind(docs, "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--metrics-port") + 2:] == ["--namespace", "beamline-a", "--namespace", "beamline-b",
                                                         "--peering", "detstream"]
    (pm,) = of_kind(docs, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": watched}


def test_dashboards_are_configmaps_with_the_sidecar_label(tmp_path):
    files = {p.name: json.loads(p.read_text()) for p in (CHART / "dashboards").glob("*.json")}
    maps = of_kind(render({}, tmp_path), "ConfigMap")
    assert len(maps) == len(files) == 3
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = cm["data"].items()
        assert json.loads(text) == files[name]
    custom = render({"dashboards": {"label": "dashboards", "labelValue": "detstream", "namespace": "monitoring",
                                    "annotations": {"grafana_folder": "detstream"}}}, tmp_path)
    for cm in of_kind(custom, "ConfigMap"):
        assert cm["metadata"]["labels"]["dashboards"] == "detstream"
        assert cm["metadata"]["namespace"] == "monitoring"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "detstream"}
    assert not of_kind(render({"dashboards": {"enabled": False}}, tmp_path), "ConfigMap")


def test_prometheusrule_is_the_rule_file(tmp_path):
    (rule,) = of_kind(render({"prometheusRule": {"enabled": True}}, tmp_path), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "alerts" / "detstream-rules.yaml").read_text())
    # and Prometheus itself accepts what the PrometheusRule carries
    path = tmp_path / "from-chart.rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    out = subprocess.run([require("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_replicas_above_one_need_peering(tmp_path):
    out = helm("template", RELEASE, str(CHART), values={"replicas": 2}, tmp_path=tmp_path)
    assert out.returncode != 0
    assert "replicas > 1 needs peering.enabled=true" in out.stderr


def test_notes_tell_how_to_start_and_watch_a_session(tmp_path):
    out = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert f"kubectl apply -n {NAMESPACE} -f" in notes and "kind: StreamingSession" in notes
    assert f"kubectl -n {NAMESPACE} get sess -w" in notes
    assert "grafana_dashboard=1" in notes and "operator, overview, pipeline" in notes


# ---------------------------------------------------------------- schemas

def test_every_object_is_valid_kubernetes(rendered):
    _, docs = rendered
    for doc in docs:
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_probes_are_http_requests_not_processes(rendered):
    """An exec probe starts a process (for `detstream`, a Python: ~0.2 CPU-s) every period."""
    _, docs = rendered
    for deploy in of_kind(docs, "Deployment"):
        for container in deploy["spec"]["template"]["spec"]["containers"]:
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert "exec" not in container.get(probe, {}), (deploy["metadata"]["name"], probe)


def test_the_charts_crds_are_valid_kubernetes():
    """crds/ is the team lead's (`make crd`); the chart only ships it, and checks it is valid."""
    crds = [doc for path in sorted((CHART / "crds").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc]
    assert crds, "no CRD in charts/detstream/crds (`make crd` writes it)"
    for crd in crds:
        assert crd["kind"] == "CustomResourceDefinition"
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(crd, version, strict=True)
    assert "streamingsessions.detstream.io" in {c["metadata"]["name"] for c in crds}


def _obj(props: dict, required=(), extra: bool = False) -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": extra}


_STR, _BOOL, _INT = {"type": "string"}, {"type": "boolean"}, {"type": "integer"}
_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABELS_SELECTOR = _obj({"matchLabels": _MAP, "matchExpressions": {"type": "array"}})
_NS_SELECTOR = _obj({"any": _BOOL, "matchNames": {"type": "array", "items": _STR}})
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_RELABEL = _obj({"sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
                 "targetLabel": _STR, "regex": _STR, "replacement": _STR, "separator": _STR, "modulus": _INT,
                 "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                                     "lowercase", "uppercase", "keepequal", "dropequal"]}})
_ENDPOINT = {"port": _STR, "path": _STR, "interval": _DURATION, "scrapeTimeout": _DURATION, "scheme": _STR,
             "honorLabels": _BOOL, "relabelings": {"type": "array", "items": _RELABEL},
             "metricRelabelings": {"type": "array", "items": _RELABEL}}


def _resource(api_version: str, kind: str, spec: dict | None, namespaced: bool = True) -> dict:
    meta = _obj({"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                 "namespace": _STR, "labels": _MAP, "annotations": _MAP},
                required=["name", "namespace"] if namespaced else ["name"])
    if not namespaced:
        meta["not"] = {"required": ["namespace"]}
    props = {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": meta}
    if spec is not None:
        props["spec"] = spec
    return _obj(props, required=["apiVersion", "kind", "metadata"] + (["spec"] if spec else []))


# monitoring.coreos.com/v1 (prometheus-operator) and kopf.dev/v1, for the fields the chart renders
CRD_SCHEMAS = {
    "ServiceMonitor": _resource("monitoring.coreos.com/v1", "ServiceMonitor", _obj({
        "selector": _LABELS_SELECTOR, "namespaceSelector": _NS_SELECTOR, "jobLabel": _STR,
        "endpoints": {"type": "array", "minItems": 1, "items": _obj(_ENDPOINT, required=["port"])}},
        required=["selector", "endpoints"])),
    "PodMonitor": _resource("monitoring.coreos.com/v1", "PodMonitor", _obj({
        "selector": _LABELS_SELECTOR, "namespaceSelector": _NS_SELECTOR, "jobLabel": _STR,
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _obj(_ENDPOINT, required=["port"])}},
        required=["selector", "podMetricsEndpoints"])),
    "PrometheusRule": _resource("monitoring.coreos.com/v1", "PrometheusRule", _obj({
        "groups": {"type": "array", "minItems": 1, "items": _obj({
            "name": _STR, "interval": _DURATION,
            "rules": {"type": "array", "items": _obj({
                "alert": _STR, "record": _STR, "expr": {"type": "string", "minLength": 1}, "for": _DURATION,
                "labels": _MAP, "annotations": _MAP}, required=["expr"])}}, required=["name", "rules"])}},
        required=["groups"])),
    "KopfPeering": _resource("kopf.dev/v1", "KopfPeering", None),
    "ClusterKopfPeering": _resource("kopf.dev/v1", "ClusterKopfPeering", None, namespaced=False),
}


def test_crd_schemas_catch_mistakes(tmp_path):
    """The hand-written CRD schemas are strict enough to be worth something."""
    docs = render(ALL_ON, tmp_path)
    (pm,) = of_kind(docs, "PodMonitor")
    pm["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pm, CRD_SCHEMAS["PodMonitor"])
    (rule,) = of_kind(docs, "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, CRD_SCHEMAS["PrometheusRule"])
    (peering,) = of_kind(docs, "ClusterKopfPeering")
    peering["metadata"]["namespace"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(peering, CRD_SCHEMAS["ClusterKopfPeering"])


@pytest.mark.parametrize("values, field, words", [
    ({"replicas": "two"}, "/replicas", "got string, want integer"),
    ({"rbac": {"clusterWide": "yes"}}, "/rbac/clusterWide", "got string, want boolean"),
    ({"watchNamespaces": "beamline-a"}, "/watchNamespaces", "got string, want array"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "Always"),
    ({"metrics": {"port": 70000}}, "/metrics/port", "maximum"),
    ({"replica": 2}, "", "'replica' not allowed"),
], ids=["replicas", "clusterWide", "watchNamespaces", "pullPolicy", "port", "typo"])
def test_values_schema_rejects_wrong_values_naming_the_field(values, field, words, tmp_path):
    out = helm("template", RELEASE, str(CHART), values=values, tmp_path=tmp_path)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr
    assert f"at '{field}'" in out.stderr and words in out.stderr, out.stderr


# ---------------------------------------------------------------- security

def test_operator_pod_meets_the_restricted_pod_security_standard(rendered):
    _, docs = rendered
    (deploy,) = of_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), key
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= {"emptyDir", "configMap", "secret", "projected", "downwardAPI"}, volume
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    for container in pod["containers"] + pod.get("initContainers", []):
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not ctx.get("privileged")
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        assert not any(p.get("hostPort") for p in container.get("ports", []))
        assert "limits" in container["resources"] and "requests" in container["resources"]


# The operator's permissions: what it uses and no more (tests/test_helm_install.py runs it under them).
CHILDREN = {"list", "create", "patch", "delete"}  # server-side apply (PATCH; creating needs create), prune
OPERATOR_RULES = {
    ("detstream.io", "streamingsessions"): {"list", "watch", "patch"},
    ("detstream.io", "streamingsessions/status"): {"patch"},
    ("", "configmaps"): CHILDREN,
    ("", "services"): CHILDREN,
    ("apps", "deployments"): CHILDREN,
    ("apps", "statefulsets"): CHILDREN,
    ("networking.k8s.io", "networkpolicies"): CHILDREN,
    ("", "pods"): {"list"},
    ("", "events"): {"create"},
}
PEERING = {"list", "watch", "patch"}
CRD_DISCOVERY = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
NAMESPACE_DISCOVERY = {("", "namespaces"): {"list", "watch"}}  # kopf, when given namespaces


def permissions(role: dict) -> dict:
    granted: dict = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_namespaced_rbac_is_exactly_the_operators_list(tmp_path):
    docs = render({}, tmp_path)
    (role,) = of_kind(docs, "Role")
    assert permissions(role) == OPERATOR_RULES  # standalone: no peering
    (cluster_role,) = of_kind(docs, "ClusterRole")
    assert permissions(cluster_role) == {**CRD_DISCOVERY, **NAMESPACE_DISCOVERY}
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    (sa,) = of_kind(docs, "ServiceAccount")
    (deploy,) = of_kind(docs, "Deployment")
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    for b in of_kind(docs, "RoleBinding") + [binding]:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]


def test_peering_adds_only_its_peering_object(tmp_path):
    for role in of_kind(render(NAMESPACED_ALL_ON, tmp_path), "Role"):
        assert permissions(role) == {**OPERATOR_RULES, ("kopf.dev", "kopfpeerings"): PEERING}


def test_cluster_wide_rbac_is_the_same_list_plus_crd_discovery(tmp_path):
    assert permissions(of_kind(render({"rbac": {"clusterWide": True}}, tmp_path), "ClusterRole")[0]) == \
        {**OPERATOR_RULES, **CRD_DISCOVERY}
    docs = render({"rbac": {"clusterWide": True}, "peering": {"enabled": True}}, tmp_path)
    assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")
    (cluster_role,) = of_kind(docs, "ClusterRole")
    assert permissions(cluster_role) == {**OPERATOR_RULES, **CRD_DISCOVERY,
                                         ("kopf.dev", "clusterkopfpeerings"): PEERING}
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": cluster_role["metadata"]["name"]}
    assert NAMESPACE in cluster_role["metadata"]["name"], "cluster-scoped names carry the release namespace"


def test_rbac_list_lives_in_one_helper():
    rbac = (CHART / "templates" / "rbac.yaml").read_text()
    assert rbac.count('include "detstream.operatorRules"') == 2
    assert "verbs:" not in rbac, "rules belong in _helpers.tpl (detstream.operatorRules)"


# ---------------------------------------------------------------- workflows

def test_workflows_pass_actionlint():
    actionlint = require("actionlint")
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert {p.name for p in workflows} >= {"ci.yml", "release.yml"}
    out = subprocess.run([actionlint, "-no-color", *map(str, workflows)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_release_workflow_does_what_a_release_needs():
    release = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    assert release[True]["push"]["tags"] == ["v*"]  # YAML 1.1 reads the key `on` as True
    steps = {job: " ".join(json.dumps(s) for s in spec["steps"]) for job, spec in release["jobs"].items()}
    assert "docker/build-push-action" in steps["image"] and "linux/amd64,linux/arm64" in steps["image"]
    assert "docker/metadata-action" in steps["image"] and "type=semver" in steps["image"]
    assert "helm push" in steps["chart"] and "oci://ghcr.io/" in steps["chart"]
    assert "helm/kind-action" in steps["e2e"] and "kind load docker-image" in steps["e2e"]
    assert "kubectl apply -n detstream -f examples/4dstem.yaml" in steps["e2e"]
    assert "--for=jsonpath='{.status.phase}'=Succeeded" in steps["e2e"]
