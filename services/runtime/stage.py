"""What every stage process shares: lifecycle, control server, metrics, sockets, clean shutdown.

A stage's main thread owns its ZeroMQ sockets and turns its reactor (services/runtime/reactor.py) in
a loop: a role registers in `setup()` the sockets it reads with their handlers, its periodic tasks,
and sends through `self.reactor.send` (which waits for room: backpressure). The gRPC threads only
set events or queue parameter updates for the main thread. Lifecycle:
configured -> running -> draining -> finished (or failed). SIGTERM and the Stop call end the
loop; the process then closes its sockets and exits 0 (1 if the stage failed). A stage that fails
once started first keeps serving its metrics and status for $DETSTREAM_FAILED_LINGER_S seconds (30
by default; SIGTERM or Stop end it sooner), so that Prometheus scrapes the failed state before the
process goes. One that cannot even start exits at once: its pod crash-loops, which Kubernetes and
the operator report ("pod NAME: CrashLoopBackOff: its last words").

Probes (served on the metrics port, see `probes`): /readyz answers 200 once the stage is set up (its
sockets bound and connected) until it stops or fails, as its gRPC health service says SERVING;
/healthz answers 200 while the main loop turns (and while the stage is being set up).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

import zmq
from grpc_health.v1 import health_pb2

from detstream.services.dataplane.security import Keys, KeysMissing, ZapHandler
from detstream.services.dataplane.wire import Gaps, Geometry, Message, WireError, decode, receive_parts
from detstream.services.model.plan import Plan
from detstream.services.runtime import control
from detstream.services.runtime.faults import failpoint
from detstream.services.runtime.metrics import Counters, StageMetrics
from detstream.services.runtime.reactor import Reactor
from detstream.v1.control_pb2 import CONFIGURED, DRAINING, FAILED, FINISHED, RUNNING, StageState, StageStatus
from detstream.v1.wire_pb2 import Kind

# The environment every stage process starts with (the local runner's and the operator's; a value the user
# set wins). A stage's parallelism is its replicas: a library's OpenMP threads (bitshuffle's, in the DECTRIS
# decoder) spin-wait against the other stages on the same cores. `python -m benchmarks.ingest --replicas 2`
# with and without it: 665 against 229 frames/s, 0.95 against 3.7 ms of source CPU per image.
STAGE_ENV = {"OMP_NUM_THREADS": "1"}

POLL_MS = 100
HOUSEKEEPING_S = 0.1  # how often a stage checks its timeouts and refreshes its gauges (not per message)
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
REJECT_LOG_EVERY = 1000  # log the first message of each rejection reason, then every Nth
FAILED_LINGER_ENV = "DETSTREAM_FAILED_LINGER_S"
FAILED_LINGER_S = 30.0  # longer than a scrape interval (the chart's PodMonitor scrapes every 15 s)

# A main loop that has not turned for this long is hung: /healthz fails, and the kubelet restarts the
# pod. One turn polls at most POLL_MS, then handles what arrived (a worker's batch, a writer's flush);
# a wait for room downstream (backpressure) turns too (`waiting`).
STALL_S = 30.0

log = logging.getLogger("detstream.stage")


class StageError(Exception):
    """A failure with a clear cause (bad file, bad setting): reported without a traceback."""


def failed_linger_s() -> float:
    """Seconds a failed stage keeps serving its metrics before it exits ($DETSTREAM_FAILED_LINGER_S)."""
    text = os.environ.get(FAILED_LINGER_ENV, str(FAILED_LINGER_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise SystemExit(f"{FAILED_LINGER_ENV}={text!r}: want a number of seconds >= 0 (0: exit at once)")
    return seconds


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
        self.t_end = 0.0   # when it finished or failed: its elapsed time stops there
        self.log = logging.getLogger(f"detstream.{self.name}")
        self.key_name = self.me.name       # whose keys this stage holds (see services/dataplane/security.py)
        self.curve = self.spec.security.data_plane == "curve"
        self.keys: Keys | None = None
        self.monitors: list[zmq.Socket] = []
        self.connection_monitors: dict[zmq.Socket, Callable[[], None]] = {}  # see socket(on_connect=)
        self.reactor = Reactor(self.receive, self.waiting, POLL_MS)
        self.reject_lock = threading.Lock()
        self.zap: ZapHandler | None = None
        self.linger_s = failed_linger_s()
        self.serving = False   # set up, sockets bound and connected, not yet stopping
        self.turned = 0.0      # when the main loop last turned (0: not looping yet)

    # -- sockets -------------------------------------------------------------------------------
    def socket(self, kind: int, *, bind: str | None = None, connect: Sequence[str | tuple[str, int, str]] = (),
               server: str = "",
               on_connect: Callable[[], None] | None = None, routing_id: bytes = b"",
               context: zmq.Context | None = None) -> zmq.Socket:
        """A socket with bounded queues on both sides and no lingering at close. `connect` lists
        peers as (role, index, port) of the plan, or as endpoint strings (a source outside the
        session; `server` then names the stage it reaches, for its CURVE key). ZeroMQ retries
        connections by itself, so peers may come up in any order. A bound socket's failed
        handshakes (garbage, or a client without the session's key) are counted as rejected.
        `on_connect()` runs in the main loop (within HOUSEKEEPING_S) after each connection made (the
        first, and every one after the peer restarted: see check_connections). `routing_id` names this socket
        to a ROUTER it connects to, so that the ROUTER can address it. `context` is another ZeroMQ
        context than the stage's (one whose termination tells when its sockets' queues have left)."""
        hwm = self.spec.transport.high_water_mark
        sock = (context or self.ctx).socket(kind)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if routing_id:
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
        if bind:
            if self.curve:
                self.held_keys().curve_server(sock, self.key_name, domain=bind)
            self.monitors.append(sock.get_monitor_socket(HANDSHAKE_EVENTS))
            sock.bind(f"tcp://{self.bind_host}:{self.me.ports[bind]}")
        if on_connect is not None:  # before connecting, so that no connection goes unseen
            self.connection_monitors[sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)] = on_connect
        for peer in connect:
            if self.curve:
                self.held_keys().curve_client(sock, self.key_name,
                                              server if isinstance(peer, str) else f"{peer[0]}-{peer[1]}")
            sock.connect(peer if isinstance(peer, str) else self.plan.endpoint(*peer))
        return sock

    def check_connections(self, now: float = 0.0) -> None:
        """Run the `on_connect` callbacks of the connections made since the last check (a periodic task
        of every stage that asked for one, not a socket of the reactor's: a stage reading one socket
        waits inside its receive, without a poll)."""
        from zmq.utils.monitor import recv_monitor_message
        for monitor, on_connect in self.connection_monitors.items():
            while monitor.poll(0):
                recv_monitor_message(monitor)
                on_connect()

    def watch_handshakes(self) -> None:
        """Count the failed handshakes on bound sockets (thread: the monitors are its own sockets)."""
        from zmq.utils.monitor import recv_monitor_message
        if not self.monitors:
            return  # nothing bound (sources, workers): an empty poll returns at once, and would spin
        poller = zmq.Poller()
        for m in self.monitors:
            poller.register(m, zmq.POLLIN)
        while not self.closing.is_set():
            try:
                for sock, _ in poller.poll(POLL_MS):
                    event = recv_monitor_message(sock)
                    # on a CURVE socket every failed handshake is a peer without the session's key: which
                    # side notices a mechanism mismatch first (and so which event comes) is a race
                    self.reject(WireError("auth" if self.curve else "handshake",
                                          f"{zmq.Event(event['event']).name} ({event['value']:#x}) from a peer "
                                          f"of {event['endpoint'].decode(errors='replace')}"))
            except zmq.ZMQError:
                return

    def receive(self, sock: zmq.Socket, envelope: bool = False, flags: int = 0) -> tuple[bytes | None, Message | None]:
        """One message, checked; a bad one is counted, logged once per kind, and None returned.
        With flags=zmq.NOBLOCK, raises zmq.Again when nothing is queued."""
        raw = receive_parts(sock, flags)
        peer = raw.pop(0).bytes if envelope else None
        try:
            msg = decode(raw, self.geometry)
            self.counters.sequence_gaps += self.gaps.see(msg.header)
            return peer, msg
        except WireError as exc:
            self.reject(exc)
            return peer, None

    def refuse(self, reason: str, msg: Message | None = None, why: str = "") -> None:
        """A well-formed message this stage cannot take (wrong kind, late, out of range): counted and
        logged as any rejected message."""
        h = msg.header if msg is not None else None
        listed = list(h.frames[:5]) if h is not None else []
        frames = f" frames {listed[:4]}{' ...' if len(listed) > 4 else ''}" if listed else ""
        what = f"{Kind.Name(h.kind) if h.kind in Kind.values() else h.kind} scan {h.scan}{frames} " \
               f"from {h.sender!r}" if h is not None else ""
        self.reject(WireError(reason, "; ".join(x for x in (what, why) if x)))

    def reject(self, exc: WireError) -> None:
        """Count a rejected message; log the first of each reason, then every REJECT_LOG_EVERY-th.
        Called from the main loop, the handshake monitor and the control threads."""
        with self.reject_lock:
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

    def set_state(self, state: StageState, message: str = "") -> None:
        if state in (FINISHED, FAILED) and self.t_start and not self.t_end:
            self.t_end = time.monotonic()
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
                             elapsed_s=(self.t_end or time.monotonic()) - self.t_start if self.t_start else 0.0)
        self.add_status(status)
        return status

    # -- hooks for the roles ---------------------------------------------------------------------
    def setup(self) -> None:
        """Create and bind/connect sockets; register their handlers and the periodic tasks."""

    def add_status(self, status: StageStatus) -> None:
        """Role-specific parts of the status (the writer's scan accounting)."""

    # -- the process -----------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.closing = threading.Event()
        monitor = None
        try:
            self.keys = self.load_keys()
        except KeysMissing as exc:
            self.log.error("failed: %s", exc)
            return 1
        self.metrics.serve(self.bind_host, self.me.ports["metrics"],
                           on_bad_request=lambda what: self.reject(WireError("http", what)), checks=self.probes())
        mtls = self.spec.security.control_plane == "mtls"
        credentials = self.held_keys().server_credentials(self.key_name) if mtls else None
        server, health = control.serve(self, self.bind_host, self.me.ports["control"], credentials)
        try:
            delay = failpoint(self.name, self.role, "setup-delay")
            if delay:
                self.log.info("failpoint: setup delayed by %g s", delay)
                self.stopping.wait(delay)
            if self.curve:
                self.zap = ZapHandler(self.ctx, self.held_keys().curve_clients(), self.log)
            self.setup()
            if self.connection_monitors:
                self.reactor.every(HOUSEKEEPING_S, self.check_connections)
            monitor = threading.Thread(target=self.watch_handshakes, name="handshakes", daemon=True)
            monitor.start()
            health.set("", health_pb2.HealthCheckResponse.SERVING)
            self.serving = True
            self.log.info("ready (control %s, metrics %s)", self.me.ports["control"], self.me.ports["metrics"])
            while not self.stopping.is_set():
                self.turned = time.monotonic()
                if self.started.is_set():
                    self.reactor.turn()
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
            self.serving = False
            health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            self.closing.set()
            if monitor is not None:
                monitor.join(1.0)
            if self.zap is not None:
                self.zap.stop()
            self.ctx.destroy(linger=0)
            if self.state == FAILED and self.started.is_set():
                self.linger()
            server.stop(grace=1.0)
        if self.state != FAILED:
            self.set_state(FINISHED)
        self.log.info("stopped")
        return 0 if self.state != FAILED else 1

    def linger(self) -> None:
        """Keep serving metrics and status (the failed state) for a while, unless told to stop: a
        stage that exited at once would never be scraped in state failed."""
        if self.linger_s and not self.stopping.is_set():
            self.log.info("serving metrics for %g s more, so that monitoring sees the failure (%s)",
                          self.linger_s, FAILED_LINGER_ENV)
            self.stopping.wait(self.linger_s)

    def waiting(self) -> bool:
        """One turn of a wait for room downstream (backpressure): the stage waits, it is not hung.
        False once the stage is stopped."""
        self.turned = time.monotonic()
        return not self.stopping.is_set()

    def probes(self) -> dict:
        """The kubelet's probes: /readyz (the stage can take work) and /healthz (its loop turns)."""
        def ready():
            ok = self.serving and self.state != FAILED
            return ok, StageState.Name(self.state).lower() if ok else (self.message or "not set up, or stopping")

        def live():
            idle = time.monotonic() - self.turned if self.turned else 0.0
            return idle < STALL_S, f"main loop last turned {idle:.1f} s ago" if self.turned else "setting up"
        return {"/readyz": ready, "/healthz": live}

    def held_keys(self) -> Keys:
        """The session's keys, loaded by run() when the security settings need them (only those ask)."""
        if self.keys is None:
            raise KeysMissing("the session's keys are needed here but were not loaded ($DETSTREAM_KEYS)")
        return self.keys

    def load_keys(self) -> Keys | None:
        """The session's keys, when its security settings need them ($DETSTREAM_KEYS)."""
        security = self.spec.security
        if security.data_plane == "plain" and security.control_plane == "insecure":
            return None
        keys = Keys.from_env()
        if keys is None:
            raise KeysMissing(f"spec.security asks for {security.data_plane} / {security.control_plane} but no "
                              f"session keys were given ($DETSTREAM_KEYS)")
        return keys

    def finish(self) -> None:
        """The stage has nothing more to do; it stays up (answering status) until stopped."""
        if self.state in (RUNNING, DRAINING):
            self.set_state(FINISHED)
