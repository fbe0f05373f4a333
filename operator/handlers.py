"""kopf handlers: one idempotent reconcile, one observer, one drain.

- `reconcile` (create, update, resume, and a slow resync) applies the children built from the
  spec. What a change does follows from the builders: the worker count only scales the worker
  Deployment (a StatefulSet when routed by slice); plugin parameters change only the plan ConfigMap
  (no pod template change, so no restart) and are pushed live to the running workers; anything else
  changes the pod templates' spec hash and rolls the stages. An invalid spec is refused with the SpecValid condition and
  the last valid spec keeps running.
- `observe` (every 2 s) reads the pods and every stage's own status over gRPC, starts stages that
  are up but idle (at first all of them, one observation after reporting Ready; later restarted or
  added ones), and writes `status`.
- `drain` (the finalizer) asks every stage to drain and waits until the writer has closed its
  files, at most `spec.kubernetes.drainGraceS`; then the children go by garbage collection.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from typing import Any

import grpc
import kopf
from kubernetes.dynamic.exceptions import ForbiddenError
from prometheus_client import Counter, Histogram

from detstream.operator import keys, metrics, resources, stages
from detstream.operator.cluster import Cluster
from detstream.operator.crd import PLURAL
from detstream.operator.status import (
    Observed,
    age_s,
    ingest_addresses,
    now,
    phase,
    pod_view,
    reason_of,
    startup_overdue,
    status_patch,
)
from detstream.services.model.plan import CLUSTER_PORTS, replicas
from detstream.services.model.schema import SpecError
from detstream.services.model.session import API_GROUP, API_VERSION, KIND, Session, load_session
from detstream.v1.control_pb2 import FINISHED

RESOURCE = (API_GROUP, API_VERSION, PLURAL)
LAST_VALID = "detstream.io/last-valid-spec"
OBSERVE_INTERVAL_S = 2.0
RESYNC_INTERVAL_S = 60.0

RECONCILES = Counter("detstream_operator_reconciles", "Reconciles of StreamingSessions, by result.", ["result"])
for _result in ("applied", "invalid", "error"):
    RECONCILES.labels(_result)  # exported at 0 from the start, so that the first of each is an increase
RECONCILE_SECONDS = Histogram("detstream_operator_reconcile_seconds", "Time one reconcile takes.")

_cluster: Cluster | None = None


_cluster_lock = threading.Lock()
KEYS_FORBIDDEN = ("spec.security needs the session's keys in a Secret, and this operator may not create Secrets: "
                  "install the chart with sessionKeys.enabled=true")


def cluster() -> Cluster:
    global _cluster
    with _cluster_lock:  # reconcile and observe run in different threads
        if _cluster is None:
            _cluster = Cluster()
    return _cluster


def ensure_keys(session: Session, body: kopf.Body) -> None:
    """The session's keys Secret, made once (and again only if a new stage needs keys it lacks)."""
    if not keys.needs_keys(session):
        return
    plan = resources.cluster_plan(session)
    current = cluster().get("v1", "Secret", session.namespace, keys.secret_name(session))
    if current is None or not keys.covers(current, session, plan):
        try:
            cluster().apply(keys.key_secret(session, plan, resources.labels(session)), body)
        except ForbiddenError:
            tell(body, logging.getLogger(__name__), "KeysForbidden", KEYS_FORBIDDEN, warning=True)
            raise kopf.TemporaryError(KEYS_FORBIDDEN, delay=60) from None


def tls(session: Session) -> stages.Tls | None:
    """The operator's client certificate for a session with mutual TLS."""
    if session.spec.security.control_plane != "mtls":
        return None
    secret = cluster().get("v1", "Secret", session.namespace, keys.secret_name(session))
    if secret is None:
        return None
    ca, cert, key = keys.launcher_files(secret)
    return stages.Tls(session.name, grpc.ssl_channel_credentials(ca, key, cert))


def default_image() -> str:
    return os.environ.get("DETSTREAM_IMAGE", "ghcr.io/detstream/detstream:0.1.0")


def session_of(body: kopf.Body) -> tuple[Session | None, list[str]]:
    """The session to run: this spec if valid, else the last valid one; plus the spec's problems."""
    try:
        session = as_session(body, dict(body["spec"]))
        errors = resources.cluster_problems(session)
        if not errors:
            return session, []
    except SpecError as exc:
        errors = [str(e) for e in exc.errors]
    return last_valid(body), errors


def last_valid(body: kopf.Body) -> Session | None:
    """The session as the reconcile last applied it; once it has succeeded, as it ran (the
    annotation is no longer updated then)."""
    last = (body["metadata"].get("annotations") or {}).get(LAST_VALID)
    return as_session(body, json.loads(last)) if last else None


def as_session(body: kopf.Body, spec: dict) -> Session:
    meta = body["metadata"]
    return load_session({"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "spec": spec,
                         "metadata": {"name": meta["name"], "namespace": meta.get("namespace", "default")}})


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "detstream.io/drain"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="detstream.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="detstream.io")
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 32
    settings.watching.server_timeout = 300
    # A deleted session waits for its timers (observe, resync) to exit before its finalizer goes; kopf
    # re-checks a timer still running after `cancellation_polling` s (default 60): deleting a session
    # while its resync ran took a minute more.
    settings.background.cancellation_polling = 1.0


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
@kopf.timer(*RESOURCE, interval=RESYNC_INTERVAL_S, initial_delay=RESYNC_INTERVAL_S)
def reconcile(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, logger: kopf.Logger,
              old: dict | None = None, new: dict | None = None, **_: Any) -> None:
    t0 = time.perf_counter()
    try:
        if status.get("phase") == "Succeeded":
            keep_finished(body, meta, patch, logger, edited=old is not None and old != new)
        else:
            apply_session(body, meta, patch, logger, params_changed(old, new))
    except Exception:
        RECONCILES.labels("error").inc()  # kopf logs it and retries
        raise
    finally:
        RECONCILE_SECONDS.observe(time.perf_counter() - t0)


def apply_session(body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, logger: kopf.Logger, new_params: bool) -> None:
    session, errors = session_of(body)
    if errors:
        keeping = "keeping the last valid spec" if session else "nothing to run"
        tell(body, logger, "SpecRefused", f"spec refused, {keeping}: {'; '.join(errors)}", warning=True)
    if session is None:
        RECONCILES.labels("invalid").inc()
        patch.status.update(phase="Failed", message="invalid spec: " + "; ".join(errors),
                            observedGeneration=meta.get("generation"))
        return
    if not errors:
        patch.metadata.setdefault("annotations", {})[LAST_VALID] = json.dumps(dict(body["spec"]), sort_keys=True)
    apply_children(body, session, resources.children(session, default_image()), logger)
    if not errors and new_params:
        push_params(body, session, logger)
    patch.status["observedGeneration"] = meta.get("generation")  # applied (or refused for the last valid spec)
    RECONCILES.labels("applied" if not errors else "invalid").inc()


def keep_finished(body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, logger: kopf.Logger, edited: bool) -> None:
    """A succeeded session's children stay as they ran, whatever its spec says now: a changed pod
    template would roll the idle writer, and an emptyDir's results would go with its old pod."""
    session = last_valid(body)
    if session is not None:  # None only for a session that never applied a spec: nothing of it runs
        apply_children(body, session, resources.finished(session, default_image()), logger)
    if edited:
        tell(body, logger, "SpecIgnored", "the session has succeeded: a spec change has no effect on it and "
                                          "its results stay as they are (to run again, create a new session)",
             warning=True)
    patch.status["observedGeneration"] = meta.get("generation")
    RECONCILES.labels("applied").inc()


def apply_children(body: kopf.Body, session: Session, desired: list[dict], logger: kopf.Logger) -> None:
    """Apply the desired children (the keys Secret first) and remove the session's others."""
    ensure_keys(session, body)  # before the pods that mount it
    for obj in desired:
        cluster().apply(obj, body)
    gone = cluster().prune(session.namespace, session.name, {(o["kind"], o["metadata"]["name"]) for o in desired})
    if gone:
        tell(body, logger, "Pruned", f"removed {', '.join(gone)}")


def params_changed(old: dict | None, new: dict | None) -> bool:
    """Whether an update changed the plugin parameters (also when the plugin section is new).
    `old` and `new` are the specs themselves: kopf passes the changed field (`field="spec"`)."""
    if old is None or new is None:
        return False
    params = lambda spec: ((spec or {}).get("plugin") or {}).get("params") or {}  # noqa: E731
    return params(old) != params(new)


def push_params(body: kopf.Body, session: Session, logger: kopf.Logger) -> None:
    pods = [pod_view(p) for p in cluster().pods(session.namespace, session.name)]
    done = stages.configure_workers(pods, session.spec.plugin.params, tls(session))
    tell(body, logger, "ParametersUpdated",
         f"plugin parameters pushed live to {len(done)} worker(s): {session.spec.plugin.params}")


def tell(body: kopf.Body, logger: kopf.Logger, reason: str, message: str, warning: bool = False) -> None:
    """Log it, and post it as an Event on the session (`kubectl describe sess`, `kubectl get events`).
    Explicitly: kopf posts its loggers' messages only with settings.posting.loggers, and then every
    handler's success too."""
    (logger.warning if warning else logger.info)("%s", message)
    (kopf.warn if warning else kopf.info)(body, reason=reason, message=message[:1024])


@kopf.timer(*RESOURCE, interval=OBSERVE_INTERVAL_S, initial_delay=1.0)
def observe(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, logger: kopf.Logger,
            **_: Any) -> None:
    if status.get("phase") == "Succeeded":
        metrics.export(meta["namespace"], meta["name"], status)  # (also after an operator restart)
        return  # the stages are scaled to zero (see resources.finished); the result stays as it is
    session, errors = session_of(body)
    if session is None:
        return
    pods = [pod_view(p) for p in cluster().pods(session.namespace, session.name)]
    secure = tls(session)
    stage_status = stages.statuses(pods, secure)
    observed = Observed(desired=replicas(session), pods=pods, stages=stage_status,
                        started=bool(status.get("startedAt")), deleting=bool(meta.get("deletionTimestamp")),
                        spec_errors=errors, waited_s=age_s(meta),
                        startup_timeout_s=session.spec.transport.startup_timeout_s)
    current, why = phase(observed)
    if current == "Ready" and status.get("phase") != "Ready":
        pass  # report Ready (every stage healthy) first; the stages start at the next observation
    elif current in ("Ready", "Streaming"):
        started = stages.start_waiting(pods, stage_status, secure)
        if current == "Ready":
            patch.status["startedAt"] = now()
            observed.started = True
            tell(body, logger, "Started", f"every stage is healthy; started {len(started)} stages")
        elif started:
            restarted = {p.name: p.restarts for p in pods if p.restarts}
            tell(body, logger, "StagesStarted", "started stages that came up mid-session: " + ", ".join(
                f"{name} (restarted {restarted[name]}x)" if name in restarted else name for name in started))
    new = status_patch(observed, dict(status), meta.get("generation"), resources.worker_selector(session))
    live = resources.live_view(session)
    if live is not None:
        new["liveView"] = live
    if session.spec.source.kind == "external":
        new["ingest"] = ingest_addresses(cluster().services(session.namespace, session.name, "distributor"),
                                         CLUSTER_PORTS["route"])
    overdue = startup_overdue(observed)
    if overdue and reason_of(status, "StagesReady") != "StartupTimeout":
        # reported, not fatal: on a cluster a pod may be slow for a while (an image pull, scheduling)
        tell(body, logger, "StartupTimeout", overdue, warning=True)
    if new["phase"] != status.get("phase"):
        tell(body, logger, new["phase"], f"phase {status.get('phase')} -> {new['phase']}{f': {why}' if why else ''}",
             warning=new["phase"] == "Failed")
    if new["phase"] == "Succeeded":
        for obj in resources.finished(last_valid(body) or session, default_image()):
            cluster().apply(obj, body)  # scale the stages to zero (not an emptyDir's writer); the record stays
    patch.status.update(new)
    metrics.export(meta["namespace"], meta["name"], new)


@kopf.on.delete(*RESOURCE)
def drain(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, logger: kopf.Logger,
          runtime: datetime.timedelta, **_: Any) -> None:
    metrics.forget(meta["namespace"], meta["name"])
    session, _errors = session_of(body)
    if session is None or status.get("phase") in ("Succeeded", "Pending", None) or not status.get("startedAt"):
        return  # nothing streamed, no file is open: nothing to drain (a stage never started would not drain)
    pods = [pod_view(p) for p in cluster().pods(session.namespace, session.name)]
    secure = tls(session)
    stage_status = stages.statuses(pods, secure)
    writer = next((s for s in stage_status.values() if s.stage == "writer"), None)
    if writer is None or writer.state == FINISHED:
        tell(body, logger, "Drained", "drained: the writer has closed its files")
        return
    patch.status["phase"] = "Draining"
    stages.drain(pods, secure)
    grace = session.spec.kubernetes.drain_grace_s
    if runtime.total_seconds() > grace:
        tell(body, logger, "DrainTimeout", f"drain did not finish within {grace:g} s (spec.kubernetes.drainGraceS); "
                                           f"deleting anyway", warning=True)
        return
    raise kopf.TemporaryError("draining: waiting for the writer to close its files", delay=1)
