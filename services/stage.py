"""What every stage process shares: lifecycle, control server, metrics, sockets, clean shutdown.

A stage's main thread owns its ZeroMQ sockets and runs `step()` in a loop; the gRPC threads only
set events or queue parameter updates for the main thread. Lifecycle:
configured -> running -> draining -> finished (or failed). SIGTERM and the Stop call end the
loop; the process then closes its sockets and exits 0 (1 if the stage failed).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from typing import ClassVar

import zmq
from grpc_health.v1 import health_pb2

from detstream.services import control
from detstream.services.faults import failpoint
from detstream.services.metrics import Counters, StageMetrics
from detstream.services.plan import Plan
from detstream.services.wire import Gaps, Geometry, Message, WireError, decode
from detstream.v1.control_pb2 import CONFIGURED, DRAINING, FAILED, FINISHED, RUNNING, StageStatus

POLL_MS = 100
REJECT_LOG_EVERY = 1000  # log the first message of each rejection reason, then every Nth

log = logging.getLogger("detstream.stage")


class StageError(Exception):
    """A failure with a clear cause (bad file, bad setting): reported without a traceback."""


class Stage:
    role: ClassVar[str]

    def __init__(self, plan: Plan, index: int, bind_host: str | None = None):
        self.plan = plan
        self.me = plan.stage(self.role, index)
        # On Kubernetes every worker pod has index 0 (a Deployment): the pod name tells them apart.
        self.name = os.environ.get("POD_NAME") or self.me.name
        self.spec = plan.session_spec()
        self.geometry = Geometry.of(self.spec)
        self.bind_host = bind_host or self.me.host
        self.counters = Counters()
        self.metrics = StageMetrics(self.counters, plan.session, self.role, os.environ.get("POD_NAME") or index)
        self.gaps = Gaps()
        self.ctx = zmq.Context()
        self.state = CONFIGURED
        self.message = ""
        self.started = threading.Event()
        self.draining = threading.Event()
        self.stopping = threading.Event()
        self.updates: queue.SimpleQueue = queue.SimpleQueue()
        self.t_start = 0.0
        self.log = logging.getLogger(f"detstream.{self.name}")

    # -- sockets -------------------------------------------------------------------------------
    def socket(self, kind: int, *, bind: str | None = None, connect: list = ()) -> zmq.Socket:
        """A socket with bounded queues on both sides and no lingering at close. `connect` lists
        peers as (role, index, port) of the plan, or as endpoint strings (a source outside the
        session). ZeroMQ retries connections by itself, so peers may come up in any order."""
        hwm = self.spec.transport.high_water_mark
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if bind:
            sock.bind(f"tcp://{self.bind_host}:{self.me.ports[bind]}")
        for peer in connect:
            sock.connect(peer if isinstance(peer, str) else self.plan.endpoint(*peer))
        return sock

    def receive(self, sock: zmq.Socket, envelope: bool = False) -> tuple[bytes | None, Message | None]:
        """One message, checked; a bad one is counted, logged once per kind, and None returned."""
        raw = sock.recv_multipart(copy=False)
        peer = raw.pop(0).bytes if envelope else None
        try:
            msg = decode(raw, self.geometry)
            self.counters.sequence_gaps += self.gaps.see(msg.header)
            return peer, msg
        except WireError as exc:
            self.reject(exc)
            return peer, None

    def reject(self, exc: WireError) -> None:
        seen = self.counters.rejected[exc.reason]
        self.counters.rejected[exc.reason] += 1
        if seen % REJECT_LOG_EVERY == 0:
            self.log.warning("rejected a message (%s; %d so far of this kind)", exc, seen + 1)

    # -- lifecycle, called from the control threads ---------------------------------------------
    def start(self) -> None:
        if not self.started.is_set():
            self.t_start = time.monotonic()
            self.set_state(RUNNING)
            self.started.set()

    def drain(self) -> None:
        self.draining.set()

    def stop(self) -> None:
        self.stopping.set()

    def configure(self, params: dict) -> None:
        raise ValueError(f"the {self.role} stage takes no parameters")

    def set_state(self, state: int, message: str = "") -> None:
        self.state = state
        self.counters.state = state
        if message:
            self.message = message

    def status(self) -> StageStatus:
        c = self.counters
        status = StageStatus(stage=self.role, replica=self.me.index, state=self.state, message=self.message,
                             frames_in=c.frames_in, frames_out=c.frames_out, bytes_in=c.bytes_in,
                             bytes_out=c.bytes_out, in_flight=c.in_flight,
                             rejected=sum(c.rejected.values()), dropped=c.dropped,
                             elapsed_s=time.monotonic() - self.t_start if self.t_start else 0.0)
        self.add_status(status)
        return status

    # -- hooks for the roles ---------------------------------------------------------------------
    def setup(self) -> None:
        """Create and bind/connect sockets."""

    def step(self) -> None:
        """One turn of the main loop: poll (at most POLL_MS) and handle what arrived."""
        raise NotImplementedError

    def add_status(self, status: StageStatus) -> None:
        """Role-specific parts of the status (the writer's scan accounting)."""

    # -- the process -----------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.metrics.serve(self.bind_host, self.me.ports["metrics"])
        server, health = control.serve(self, self.bind_host, self.me.ports["control"])
        try:
            delay = failpoint(self.name, self.role, "setup-delay")
            if delay:
                self.log.info("failpoint: setup delayed by %g s", delay)
                self.stopping.wait(delay)
            self.setup()
            health.set("", health_pb2.HealthCheckResponse.SERVING)
            self.log.info("ready (control %s, metrics %s)", self.me.ports["control"], self.me.ports["metrics"])
            while not self.stopping.is_set():
                if self.started.is_set():
                    self.step()
                else:
                    self.stopping.wait(POLL_MS / 1000)
        except StageError as exc:
            self.log.error("failed: %s", exc)
            self.set_state(FAILED, str(exc))
            return 1
        except Exception as exc:
            self.log.exception("failed")
            self.set_state(FAILED, f"{type(exc).__name__}: {exc}")
            return 1
        finally:
            health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            self.ctx.destroy(linger=0)
            server.stop(grace=1.0)
        if self.state != FAILED:
            self.set_state(FINISHED)
        self.log.info("stopped")
        return 0 if self.state != FAILED else 1

    def finish(self) -> None:
        """The stage has nothing more to do; it stays up (answering status) until stopped."""
        if self.state in (RUNNING, DRAINING):
            self.set_state(FINISHED)
