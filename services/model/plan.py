"""The plan: which stage processes a session needs, and who binds and connects where.

`build_plan` is pure: a session and a `Network` (how stages are addressed: ports on 127.0.0.1
locally, Service names on Kubernetes) give the full list of stages. The local runner starts
them as processes, the operator turns them into Kubernetes objects; every stage reads the same
plan to find its peers. Topology (docs/full-rate.md), per lane l (blocks with block % lanes == l):

    source x S --DEALER--> distributor[l] (binds route, ROUTER): WANT, END_OF_SCAN; ASSIGN, RELEASE back
    source x S --PUSH--> worker (binds data, PULL; the address its lanes name in ASSIGN): BLOCK, the pixels
    distributor[l] (binds work, ROUTER) <--DEALER-- worker x M (each connects to every lane): credits
    worker --DEALER--> writer (binds results, ROUTER) <--DEALER-- distributor[l] (ends of scan; the
        writer's RECEIPTs of the lane's results come back on it: they acknowledge the frames)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from detstream.services.model.schema import parse, to_manifest
from detstream.services.model.session import Session, SessionSpec

# The pipeline's roles, in the data's order; each is a Stage subclass in services/stages/ROLE.py.
ROLES = ("source", "distributor", "worker", "writer")
START_ORDER = tuple(reversed(ROLES))  # consumers before producers
DATA_PORTS = {"distributor": ("route", "work"), "worker": ("data",), "writer": ("results",)}
LIVE_PORT = "live"  # the writer's HTTP port of the live view (spec.liveView), when enabled
CLUSTER_PORTS = {"control": 7100, "metrics": 9100, "route": 7200, "work": 7202, "results": 7203, "data": 7204,
                 LIVE_PORT: 8080}


def port_names(session: Session, role: str) -> tuple[str, ...]:
    """The ports a stage of `role` listens on: control, metrics, its data ports, and the writer's live view."""
    live = (LIVE_PORT,) if role == "writer" and session.spec.live_view.enabled else ()
    return ("control", "metrics", *DATA_PORTS.get(role, ()), *live)


def lane_routing_id(lane: int) -> bytes:
    """How the writer addresses the distributor of a lane (its DEALER's routing id)."""
    return b"distributor-%d" % lane


@dataclass(frozen=True)
class StagePlan:
    name: str                  # e.g. "worker-1"
    role: str
    index: int
    host: str                  # where other stages and the launcher reach it
    ports: dict[str, int] = field(default_factory=dict)

    def address(self, port: str) -> str:
        return f"{self.host}:{self.ports[port]}"


class Network(Protocol):
    def host(self, session: Session, role: str, index: int) -> str: ...
    def port(self, role: str, index: int, name: str) -> int: ...


class LocalNetwork:
    """Every stage on one host, each port taken from `ports` (free ports, found by the runner)."""

    def __init__(self, ports: Iterator[int], host: str = "127.0.0.1"):
        self._ports = ports
        self._host = host

    def host(self, session, role, index):
        return self._host

    def port(self, role, index, name):
        return next(self._ports)


class ClusterNetwork:
    """One Service per stage replica (`SESSION-ROLE-INDEX`), fixed ports: every pod has its own IP."""

    def host(self, session, role, index):
        return f"{session.name}-{role}-{index}"

    def port(self, role, index, name):
        return CLUSTER_PORTS[name]


@dataclass(frozen=True)
class Plan:
    session: str
    namespace: str
    spec: dict
    stages: tuple[StagePlan, ...]

    def stage(self, role: str, index: int) -> StagePlan:
        for s in self.stages:
            if s.role == role and s.index == index:
                return s
        raise LookupError(f"the plan has no {role}-{index}")

    def of_role(self, role: str) -> list[StagePlan]:
        return [s for s in self.stages if s.role == role]

    def endpoint(self, role: str, index: int, port: str) -> str:
        return "tcp://" + self.stage(role, index).address(port)

    def live_url(self) -> str | None:
        """The live view's address (http://HOST:PORT/), None when spec.liveView is off."""
        writer = self.stage("writer", 0)
        return f"http://{writer.address(LIVE_PORT)}/" if LIVE_PORT in writer.ports else None

    def session_spec(self) -> SessionSpec:
        return parse(SessionSpec, self.spec, "spec")

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))  # compact: 4096 workers fit a ConfigMap

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        stages = tuple(StagePlan(**s) for s in data.pop("stages"))
        return cls(stages=stages, **data)

    @classmethod
    def read(cls, path: Path) -> Plan:
        return cls.from_json(Path(path).read_text())


def replicas(session: Session) -> dict[str, int]:
    spec = session.spec
    return {
        "source": 0 if spec.source.kind == "external" else spec.source.replicas,
        "distributor": spec.lanes,
        "worker": spec.workers.replicas,
        "writer": 1,
    }


def build_plan(session: Session, network: Network) -> Plan:
    stages = []
    for role, count in replicas(session).items():
        for index in range(count):
            ports = {name: network.port(role, index, name) for name in port_names(session, role)}
            stages.append(StagePlan(f"{role}-{index}", role, index, network.host(session, role, index), ports))
    return Plan(session.name, session.namespace, to_manifest(session.spec), tuple(stages))
