"""The operator's pure parts: the CRD, the children it builds, how spec changes are classified,
and the phase it derives; manifests validated against a current Kubernetes release's schemas."""

import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from detstream.operator import resources
from detstream.operator.crd import crd
from detstream.operator.status import Observed, PodView, phase, pod_view, startup_overdue, status_patch
from detstream.services.model.schema import DNS_1035_LABEL, DNS_1123_SUBDOMAIN, LABEL_VALUE
from detstream.services.model.session import load_session
from detstream.v1.control_pb2 import CONFIGURED, FAILED, FINISHED, RUNNING, ScanAccount, StageStatus

from helpers import ROOT, manifest

K8S = kubernetes_validate.latest_version()


def session(**spec):
    return load_session(manifest("s1", **spec))


def test_committed_crd_is_fresh():
    committed = (ROOT / "charts" / "detstream" / "crds" / "streamingsessions.yaml").read_text()
    generated = subprocess.run([sys.executable, "-m", "detstream.operator.crd"], capture_output=True, text=True,
                               check=True).stdout
    assert committed == generated, "run `make crd`"
    kubernetes_validate.validate(yaml.safe_load(committed), K8S, strict=True)


def test_every_stage_requests_the_crd_default_resources_unless_its_role_is_given():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    defaults = {role: prop["default"] for role, prop in
                schema["properties"]["spec"]["properties"]["kubernetes"]["properties"]["resources"]["properties"].items()}
    assert set(defaults) == {"source", "distributor", "worker", "writer"}
    mine = {"requests": {"cpu": "3", "memory": "4Gi"}}
    for s, expected in ((session(), defaults), (session(kubernetes={"resources": {"worker": mine}}),
                                                {**defaults, "worker": mine})):
        workloads = [o for o in resources.children(s, "img") if o["kind"] in ("StatefulSet", "Deployment")]
        assert len(workloads) == 4
        for obj in workloads:
            (stage,) = obj["spec"]["template"]["spec"]["containers"]
            assert stage["resources"] == expected[obj["spec"]["template"]["metadata"]["labels"][
                "app.kubernetes.io/component"]], obj["metadata"]["name"]
    with pytest.raises(Exception, match=r"spec.kubernetes.resources.workers: unknown field"):
        session(kubernetes={"resources": {"workers": mine}})


def test_crd_has_short_name_columns_and_scale():
    version = crd()["spec"]["versions"][0]
    assert crd()["spec"]["names"]["shortNames"] == ["sess"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Workers", "Written", "Lost", "Age"]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.workers.replicas"


def test_children_validate_against_kubernetes_schemas():
    objs = resources.children(session(lanes=2, source={"replicas": 2}), "example/detstream:1")
    kinds = sorted(o["kind"] + "/" + o["metadata"]["name"] for o in objs)
    assert "Deployment/s1-worker" in kinds and "StatefulSet/s1-distributor" in kinds and "ConfigMap/s1-plan" in kinds
    assert "Service/s1-distributor-1" in kinds and "Service/s1-writer-0" in kinds
    assert not any("aggregator" in k for k in kinds)
    for obj in objs:
        kubernetes_validate.validate(obj, K8S, strict=True)


def tomo_session(workers=2):
    return session(scan={"rows": 1, "cols": 104}, detector={"rows": 64, "cols": 64, "sectors": 1},
                   tomography={"angles": 90, "darks": 4, "flats": 10}, source={"kind": "tomo-simulator"},
                   workers={"replicas": workers}, plugin={"name": "tomo-fbp"})


def test_workers_routed_by_slice_are_a_statefulset_so_a_restarted_pod_keeps_its_band():
    """Worker k owns band k of the detector rows, its index from its pod name's ordinal: a Deployment's pods
    would all be worker 0. The bands follow the worker count: scaling restarts every stage with the new bands."""
    objs = resources.children(tomo_session(), "example/detstream:1")
    (worker,) = [o for o in objs if o["kind"] != "Service" and o["metadata"]["name"] == "s1-worker"]
    assert worker["kind"] == "StatefulSet" and worker["spec"]["replicas"] == 2
    assert worker["spec"]["serviceName"] == "s1-worker" and worker["spec"]["podManagementPolicy"] == "Parallel"
    (service,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "s1-worker"]
    assert service["spec"]["clusterIP"] == "None"
    assert not any(o["kind"] == "Deployment" for o in objs)
    for obj in objs:
        kubernetes_validate.validate(obj, K8S, strict=True)
    base = template_hashes(tomo_session())
    assert all(h != base[name] for name, h in template_hashes(tomo_session(workers=4)).items())


def test_a_worker_pod_of_the_deployment_is_worker_0_whatever_its_random_name(monkeypatch):
    """A Deployment pod's name ends in a random suffix of Kubernetes' 27 letters, 7 of them digits: a suffix of
    digits alone (demo-worker-657b5cb788-62552) was read as the ordinal 62552, and the pod crashed on a plan
    without that worker. Its arguments now name index 0, which the stage takes over the pod name."""
    from detstream.services.launcher.cli import build_parser, stage_index

    (worker,) = [o for o in resources.children(session(), "img") if o["kind"] == "Deployment"]
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    monkeypatch.setenv("POD_NAME", "s1-worker-657b5cb788-62552")
    monkeypatch.delenv("DETSTREAM_INDEX", raising=False)
    assert stage_index(build_parser().parse_args(container["args"]).index) == 0
    (stateful,) = [o for o in resources.children(tomo_session(), "img") if o["metadata"]["name"] == "s1-worker"
                   and o["kind"] == "StatefulSet"]
    (container,) = stateful["spec"]["template"]["spec"]["containers"]
    monkeypatch.setenv("POD_NAME", "s1-worker-1")   # routed by slice: the ordinal is the band
    assert stage_index(build_parser().parse_args(container["args"]).index) == 1


def test_pods_are_restricted_and_bind_their_own_ip():
    for obj in resources.children(session(), "img"):
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] and security["seccompProfile"]["type"] == "RuntimeDefault"
        (c,) = pod["containers"]
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}
        env = {e["name"]: e for e in c["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["OMP_NUM_THREADS"]["value"] == "1"   # libraries' threads would spin against the other stages
        # probes cost the kubelet an HTTP request to the stage's metrics port, not a process
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert "metrics" in [p["name"] for p in c["ports"]]


def test_external_source_exposes_ingest_with_the_chosen_service_type():
    objs = resources.children(session(source={"kind": "external", "replicas": 2},
                                      kubernetes={"ingestServiceType": "LoadBalancer"}), "img")
    ingest = next(o for o in objs if o["metadata"]["name"] == "s1-distributor-0")
    assert ingest["spec"]["type"] == "LoadBalancer"
    assert 7200 in [p["port"] for p in ingest["spec"]["ports"]]  # the lane's route port
    writer = next(o for o in objs if o["metadata"]["name"] == "s1-writer-0")
    assert writer["spec"].get("type", "ClusterIP") == "ClusterIP"  # only the lanes face the acquisition machines
    assert not any(o["metadata"]["name"] == "s1-source" for o in objs)


def template_hashes(s):
    return {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["annotations"][resources.SPEC_HASH]
            for o in resources.children(s, "img") if "template" in o.get("spec", {})}


def test_scaling_and_parameters_do_not_roll_pods_other_changes_do():
    base = template_hashes(session())
    assert template_hashes(session(workers={"replicas": 7})) == base
    assert template_hashes(session(plugin={"name": "electron-counting", "params": {"samples": 10}})) == base
    assert template_hashes(session(transport={"highWaterMark": 64})) != base


def test_finished_session_scales_stages_to_zero():
    replicas = [o["spec"]["replicas"] for o in resources.children(session(), "img", running=False)
                if o["kind"] in ("Deployment", "StatefulSet")]
    assert replicas and not any(replicas)


def stage(role, state, **kw):
    return StageStatus(stage=role, state=state, **kw)


DESIRED = {"distributor": 1, "writer": 1}


@pytest.mark.parametrize("pods, stages, started, expected", [
    ([], {}, False, "Pending"),
    ([PodView("a", "distributor", phase="Running")], {}, False, "Starting"),
    ([PodView("a", "distributor", "1", True, "Running"), PodView("w", "writer", "2", True, "Running")],
     {"a": stage("distributor", CONFIGURED), "w": stage("writer", CONFIGURED)}, False, "Ready"),
    ([PodView("a", "distributor", "1", True, "Running")], {"a": stage("distributor", RUNNING)}, True, "Streaming"),
    ([], {"w": stage("writer", FINISHED, scans=[ScanAccount(expected=4, written=3, lost=1)])}, True, "Succeeded"),
    ([], {"w": stage("writer", FINISHED, scans=[ScanAccount(expected=4, written=2, lost=1)])}, True, "Failed"),
    ([], {"a": stage("distributor", FAILED, message="boom")}, True, "Failed"),
    ([PodView("a", "distributor", problem="pod a: CrashLoopBackOff: bad")], {}, False, "Failed"),
])
def test_phase(pods, stages, started, expected):
    assert phase(Observed(DESIRED, pods, stages, started))[0] == expected


@pytest.mark.parametrize("started, waited, overdue", [(False, 5.0, False), (False, 61.0, True), (True, 61.0, False)])
def test_startup_is_overdue_only_before_the_start_and_past_the_timeout(started, waited, overdue):
    pods = [PodView("a", "distributor", "1", True, "Running"), PodView("w", "writer", phase="Pending")]
    o = Observed(DESIRED, pods, {"a": stage("distributor", CONFIGURED)}, started, waited_s=waited, startup_timeout_s=60)
    expected = ("not every stage is healthy after 60 s (spec.transport.startupTimeoutS): writer 0/1; "
                "not ready: w (Pending)")
    assert startup_overdue(o) == (expected if overdue else "")
    (ready,) = [c for c in status_patch(o, {}, 1, "")["conditions"] if c["type"] == "StagesReady"]
    assert ready["reason"] == ("StartupTimeout" if overdue else "Waiting")


def test_pod_problem_carries_the_pods_own_message():
    pod = {"metadata": {"name": "s1-worker-x", "labels": {"app.kubernetes.io/component": "worker"}},
           "status": {"phase": "Running", "containerStatuses": [{
               "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
               "lastState": {"terminated": {"exitCode": 2, "message": "detstream: invalid choice: 'stagee'"}}}]}}
    view = pod_view(pod)
    assert view.restarts == 4
    assert view.problem == "pod s1-worker-x: CrashLoopBackOff: detstream: invalid choice: 'stagee'"


@pytest.mark.parametrize("restarts, ready, failing", [(1, False, False), (2, False, True), (2, True, False)])
def test_a_crash_looping_pod_stays_a_problem_while_it_runs_between_back_offs(restarts, ready, failing):
    # One restart is a stage that died and came back (the session resumes); a container that failed
    # twice and is running again, not ready, is crash-looping: the session stays Failed meanwhile.
    pod = {"metadata": {"name": "s1-source-0", "labels": {"app.kubernetes.io/component": "source"}},
           "status": {"phase": "Running", "containerStatuses": [{
               "restartCount": restarts, "ready": ready, "state": {"running": {}},
               "lastState": {"terminated": {"exitCode": 1, "message": "replay file /data/x.npy does not exist"}}}]}}
    problem = pod_view(pod).problem
    assert problem == ("pod s1-source-0: CrashLoopBackOff: replay file /data/x.npy does not exist" if failing else "")


def test_ingest_addresses_follow_the_service_type():
    from detstream.operator.status import ingest_addresses

    def svc(name, type_, node_port=None, ingress=None):
        return {"metadata": {"name": name, "namespace": "lab"},
                "spec": {"type": type_, "ports": [{"port": 7200, "nodePort": node_port}]},
                "status": {"loadBalancer": {"ingress": ingress or []}}}
    assert ingest_addresses([svc("s-distributor-0", "ClusterIP"), svc("s-distributor-1", "NodePort", 31000),
                             svc("s-distributor-2", "LoadBalancer", 31001, [{"ip": "10.1.2.3"}])], 7200) == [
        "tcp://s-distributor-0.lab.svc:7200", "tcp://NODE-ADDRESS:31000", "tcp://10.1.2.3:7200"]


def test_network_policy_admits_only_the_session_the_operator_and_declared_sources():
    s = session(source={"kind": "external", "replicas": 1},
                kubernetes={"externalSourceRanges": ["192.0.2.0/24"]})
    (policy,) = [o for o in resources.children(s, "img") if o["kind"] == "NetworkPolicy"]
    kubernetes_validate.validate(policy, K8S, strict=True)
    assert policy["spec"]["podSelector"] == {"matchLabels": {"detstream.io/session": "s1"}}
    rules = policy["spec"]["ingress"]
    # the session's own pods: every port (no `ports` in the rule)
    assert rules[0] == {"from": [{"podSelector": {"matchLabels": {"detstream.io/session": "s1"}}}]}
    by_port = {p["port"]: r.get("from") for r in rules[1:] for p in r["ports"]}
    assert by_port[8080] is None  # the live view: from anywhere (see the test below)
    assert by_port[7100][0]["podSelector"]["matchLabels"] == {"detstream.io/operator": "true"}
    # the acquisition machines: the lanes' route port and the workers' data port
    assert by_port[7200] == by_port[7204] == [{"ipBlock": {"cidr": "192.0.2.0/24"}}]
    assert 7202 not in by_port and 7203 not in by_port  # work, results: the session's own stages only


def test_every_stage_exposes_its_plan_ports_the_worker_its_data_port():
    s = session(lanes=2)
    plan = resources.cluster_plan(s)
    for obj in resources.children(s, "img"):
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        role = obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        (c,) = obj["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for stage in plan.of_role(role):
            assert ports == stage.ports, obj["metadata"]["name"]
    (worker,) = [o for o in resources.children(s, "img") if o["kind"] == "Deployment"]
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    assert {"name": "data", "containerPort": 7204, "protocol": "TCP"} in c["ports"]


def test_the_writer_serves_the_live_view_on_its_service_open_to_any_client():
    objs = resources.children(session(), "img")
    (service,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "s1-writer-0"]
    assert {"name": "live", "port": 8080, "targetPort": 8080, "protocol": "TCP"} in service["spec"]["ports"]
    (writer,) = [o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "s1-writer"]
    ports = writer["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "live", "containerPort": 8080, "protocol": "TCP"} in ports
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert {"ports": [{"port": 8080, "protocol": "TCP"}]} in policy["spec"]["ingress"]  # from anywhere
    assert resources.live_view(session()) == {
        "service": "s1-writer-0", "port": 8080, "url": "http://s1-writer-0.default.svc:8080/",
        "portForward": "kubectl port-forward -n default svc/s1-writer-0 8080:8080"}
    assert not any(o["kind"] == "Ingress" for o in objs)  # the operator has no Ingress host

    off = session(liveView={"enabled": False})
    objs = resources.children(off, "img")
    assert resources.live_view(off) is None
    assert all(p["name"] != "live" for o in objs if o["kind"] == "Service" for p in o["spec"]["ports"])
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert all(r.get("from") for r in policy["spec"]["ingress"])


def test_an_operator_with_an_ingress_host_gives_each_live_view_an_ingress(monkeypatch):
    monkeypatch.setenv(resources.INGRESS_HOST_ENV, "live.lab.example")
    monkeypatch.setenv(resources.INGRESS_CLASS_ENV, "nginx")
    (ingress,) = [o for o in resources.children(session(), "img") if o["kind"] == "Ingress"]
    kubernetes_validate.validate(ingress, K8S, strict=True)
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert rule["host"] == "live.lab.example" and path["path"] == "/default/s1/" and path["pathType"] == "Prefix"
    assert path["backend"] == {"service": {"name": "s1-writer-0", "port": {"name": "live"}}}
    assert resources.live_view(session())["ingress"] == "http://live.lab.example/default/s1/"
    assert not any(o["kind"] == "Ingress" for o in resources.children(session(liveView={"enabled": False}), "img"))


def test_external_source_behind_a_policy_needs_its_ranges():
    assert resources.cluster_problems(session(source={"kind": "external"}))[0].startswith(
        "spec.kubernetes.externalSourceRanges: required")
    assert not resources.cluster_problems(session(source={"kind": "external"},
                                                  kubernetes={"networkPolicy": False}))


def pod_spec(children, role):
    return next(o for o in children if o["kind"] in ("Deployment", "StatefulSet")
                and o["metadata"]["name"].endswith(f"-{role}"))["spec"]["template"]["spec"]


def test_a_dark_reference_file_reaches_the_workers_on_the_output_claim_or_is_refused():
    """Field case 13: a measured dark reference (a file) on Kubernetes."""
    counting = lambda dark: {"name": "electron-counting", "params": {"dark": dark}}  # noqa: E731
    with_claim = session(plugin=counting("/data/darks/dark_scan0099.npy"), output={"volumeClaim": "scans"})
    assert resources.cluster_problems(with_claim) == []
    children = resources.children(with_claim, "img")
    for obj in children:
        kubernetes_validate.validate(obj, K8S, strict=True)
    worker = pod_spec(children, "worker")
    assert {"name": "output", "persistentVolumeClaim": {"claimName": "scans", "readOnly": True}} in worker["volumes"]
    assert {"name": "output", "mountPath": "/data", "readOnly": True} in worker["containers"][0]["volumeMounts"]
    writer = pod_spec(children, "writer")
    assert {"name": "output", "mountPath": "/data"} in writer["containers"][0]["volumeMounts"]

    (problem,) = resources.cluster_problems(session(plugin=counting("/home/me/dark.npy")))
    assert problem.startswith("spec.plugin.params.dark: /home/me/dark.npy is a file")
    assert "spec.output.volumeClaim" in problem
    (problem,) = resources.cluster_problems(session(plugin=counting("dark.npy"), output={"volumeClaim": "scans"}))
    assert "give the file's path there, e.g. /data/dark.npy" in problem
    for dark in ("none", "simulated"):  # nothing to mount
        plain = resources.children(session(plugin=counting(dark)), "img")
        assert all(v["name"] != "output" for v in pod_spec(plain, "worker")["volumes"])


def test_a_finished_session_keeps_only_a_writer_holding_results_in_an_emptydir():
    def replicas(s):
        return {o["metadata"]["name"]: o["spec"]["replicas"] for o in resources.finished(s, "img")
                if o["kind"] in ("Deployment", "StatefulSet")}
    kept = replicas(session())
    assert kept.pop("s1-writer") == 1 and not any(kept.values())
    assert not any(replicas(session(output={"volumeClaim": "scans"})).values())


def test_every_derived_name_and_label_is_one_the_api_server_takes():
    """The longest session name allowed, with two-digit indices: Services are DNS-1035 labels, every label
    value (and each StatefulSet pod's controller-revision-hash, NAME-ROLE-HASH) at most 63 characters."""
    s = load_session(manifest("a" * 40, lanes=12, source={"replicas": 4}))
    objects = resources.children(s, "img")
    for obj in objects:
        name = obj["metadata"]["name"]
        assert len(name) <= 253 and DNS_1123_SUBDOMAIN.fullmatch(name), name
        if obj["kind"] == "Service":
            assert len(name) <= 63 and DNS_1035_LABEL.fullmatch(name), name
        if obj["kind"] == "StatefulSet":
            assert len(f"{name}-{'f' * 10}") <= 63, name
            assert len(f"{name}-{obj['spec']['replicas'] - 1}") <= 63, name  # statefulset.kubernetes.io/pod-name
        for value in obj["metadata"].get("labels", {}).values():
            assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), value
