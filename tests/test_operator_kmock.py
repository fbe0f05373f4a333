"""The operator's real handlers (`detstream.operator.handlers`) run by kopf (`kopf.testing.KopfRunner`)
against kmock's in-memory Kubernetes emulator: the fast tier of the operator tests (the slow one,
tests/test_operator_cluster.py, runs a real kube-apiserver).

What the emulator honours, and so what these tests let it do: discovery, list/watch, create (POST),
JSON and merge patches (also on the status subresource), delete with finalizers. What it does not:

- Server-side apply. The operator applies its children with PATCH
  `application/apply-patch+yaml`; kmock 0.8 answers a PATCH of a missing object with 404 before any
  user reaction can see it, so an apply never creates anything. The tests therefore assert on the
  apply REQUESTS kmock records (target, content type, field manager, owner reference, body), and
  where the flow needs the children to exist (resume, prune, scale) the children are seeded, as
  they are after an operator restart. The stored result of an apply on a seeded child is kmock's
  naive dict merge, not SSA: only the requests are asserted on, never the merged objects.
- Label selectors: a list returns every object of the namespace. Each test holds one session only.
- uid, generation and resourceVersion are not assigned: the tests write them as the API server would.
- List responses lack `kind`/`apiVersion`, which kubernetes' DynamicClient (the operator's client)
  requires: `Emulator` below adds only that envelope to kmock's own listing.
- `GET /api/v1/namespaces` cannot be parsed by kmock 0.8 (500), so kopf's runtime namespace scanning
  is off (`settings.scanning.disabled`); the operator watches the one namespace it is given, as in
  production (`-n`).
- Events are stored by name and kopf's have only a generateName (the second one would be 409):
  kopf's event posting is off.
- No kubelet, no pods of its own: pods are seeded where a test needs them, without IPs, so the
  operator's gRPC calls to stages are never made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import kmock as km
import kopf
import kubernetes.config.kube_config
import pytest
from kopf.testing import KopfRunner

import detstream.operator.handlers as handlers
from detstream.operator.cluster import FIELD_MANAGER
from detstream.operator.resources import SPEC_HASH

NS = "beamline"
SESSIONS = "detstream.io/v1alpha1/streamingsessions"
APPLY = "application/apply-patch+yaml"
KINDS = {  # what the operator reads and writes; kmock serves discovery from this
    SESSIONS: ("StreamingSession", True, ["status", "scale"]),
    "v1/namespaces": ("Namespace", False, []),
    "v1/pods": ("Pod", True, []),
    "v1/configmaps": ("ConfigMap", True, []),
    "v1/services": ("Service", True, []),
    "v1/events": ("Event", True, []),
    "apps/v1/statefulsets": ("StatefulSet", True, []),
    "apps/v1/deployments": ("Deployment", True, []),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True, []),
    "networking.k8s.io/v1/ingresses": ("Ingress", True, []),
}
RESOURCE_OF = {kind: res for res, (kind, _, _) in KINDS.items()}
SESSIONS_URL = f"/apis/detstream.io/v1alpha1/namespaces/{NS}/streamingsessions"
# The children of a default one-lane session named demo, as tests/test_operator_cluster.py sees them.
CHILDREN = {("ConfigMap", "demo-plan"), ("NetworkPolicy", "demo-stages"), ("Deployment", "demo-worker"),
            *{("StatefulSet", f"demo-{r}") for r in ("source", "distributor", "writer")},
            *{("Service", f"demo-{r}{i}") for r in ("source", "distributor", "writer")
              for i in ("", "-0")}}

class Emulator(km.KubernetesEmulator):
    """kmock's emulator, with the `kind`/`apiVersion` every real list response carries."""

    async def _serve_list(self, request):
        listing = await super()._serve_list(request)
        res = request.resource
        info = self.resources[res]
        return {"apiVersion": f"{res.group}/{res.version}" if res.group else res.version,
                "kind": f"{info.kind}List", **listing}


pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60), pytest.mark.kmock(cls=Emulator)]


@pytest.fixture
def api(kmock, tmp_path, monkeypatch):
    for res, (kind, namespaced, subresources) in KINDS.items():
        kmock.resources[res] = km.ResourceInfo(
            kind=kind, namespaced=namespaced, singular=kind.lower(), subresources=subresources,
            verbs=["create", "delete", "get", "list", "patch", "update", "watch"])
    kmock.objects["v1/namespaces", None, NS] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}]}))
    # kubernetes reads $KUBECONFIG once, at import: point both kopf's login and the operator's client here
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(config))
    monkeypatch.setattr(handlers, "_cluster", None)  # the operator's client, made anew for this server
    return kmock


@contextlib.asynccontextmanager
async def operator():
    """`kopf run` of the operator's handlers in a thread, watching NS, as `detstream operator -n NS`."""
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True   # see the module docstring: kmock cannot list namespaces
    settings.posting.enabled = False    # see the module docstring: events need a generateName
    settings.queueing.exit_timeout = 0.5
    runner = KopfRunner(["run", "--standalone", "-n", NS, "-m", "detstream.operator.handlers"],
                        settings=settings, timeout=30)
    # enter and leave off the event loop: kmock serves the operator from this very loop
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        # kopf 1.45 sometimes leaves a timer running past its exit and then waits 5 s for it ("Hung tasks")
        await asyncio.to_thread(runner.__exit__, None, None, None)


async def until(predicate, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def session(name="demo", generation=1, spec=None, annotations=None, finalizers=None, status=None) -> dict:
    """A StreamingSession as the API server stores it (kmock does not assign uid/generation)."""
    meta = {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": generation, "resourceVersion": "1"}
    if annotations:
        meta["annotations"] = annotations
    if finalizers:
        meta["finalizers"] = finalizers
    body = {"apiVersion": "detstream.io/v1alpha1", "kind": "StreamingSession", "metadata": meta,
            "spec": spec or {"scan": {"rows": 8, "cols": 8}, "workers": {"replicas": 2}}}
    if status:
        body["status"] = status
    return body


def resumed(spec: dict, **kw) -> dict:
    """A session the operator has handled before it restarted (its finalizer and kopf's diff base)."""
    return session(spec=spec, finalizers=["detstream.io/drain"], annotations={
        "detstream.io/last-handled-configuration": json.dumps({"spec": spec}),
        handlers.LAST_VALID: json.dumps(spec, sort_keys=True)}, **kw)


def stored(kmock, resource=SESSIONS, name="demo", namespace=NS) -> dict | None:
    key = (km.resource(resource), namespace, name)  # kmock 0.8: `in` does not parse a string resource
    if key not in kmock.objects or kmock.objects[key].deleted:
        return None
    return kmock.objects[key].raw


def applies(kmock) -> list:
    """The server-side apply requests, in order."""
    return [r for r in kmock if r.method == "PATCH" and (r.headers.get("Content-Type") or "").startswith(APPLY)]


def target(request) -> tuple[str, str]:
    return request.data["kind"], request.name


def conditions(body) -> dict:
    return {c["type"]: c for c in (body.get("status") or {}).get("conditions", [])}


def seed_children(kmock, names) -> None:
    """Children as a previous operator run left them (with the session's label)."""
    for kind, name in names:
        kmock.objects[RESOURCE_OF[kind], NS, name] = {
            "apiVersion": RESOURCE_OF[kind].rsplit("/", 1)[0], "kind": kind,
            "metadata": {"name": name, "namespace": NS, "labels": {"detstream.io/session": "demo"}}}


# ------------------------------------------------------------------------------------------ tests

async def test_a_new_session_gets_its_finalizer_an_owned_apply_and_a_pending_status(api):
    kmock = api
    async with operator() as runner:
        created = await kmock.post(SESSIONS_URL,
                                   json=session())  # what `kubectl create` sends
        assert created.status in (200, 201)
        await until(lambda: (stored(kmock).get("status") or {}).get("phase"), "a status")
        await until(lambda: "detstream.io/reconcile" in (stored(kmock)["metadata"].get("annotations") or {}),
                    "the failed apply recorded")
    body = stored(kmock)

    assert "detstream.io/drain" in body["metadata"]["finalizers"]

    # The first child applied is the plan ConfigMap: server-side apply under the operator's field
    # manager, forced, owned by the session (controller, blocking its deletion until GC).
    first = applies(kmock)[0]
    assert first.url.path == f"/api/v1/namespaces/{NS}/configmaps/demo-plan"
    assert first.params == {"fieldManager": FIELD_MANAGER, "force": "true"}
    assert first.data["metadata"]["ownerReferences"] == [
        {"apiVersion": "detstream.io/v1alpha1", "kind": "StreamingSession", "name": "demo", "uid": "uid-demo",
         "controller": True, "blockOwnerDeletion": True}]
    assert first.data["metadata"]["labels"]["detstream.io/session"] == "demo"
    plan = json.loads(first.data["data"]["plan.json"])
    assert plan["session"] == "demo" and plan["namespace"] == NS and plan["spec"]["workers"]["replicas"] == 2

    # kmock cannot create by apply (404): the operator must record a failed attempt and retry, not
    # crash or carry on half-applied.
    assert any(isinstance(e, km.KubernetesObjectNotFoundError) for e in kmock.errors)
    progress = json.loads(body["metadata"]["annotations"]["detstream.io/reconcile"])
    assert progress["success"] is False and progress["retries"] >= 1 and "404" in progress["message"]
    assert all(target(r) == ("ConfigMap", "demo-plan") for r in applies(kmock))
    assert "Handler 'reconcile' failed" in runner.output

    # The observer wrote the status through the status subresource, its conditions stamped with the
    # generation; no observedGeneration, since no reconcile has applied generation 1 yet.
    status = body["status"]
    assert status["phase"] == "Pending" and "observedGeneration" not in status
    assert status["workers"] == "0/2" and status["stages"]["worker"] == {"desired": 2, "ready": 0}
    spec_valid = conditions(body)["SpecValid"]
    assert spec_valid["status"] == "True" and spec_valid["observedGeneration"] == 1
    status_patches = [r for r in kmock if r.method == "PATCH" and r.subresource == "status"]
    assert status_patches and not any("observedGeneration" in r.data["status"] for r in status_patches)
    assert body["metadata"]["annotations"][handlers.LAST_VALID] == json.dumps(session()["spec"], sort_keys=True)


async def test_resume_applies_every_child_owned_prunes_strays_and_scales_without_rolling(api):
    kmock = api
    spec = {"scan": {"rows": 8, "cols": 8}, "workers": {"replicas": 2}}
    kmock.objects[SESSIONS, NS, "demo"] = resumed(spec)
    strays = {("Service", "demo-distributor-1")}  # a lane removed: its distributor's Service
    seed_children(kmock, CHILDREN | strays)

    async with operator():
        await until(lambda: all(stored(kmock, RESOURCE_OF[k], n) is None for k, n in strays), "the strays pruned")
        first_round = list(applies(kmock))
        assert {target(r) for r in first_round} == CHILDREN
        assert len(first_round) == len(CHILDREN)

        # `kubectl scale sess/demo --replicas=5`: the API server bumps the generation (kmock does not)
        scaled = await kmock.patch(f"{SESSIONS_URL}/demo",
                                   json={"metadata": {"generation": 2}, "spec": {"workers": {"replicas": 5}}},
                                   headers={"Content-Type": "application/merge-patch+json"})
        assert scaled.status == 200
        await until(lambda: len(applies(kmock)) >= 2 * len(CHILDREN), "a second round of applies")
        await until(lambda: (stored(kmock).get("status") or {}).get("observedGeneration") == 2,
                    "observedGeneration 2")
        await until(lambda: stored(kmock)["status"].get("workers") == "0/5", "the observer's status 0/5")
    second_round = applies(kmock)[len(first_round):len(first_round) + len(CHILDREN)]

    for request in first_round + second_round:
        assert request.params == {"fieldManager": FIELD_MANAGER, "force": "true"}, target(request)
        (owner,) = request.data["metadata"]["ownerReferences"]
        assert owner["uid"] == "uid-demo" and owner["controller"] is True, target(request)
    deleted = {(r.url.path.split("/")[-2], r.name) for r in kmock if r.method == "DELETE"}
    assert deleted == {("services", "demo-distributor-1")}

    def by_target(requests):
        return {target(r): r.data for r in requests}
    before, after = by_target(first_round), by_target(second_round)
    assert before[("Deployment", "demo-worker")]["spec"]["replicas"] == 2
    assert after[("Deployment", "demo-worker")]["spec"]["replicas"] == 5
    for kind, name in CHILDREN:  # scaling changes no pod template: nothing rolls
        if kind in ("Deployment", "StatefulSet"):
            assert (after[kind, name]["spec"]["template"]["metadata"]["annotations"][SPEC_HASH]
                    == before[kind, name]["spec"]["template"]["metadata"]["annotations"][SPEC_HASH]), name


async def test_an_invalid_change_is_refused_and_the_last_valid_spec_is_applied(api):
    kmock = api
    valid = {"scan": {"rows": 8, "cols": 8}, "workers": {"replicas": 2}}
    invalid = {**valid, "detector": {"sectors": 5}}  # the API server takes it (no CEL on 1.20); we must not
    body = resumed(valid, generation=3)
    body["spec"] = invalid  # changed while the operator was down
    kmock.objects[SESSIONS, NS, "demo"] = body
    seed_children(kmock, CHILDREN)  # so that applying the last valid spec succeeds

    async with operator() as runner:
        spec_valid = await until(lambda: conditions(stored(kmock)).get("SpecValid"), "SpecValid")
        await until(lambda: applies(kmock), "an apply request")
        await until(lambda: stored(kmock)["status"].get("observedGeneration") == 3, "observedGeneration 3")

    assert spec_valid["status"] == "False" and spec_valid["reason"] == "Invalid"
    assert "spec.detector.sectors: must divide detector.cols (576)" in spec_valid["message"]
    assert spec_valid["observedGeneration"] == 3 and stored(kmock)["status"]["observedGeneration"] == 3
    plan = json.loads(applies(kmock)[0].data["data"]["plan.json"])
    assert plan["spec"]["detector"]["sectors"] == 4  # the last valid spec keeps running
    assert json.loads(stored(kmock)["metadata"]["annotations"][handlers.LAST_VALID]) == valid
    assert "spec refused, keeping the last valid spec" in runner.output


async def test_an_invalid_new_session_fails_and_nothing_is_applied(api):
    kmock = api
    kmock.objects[SESSIONS, NS, "demo"] = session(spec={"scan": {"rows": 8, "cols": 8},
                                                        "detector": {"sectors": 5}})
    async with operator():
        status = await until(lambda: (stored(kmock).get("status") or {}).get("phase") and stored(kmock)["status"],
                             "a status")
        await asyncio.sleep(1.5)  # the observer's first run (initial delay 1 s) must not apply either

    assert status["phase"] == "Failed" and status["observedGeneration"] == 1
    assert status["message"].startswith("invalid spec: ") and "spec.detector.sectors" in status["message"]
    assert not applies(kmock)
    assert handlers.LAST_VALID not in (stored(kmock)["metadata"].get("annotations") or {})


async def test_a_pod_that_cannot_pull_its_image_fails_the_session_naming_it(api):
    kmock = api
    spec = {"scan": {"rows": 8, "cols": 8}, "workers": {"replicas": 2}}
    kmock.objects[SESSIONS, NS, "demo"] = resumed(spec)
    seed_children(kmock, CHILDREN)
    kmock.objects["v1/pods", NS, "demo-writer-0"] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "demo-writer-0", "namespace": NS,
                     "labels": {"detstream.io/session": "demo", "app.kubernetes.io/component": "writer"}},
        "status": {"phase": "Pending", "containerStatuses": [{
            "name": "stage", "restartCount": 0, "ready": False,
            "state": {"waiting": {"reason": "ImagePullBackOff",
                                  "message": 'Back-off pulling image "example/detstream:none"'}}}]}}

    async with operator():
        status = await until(lambda: (stored(kmock).get("status") or {}).get("phase") == "Failed"
                             and stored(kmock)["status"], "phase Failed")

    assert status["message"] == 'pod demo-writer-0: ImagePullBackOff: Back-off pulling image "example/detstream:none"'
    ready = conditions(stored(kmock))["StagesReady"]
    assert ready["status"] == "False" and ready["reason"] == "StageFailed"


async def test_deleting_a_session_that_never_started_releases_its_finalizer_at_once(api):
    kmock = api
    spec = {"scan": {"rows": 8, "cols": 8}, "workers": {"replicas": 2}}
    kmock.objects[SESSIONS, NS, "demo"] = resumed(spec, status={"phase": "Pending"})
    seed_children(kmock, CHILDREN)

    async with operator():
        await until(lambda: len(applies(kmock)) >= len(CHILDREN), "the resume")
        response = await kmock.delete(f"{SESSIONS_URL}/demo")
        assert response.status == 200
        await until(lambda: stored(kmock) is None, "the session gone")

    releases = [r for r in kmock if r.method == "PATCH" and r.name == "demo" and r.subresource is None
                and "finalizers" in json.dumps(r.data)]
    assert releases, "the finalizer was never removed"
    assert not [r for r in kmock if r.method == "PATCH" and r.subresource == "status"
                and (r.data.get("status") or {}).get("phase") == "Draining"]
