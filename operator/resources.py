"""Pure builders: a session and its plan in, the Kubernetes objects that run it out.

Per session: a ConfigMap holding the plan; per indexed role (source, distributor,
writer) a StatefulSet with a headless Service, plus one Service per replica named as the plan
addresses it (`SESSION-ROLE-INDEX`); the worker pool is a Deployment (scaled by the session's
scale subresource), or, routed by slice (tomography: worker k owns band k of the detector rows), a
StatefulSet with a headless Service, so that a restarted worker keeps its ordinal and takes its band
again. Pods bind to their own IP ($POD_IP) and are probed over HTTP on their metrics port (/readyz, /healthz).
With spec.liveView on, the writer's Service also serves the live view (port `live`), open to any client (a
read-only page), and, when the operator is given an Ingress host (the chart's liveView.ingress), an Ingress
routes http://HOST/NAMESPACE/SESSION/ to it.
"""

from __future__ import annotations

import hashlib
import json
import os

from detstream.operator import keys
from detstream.services.model.plan import CLUSTER_PORTS, LIVE_PORT, ClusterNetwork, Plan, build_plan, port_names
from detstream.services.model.schema import to_manifest
from detstream.services.model.session import Session
from detstream.services.plugins import plugin_class, session_bands
from detstream.services.runtime.stage import STAGE_ENV

PLAN_DIR = "/etc/detstream"
OUTPUT_DIR = "/data"
INDEXED_ROLES = ("source", "distributor", "writer")
SPEC_HASH = "detstream.io/spec-hash"
UID = 10001
# The live view's Ingress, set by `detstream operator --live-ingress-host/--live-ingress-class` (the chart's
# liveView.ingress values): no host, no Ingress.
INGRESS_HOST_ENV, INGRESS_CLASS_ENV = "DETSTREAM_LIVE_INGRESS_HOST", "DETSTREAM_LIVE_INGRESS_CLASS"


def labels(session: Session, role: str | None = None) -> dict:
    out = {"app.kubernetes.io/name": "detstream", "app.kubernetes.io/instance": session.name,
           "app.kubernetes.io/part-of": "detstream", "app.kubernetes.io/managed-by": "detstream-operator",
           "detstream.io/session": session.name}
    if role:
        out["app.kubernetes.io/component"] = role
    return out


def selector(session: Session, role: str) -> dict:
    return {"detstream.io/session": session.name, "app.kubernetes.io/component": role}


def worker_selector(session: Session) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(session, "worker").items())


def rollout_hash(session: Session) -> str:
    """What, when changed, needs the stages restarted: all of the spec but the worker count
    (the Deployment scales; routed by slice, the bands follow it, so every stage restarts) and the plugin
    parameters (pushed live over gRPC)."""
    spec = to_manifest(session.spec)
    if not session_bands(session.spec).keyed:
        spec["workers"].pop("replicas")
    spec["plugin"].pop("params")
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cluster_plan(session: Session) -> Plan:
    return build_plan(session, ClusterNetwork())


def plan_configmap(session: Session, plan: Plan) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{session.name}-plan", "namespace": session.namespace, "labels": labels(session)},
            "data": {"plan.json": plan.to_json()}}


def container(session: Session, role: str, image: str, plan: Plan) -> dict:
    k8s = session.spec.kubernetes
    ports = port_names(session, role)
    args = ["stage", role, "--plan", f"{PLAN_DIR}/plan.json"]
    if role == "worker" and not session_bands(session.spec).keyed:
        # a Deployment's pods are all worker 0 of the plan; their names end in a random suffix, which `stage`
        # would otherwise read as an ordinal when it is all digits (7 of 27 letters are: 1 pod in ~800)
        args += ["--index", "0"]
    mounts = [{"name": "plan", "mountPath": PLAN_DIR, "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}]
    if role == "writer":
        args += ["--output", OUTPUT_DIR]
        mounts.append({"name": "output", "mountPath": OUTPUT_DIR})
    elif role == "worker" and plugin_files(session):
        mounts.append({"name": "output", "mountPath": OUTPUT_DIR, "readOnly": True})  # e.g. a dark reference
    env_keys = []
    if keys.needs_keys(session):
        mounts.append({"name": "keys", "mountPath": keys.KEYS_DIR, "readOnly": True})
        env_keys = [{"name": "DETSTREAM_KEYS", "value": keys.KEYS_DIR}]
    # HTTP on the metrics port (plain HTTP also under mutual TLS): one request per probe, no process
    probe = {"periodSeconds": 2, "timeoutSeconds": 5}
    check = lambda path: {"httpGet": {"path": path, "port": "metrics"}}  # noqa: E731
    field = lambda path: {"valueFrom": {"fieldRef": {"fieldPath": path}}}  # noqa: E731
    return {
        "name": "stage", "image": image, "imagePullPolicy": k8s.image_pull_policy, "args": args,
        "env": [{"name": "POD_NAME", **field("metadata.name")},
                {"name": "POD_NAMESPACE", **field("metadata.namespace")},
                {"name": "POD_IP", **field("status.podIP")}, *env_keys,
                *({"name": name, "value": value} for name, value in STAGE_ENV.items())],
        "ports": [{"name": name, "containerPort": CLUSTER_PORTS[name], "protocol": "TCP"} for name in ports],
        "readinessProbe": {**check("/readyz"), **probe, "failureThreshold": 3},
        # A hung stage is restarted after its loop stalled STALL_S and then 3 failed probes.
        "livenessProbe": {**check("/healthz"), **probe, "periodSeconds": 5, "failureThreshold": 3},
        "resources": getattr(k8s.resources, role),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }


def pod_template(session: Session, role: str, image: str, plan: Plan) -> dict:
    volumes = [{"name": "plan", "configMap": {"name": f"{session.name}-plan"}}, {"name": "tmp", "emptyDir": {}}]
    if keys.needs_keys(session):
        volumes.append(keys.keys_volume(session, plan, role))
    claim = session.spec.output.volume_claim
    if role == "writer":
        volumes.append({"name": "output", **({"persistentVolumeClaim": {"claimName": claim}} if claim
                                             else {"emptyDir": {}})})
    elif role == "worker" and plugin_files(session):
        volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    spec = {"containers": [container(session, role, image, plan)], "volumes": volumes,
            "automountServiceAccountToken": False, "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 30,
            "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                                "seccompProfile": {"type": "RuntimeDefault"}}}
    if session.spec.kubernetes.node_selector:
        spec["nodeSelector"] = dict(session.spec.kubernetes.node_selector)
    return {"metadata": {"labels": labels(session, role), "annotations": {SPEC_HASH: rollout_hash(session)}},
            "spec": spec}


def workload(session: Session, role: str, replicas: int, image: str, plan: Plan) -> dict:
    meta = {"name": f"{session.name}-{role}", "namespace": session.namespace, "labels": labels(session, role)}
    spec = {"replicas": replicas, "selector": {"matchLabels": selector(session, role)},
            "template": pod_template(session, role, image, plan)}
    if role == "worker" and not session_bands(session.spec).keyed:
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}
    spec.update(serviceName=f"{session.name}-{role}", podManagementPolicy="Parallel")
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta, "spec": spec}


def headless(session: Session, role: str) -> dict:
    """The headless Service of a role's StatefulSet (its pods' network identity)."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"{session.name}-{role}", "namespace": session.namespace,
                         "labels": labels(session, role)},
            "spec": {"clusterIP": "None", "selector": selector(session, role),
                     "ports": [{"name": "control", "port": CLUSTER_PORTS["control"], "protocol": "TCP"}]}}


def services(session: Session, plan: Plan) -> list[dict]:
    """A headless Service per StatefulSet, and one Service per replica as the plan addresses it."""
    out = [headless(session, "worker")] if session_bands(session.spec).keyed else []
    for role in INDEXED_ROLES:
        stages = plan.of_role(role)
        if not stages:
            continue
        out.append(headless(session, role))
        for stage in stages:
            external = role == "distributor" and session.spec.source.kind == "external"
            spec = {"selector": {"statefulset.kubernetes.io/pod-name": stage.host},
                    "ports": [{"name": name, "port": port, "targetPort": port, "protocol": "TCP"}
                              for name, port in stage.ports.items()],
                    "publishNotReadyAddresses": True}
            if external:
                spec["type"] = session.spec.kubernetes.ingest_service_type
            out.append({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": stage.host, "namespace": session.namespace,
                                     "labels": labels(session, role)}, "spec": spec})
    return out


# The label a session's NetworkPolicy admits to the stages' control ports. The chart's operator pods
# always carry it, whatever nameOverride makes of their app.kubernetes.io/name; an operator run
# another way must run in a pod that carries it (see README, "On Kubernetes: the operator").
OPERATOR_POD = {"detstream.io/operator": "true"}


def plugin_files(session: Session) -> dict[str, str]:
    """The files the plugin reads in every worker (parameter name -> path)."""
    return plugin_class(session.spec.plugin.name).files(session.spec.plugin.params)


def cluster_problems(session: Session) -> list[str]:
    """What only matters on Kubernetes (the local runner ignores these fields)."""
    k8s = session.spec.kubernetes
    problems = []
    if session.spec.source.kind == "external" and k8s.network_policy and not k8s.external_source_ranges:
        problems.append("spec.kubernetes.externalSourceRanges: required for an external source behind the session's "
                        "NetworkPolicy: the CIDR ranges of the acquisition machines (e.g. [192.0.2.0/24]; "
                        "[0.0.0.0/0] allows any), or set spec.kubernetes.networkPolicy: false")
    for name, path in plugin_files(session).items():
        where = f"spec.plugin.params.{name}: {path} is a file, and worker pods see files only on the output volume"
        if not session.spec.output.volume_claim:
            problems.append(f"{where}: set spec.output.volumeClaim to a claim that holds it (the workers mount it "
                            f"read-only at {OUTPUT_DIR}) and give the file's path there, e.g. {OUTPUT_DIR}/dark.npy")
        elif not path.startswith(OUTPUT_DIR + "/"):
            problems.append(f"{where} (spec.output.volumeClaim, mounted at {OUTPUT_DIR}): give the file's path "
                            f"there, e.g. {OUTPUT_DIR}/{path.rsplit('/', 1)[-1]}")
    return problems


def network_policy(session: Session) -> dict:
    """Ingress to the session's pods: its own stages (every port), the operator (control), any
    monitoring (metrics), anyone the live view, and for external sources the declared ranges (the lanes'
    route ports and the workers' data ports)."""
    def port(name):
        return [{"port": CLUSTER_PORTS[name], "protocol": "TCP"}]
    ingress = [{"from": [{"podSelector": {"matchLabels": {"detstream.io/session": session.name}}}]},
               {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": OPERATOR_POD}}],
                "ports": port("control")},
               {"from": [{"namespaceSelector": {}}], "ports": port("metrics")}]
    if session.spec.live_view.enabled:  # the read-only page, from anywhere (an Ingress controller, a browser)
        ingress.append({"ports": port(LIVE_PORT)})
    ranges = session.spec.kubernetes.external_source_ranges
    if session.spec.source.kind == "external" and ranges:
        ingress.append({"from": [{"ipBlock": {"cidr": cidr}} for cidr in ranges],
                        "ports": port("route") + port("data")})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"{session.name}-stages", "namespace": session.namespace, "labels": labels(session)},
            "spec": {"podSelector": {"matchLabels": {"detstream.io/session": session.name}},
                     "policyTypes": ["Ingress"], "ingress": ingress}}


def live_path(session: Session) -> str:
    """The live view's path behind an Ingress: /NAMESPACE/SESSION/ (the writer serves its page there too)."""
    return f"/{session.namespace}/{session.name}/"


def live_ingress(session: Session) -> dict | None:
    """The Ingress of the session's live view, when the operator has a host for it (and the view is on)."""
    host = os.environ.get(INGRESS_HOST_ENV, "")
    if not host or not session.spec.live_view.enabled:
        return None
    backend = {"service": {"name": f"{session.name}-writer-0", "port": {"name": LIVE_PORT}}}
    spec: dict = {"rules": [{"host": host, "http": {"paths": [
        {"path": live_path(session), "pathType": "Prefix", "backend": backend}]}}]}
    if os.environ.get(INGRESS_CLASS_ENV):
        spec["ingressClassName"] = os.environ[INGRESS_CLASS_ENV]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": f"{session.name}-live", "namespace": session.namespace,
                         "labels": labels(session, "writer")}, "spec": spec}


def live_view(session: Session) -> dict | None:
    """status.liveView: where the live view is (None when spec.liveView is off)."""
    if not session.spec.live_view.enabled:
        return None
    service, port = f"{session.name}-writer-0", CLUSTER_PORTS[LIVE_PORT]
    out = {"service": service, "port": port, "url": f"http://{service}.{session.namespace}.svc:{port}/",
           "portForward": f"kubectl port-forward -n {session.namespace} svc/{service} {port}:{port}"}
    host = os.environ.get(INGRESS_HOST_ENV, "")
    if host:
        out["ingress"] = f"http://{host}{live_path(session)}"
    return out


def finished(session: Session, image: str) -> list[dict]:
    """What a succeeded session keeps running: nothing, except a writer whose results are in an
    emptyDir (no `output.volumeClaim`): they would go with its pod, so it stays, finished and idle,
    until the session is deleted (`kubectl cp SESSION-writer-0:/data/FILE .` fetches them)."""
    out = children(session, image, running=False)
    if not session.spec.output.volume_claim:
        for obj in out:
            if obj["kind"] == "StatefulSet" and obj["metadata"]["name"] == f"{session.name}-writer":
                obj["spec"]["replicas"] = 1
    return out


def children(session: Session, image: str, running: bool = True) -> list[dict]:
    """Every object the session needs; `running=False` (a finished session) scales stages to 0."""
    plan = cluster_plan(session)
    counts = {role: len(plan.of_role(role)) for role in (*INDEXED_ROLES, "worker")}
    counts["worker"] = session.spec.workers.replicas
    image = session.spec.kubernetes.image or image
    out = [plan_configmap(session, plan), *services(session, plan)]
    if session.spec.kubernetes.network_policy:
        out.append(network_policy(session))
    ingress = live_ingress(session)
    if ingress is not None:
        out.append(ingress)
    for role, count in counts.items():
        if count or role == "worker":
            out.append(workload(session, role, count if running else 0, image, plan))
    return out
