"""Pure functions from what the operator observes (pods, stage statuses) to the session's status.

Phases: Pending (objects created, no stage pod running yet), Starting (stage pods coming up),
Ready (every stage healthy, about to start), Streaming, Draining (being deleted), Succeeded
(every scan closed, every frame accounted for), Failed (a stage failed, a pod cannot start, or
accounting does not close).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from detstream.services.dataplane.accounting import frames_so_far
from detstream.v1.control_pb2 import FAILED, FINISHED, StageStatus

# Container states that will not fix themselves: the session cannot run.
CRASH_LOOP_RESTARTS = 2  # a container that failed this often and is not ready (again) is crash-looping
FATAL_WAITING = ("CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                 "CreateContainerConfigError", "CreateContainerError", "RunContainerError")


@dataclass
class PodView:
    """What matters of one stage pod."""
    name: str
    role: str
    ip: str = ""
    ready: bool = False
    phase: str = "Pending"
    restarts: int = 0
    problem: str = ""   # why it cannot run, from its container state


def pod_view(pod: dict) -> PodView:
    meta, status = pod.get("metadata", {}), pod.get("status") or {}
    view = PodView(meta.get("name", ""), meta.get("labels", {}).get("app.kubernetes.io/component", ""),
                   ip=status.get("podIP") or "", phase=status.get("phase") or "Pending")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            view.ready = cond.get("status") == "True"
    for cs in status.get("containerStatuses") or []:
        view.restarts += cs.get("restartCount", 0)
        waiting = (cs.get("state") or {}).get("waiting") or {}
        last = ((cs.get("lastState") or {}).get("terminated") or {})
        # The container's own last words first: for CrashLoopBackOff the kubelet's waiting message
        # is only "back-off 10s restarting failed container=...".
        said = (last.get("message") or "").strip().splitlines()
        detail = (said[-1] if said else "") or waiting.get("message") or f"exit code {last.get('exitCode', '?')}"
        if waiting.get("reason") in FATAL_WAITING:
            view.problem = f"pod {view.name}: {waiting['reason']}: {detail.strip()}"
        elif cs.get("restartCount", 0) >= CRASH_LOOP_RESTARTS and last.get("exitCode") and not cs.get("ready"):
            # between two back-offs a crash-looping container runs again for a moment: still failing
            view.problem = f"pod {view.name}: CrashLoopBackOff: {detail.strip()}"
    return view


@dataclass
class Observed:
    desired: dict[str, int]                        # role -> replicas wanted
    pods: list[PodView] = field(default_factory=list)
    stages: dict[str, StageStatus] = field(default_factory=dict)   # pod name -> status (reachable ones)
    started: bool = False
    deleting: bool = False
    spec_errors: list[str] = field(default_factory=list)
    waited_s: float = 0.0                          # since the session was created
    startup_timeout_s: float = float("inf")        # spec.transport.startupTimeoutS


def phase(o: Observed) -> tuple[str, str]:
    """The phase and, for Failed, why."""
    failed = [f"{name}: {s.message}" for name, s in o.stages.items() if s.state == FAILED]
    problems = [p.problem for p in o.pods if p.problem]
    writer = next((s for s in o.stages.values() if s.stage == "writer"), None)
    if o.deleting:
        return "Draining", ""
    if failed or problems:
        return "Failed", "; ".join(failed + problems)
    if o.started and writer is not None and writer.state == FINISHED:
        bad = [a.scan for a in writer.scans if a.expected != a.written + a.lost]
        if bad or writer.scans_unaccounted:
            listed = f" (of the recent ones: {bad})" if bad else ""
            return "Failed", (f"accounting does not close for {max(len(bad), writer.scans_unaccounted)} scans{listed}; "
                              f"every scan is in the writer's SESSION-accounting.jsonl")
        return "Succeeded", ""
    if o.started:
        return "Streaming", ""
    ready = ready_counts(o)
    if all(ready.get(role, 0) >= n for role, n in o.desired.items()) and len(o.stages) >= sum(o.desired.values()):
        return "Ready", ""
    if any(p.phase == "Running" for p in o.pods):
        return "Starting", ""
    return "Pending", ""


def startup_overdue(o: Observed) -> str:
    """Why the session has not started within its startup timeout, or "" (it has, or may still)."""
    ready = ready_counts(o)
    if o.started or o.waited_s <= o.startup_timeout_s or all(ready.get(r, 0) >= n for r, n in o.desired.items()):
        return ""
    waiting = [f"{p.name} ({p.phase})" for p in o.pods if not (p.ready and p.name in o.stages)]
    missing = [f"{r} {ready.get(r, 0)}/{n}" for r, n in o.desired.items() if ready.get(r, 0) < n]
    return (f"not every stage is healthy after {o.startup_timeout_s:g} s (spec.transport.startupTimeoutS): "
            f"{', '.join(missing)}; not ready: {', '.join(waiting) or 'no pods yet'}")


def ready_counts(o: Observed) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in o.pods:
        counts[p.role] = counts.get(p.role, 0) + (p.ready and p.name in o.stages)
    return counts


def age_s(meta: Mapping[str, Any]) -> float:
    """Seconds since the object was created."""
    created = meta.get("creationTimestamp")
    if not created:
        return 0.0
    since = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    return (datetime.datetime.now(datetime.timezone.utc) - since).total_seconds()


def reason_of(status: Mapping[str, Any], condition_type: str) -> str:
    """The reason of a condition in a status, or ""."""
    return next((c.get("reason", "") for c in status.get("conditions") or [] if c.get("type") == condition_type), "")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(old: list[dict], type_: str, ok: bool, reason: str, message: str,
              generation: int | None) -> dict:
    """A condition that keeps its lastTransitionTime unless its status changes."""
    status = "True" if ok else "False"
    previous = next((c for c in old if c.get("type") == type_), None)
    since = previous["lastTransitionTime"] if previous and previous.get("status") == status else now()
    return without_empty({"type": type_, "status": status, "reason": reason, "message": message,
                          "lastTransitionTime": since, "observedGeneration": generation})


def without_empty(fields: dict) -> dict:
    """Kubernetes 1.20 reads an empty string as null and refuses it for a string field: leave it out."""
    return {k: v for k, v in fields.items() if v != ""}


def volume(v) -> dict:
    """A closed tomography scan's ScanVolume as status.scans[].volume (complete: false when angles or slices
    are missing from the volume file)."""
    return {"projectionsExpected": v.projections_expected, "projectionsUsed": v.projections_used,
            "projectionsLost": v.projections_lost, "slicesMissing": v.slices_missing, "complete": v.complete}


def status_patch(o: Observed, old_status: dict, generation: int | None, selector: str) -> dict:
    """The `status` the operator writes for these observations (not `observedGeneration`: the
    reconcile writes it once it has applied that generation)."""
    current, why = phase(o)
    ready = ready_counts(o)
    writer = next((s for s in o.stages.values() if s.stage == "writer"), None)
    scans = [without_empty({"scan": a.scan, "expected": a.expected, "written": a.written, "partial": a.partial,
                            "lost": a.lost, "duplicates": a.duplicates, "complete": a.complete, "file": a.file,
                            **({"volume": volume(a.volume)} if a.HasField("volume") else {})})
             for a in (writer.scans if writer else [])]  # no file yet until a scan's first result
    old_conditions = old_status.get("conditions") or []
    spec_ok = not o.spec_errors
    all_ready = all(ready.get(r, 0) >= n for r, n in o.desired.items())
    overdue = startup_overdue(o)
    conditions = [
        condition(old_conditions, "SpecValid", spec_ok, "Valid" if spec_ok else "Invalid",
                  "; ".join(o.spec_errors), generation),
        condition(old_conditions, "StagesReady", all_ready,
                  "StageFailed" if current == "Failed" else "StartupTimeout" if overdue else
                  "AllReady" if all_ready else "Waiting",
                  why or overdue or ", ".join(f"{r} {ready.get(r, 0)}/{n}" for r, n in o.desired.items()), generation),
        condition(old_conditions, "Succeeded", current == "Succeeded", current, why, generation),
    ]
    out = {
        "phase": current,
        "conditions": conditions,
        "stages": {role: {"desired": n, "ready": ready.get(role, 0)} for role, n in o.desired.items()},
        "workerReplicas": sum(1 for p in o.pods if p.role == "worker"),
        "workers": f"{ready.get('worker', 0)}/{o.desired.get('worker', 0)}",
        "workerSelector": selector,
    }
    out["framesWritten"], out["framesLost"] = frames_so_far(writer) if writer else (0, 0)
    if writer is not None:
        total = writer.closed_total  # every closed scan, summed (status.scans lists only the last few)
        out["closed"] = {"scans": writer.scans_closed, "expected": total.expected, "written": total.written,
                         "partial": total.partial, "lost": total.lost, "duplicates": total.duplicates}
    if scans:
        out["scans"] = scans
    if writer is not None and writer.elapsed_s > 0 and o.started:
        out["throughputGbps"] = round(writer.bytes_in / writer.elapsed_s / 1e9, 6)
    out["message"] = why or (old_status.get("message") if current == "Failed" else None)
    return out  # a None message removes the field (kopf patches status with a JSON merge patch)


def ingest_addresses(services: list[dict], port: int) -> list[str]:
    """Where outside sources connect, one per lane, from the distributors' Services (their route ports)."""
    out = []
    for svc in services:
        meta, spec = svc["metadata"], svc.get("spec") or {}
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        node_port = next((p.get("nodePort") for p in spec.get("ports", []) if p.get("port") == port), None)
        if spec.get("type") == "LoadBalancer" and ingress:
            out.append(f"tcp://{ingress[0].get('ip') or ingress[0].get('hostname')}:{port}")
        elif spec.get("type") in ("NodePort", "LoadBalancer") and node_port:
            out.append(f"tcp://NODE-ADDRESS:{node_port}")
        else:
            out.append(f"tcp://{meta['name']}.{meta['namespace']}.svc:{port}")
    return out
