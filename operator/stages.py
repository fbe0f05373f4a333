"""The operator's calls to running stages over gRPC: status, start, live parameters, drain.

Every call has a short deadline and all pods are asked concurrently, so a slow or dead stage
costs at most one deadline per resync, never a blocked operator.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc

from detstream.operator.status import PodView
from detstream.services.model.plan import CLUSTER_PORTS, START_ORDER
from detstream.services.runtime.control import StageClient
from detstream.v1.control_pb2 import CONFIGURED, StageStatus

T = TypeVar("T")

DEADLINE_S = 1.0
_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="stages")


def _call(pod: PodView, fn: Callable[[StageClient], object], tls: Tls | None):
    credentials, name = (tls.credentials, tls.name_of(pod)) if tls else (None, None)
    client = StageClient(f"{pod.ip}:{CLUSTER_PORTS['control']}", timeout=DEADLINE_S, credentials=credentials,
                         tls_name=name)
    try:
        return fn(client)
    except grpc.RpcError:
        return None
    finally:
        client.close()


@dataclass(frozen=True)
class Tls:
    """The operator's client certificate for a session with mutual TLS (from its keys Secret)."""
    session: str
    credentials: grpc.ChannelCredentials

    def name_of(self, pod: PodView) -> str:
        """The name in the stage's certificate: its Service, SESSION-ROLE-INDEX (workers share index 0)."""
        ordinal = pod.name.rsplit("-", 1)[-1]
        return f"{self.session}-{pod.role}-{ordinal if pod.role != 'worker' and ordinal.isdigit() else 0}"


def each(pods: list[PodView], fn: Callable[[StageClient], T], tls: Tls | None = None) -> dict[str, T]:
    """fn(client) on every pod with an IP, concurrently; pods that do not answer are left out."""
    reachable = [p for p in pods if p.ip]
    results = _pool.map(lambda p: _call(p, fn, tls), reachable)
    return {p.name: r for p, r in zip(reachable, results) if r is not None}


def statuses(pods: list[PodView], tls: Tls | None = None) -> dict[str, StageStatus]:
    return each(pods, lambda c: c.status(), tls)


def start_waiting(pods: list[PodView], status: dict[str, StageStatus], tls: Tls | None = None) -> list[str]:
    """Start every stage that is up but not started (all of them at first; later, restarted or
    newly scaled ones), consumers before producers."""
    started = []
    for role in START_ORDER:
        waiting = [p for p in pods if p.role == role and p.name in status and status[p.name].state == CONFIGURED]
        started += list(each(waiting, lambda c: c.start(), tls))
    return started


def configure_workers(pods: list[PodView], params: dict, tls: Tls | None = None) -> dict[str, object]:
    return each([p for p in pods if p.role == "worker"], lambda c: c.configure(params), tls)


def drain(pods: list[PodView], tls: Tls | None = None) -> dict[str, object]:
    return each(pods, lambda c: c.drain(), tls)
