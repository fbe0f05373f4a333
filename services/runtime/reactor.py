"""The reactor: one thread's loop over its ZeroMQ sockets, as odin-data's receiver base gives its
plugins. A stage registers what it reads (a socket and its handler), what it does periodically (a
task and its period), and sends through one door that waits for room (backpressure); the reactor
turns. A stage then holds only its own logic.

One turn waits at most `poll_ms` for input, hands what arrived to the handlers, then runs the
tasks that are due. How it waits is chosen for speed, as measured on the pipeline benchmark: with
one socket to read (the writer) it waits inside the receive (the socket's receive
timeout), without a poll; with several it polls once and reads each ready socket. Reading a socket
until ZeroMQ refuses (zmq.Again, a Python exception) is never done per message: a handler reads at
most `batch` messages a turn, the first of them announced by the poll or the blocking receive.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import zmq

from detstream.services.dataplane.wire import NOBLOCK, POLLIN, POLLOUT, Header, Outbox

Handler = Callable[..., None]


@dataclass
class Reader:
    socket: zmq.Socket
    handler: Handler      # handler(msg), or handler(peer, msg) with an envelope
    envelope: bool
    refused: Handler | None  # refused(peer): a message the checks refused (counted already)
    batch: int            # messages read per turn at most
    when: Callable[[], bool] | None  # read only while this says so (e.g. while a worker has credit)
    watched: bool = True  # registered with the poller for POLLIN now


@dataclass
class Task:
    period: float         # seconds; 0: every turn
    run: Callable[[float], None]   # run(now), now in time.monotonic() seconds
    due: float = 0.0


class Reactor:
    """Readers, writers-when-ready and periodic tasks of one thread's sockets.

    `receive(sock, envelope, flags)` reads and checks one message (the stage's: it counts a bad one
    and gives None); `waiting()` is called on each turn of a wait for room, and says whether to go on
    waiting (False once the stage is stopped)."""

    def __init__(self, receive: Callable, waiting: Callable[[], bool], poll_ms: int):
        self._receive = receive
        self._waiting = waiting
        self.poll_ms = poll_ms  # a stage polling several sockets may shorten it for a while (a worker's patterns)
        self.readers: list[Reader] = []
        self.writables: list[tuple[zmq.Socket, Callable[[], None], Callable[[], bool]]] = []
        self.tasks: list[Task] = []
        self.poller = zmq.Poller()
        self._writable_watched: dict[zmq.Socket, bool] = {}
        # Whether a task has work now (a source with frames to send): then a turn only looks at its sockets
        # and does not wait for input.
        self.busy: Callable[[], bool] = lambda: False

    # -- registration ----------------------------------------------------------------------------
    def on_message(self, sock: zmq.Socket, handler: Handler, *, envelope: bool = False, batch: int = 1,
                   when: Callable[[], bool] | None = None, refused: Handler | None = None) -> None:
        """Call `handler(msg)` (with an envelope: `handler(peer, msg)`) for each message arriving on `sock`
        that passes the checks; `refused(peer)` for one that does not (peer None without an envelope)."""
        reader = Reader(sock, handler, envelope, refused, batch, when)
        self.readers.append(reader)
        self.poller.register(sock, POLLIN)
        sock.setsockopt(zmq.RCVTIMEO, self.poll_ms)  # used when it is the only socket read (see turn)

    def on_writable(self, sock: zmq.Socket, handler: Callable[[], None], when: Callable[[], bool]) -> None:
        """Call `handler` when `sock` has room, watched only while `when()` (something waits to go)."""
        self.writables.append((sock, handler, when))
        self._writable_watched[sock] = False

    def every(self, seconds: float, task: Callable[[float], None]) -> None:
        """Run `task(now)` every `seconds` (0: every turn), after the turn's input is handled."""
        self.tasks.append(Task(seconds, task))

    # -- the loop --------------------------------------------------------------------------------
    def turn(self) -> None:
        """Wait at most poll_ms for input (not at all while `busy()`), handle it, run the tasks that are due."""
        wait_ms = 0 if self.busy() else self.poll_ms
        if len(self.readers) == 1 and not self.writables:
            self._read_one(self.readers[0], wait_ms)
        elif self.readers or self.writables:
            self._poll(wait_ms)
        now = time.monotonic()
        for task in self.tasks:
            if now >= task.due:
                task.due = now + task.period
                task.run(now)

    def _read_one(self, reader: Reader, wait_ms: int) -> None:
        """The only socket: the first message waits inside the receive (up to wait_ms), the rest of the batch
        is what is queued already."""
        if reader.when is not None and not reader.when():
            time.sleep(wait_ms / 1000)
            return
        flags = 0 if wait_ms else NOBLOCK
        for _ in range(reader.batch):
            try:
                self._handle(reader, flags)
            except zmq.Again:
                return
            flags = NOBLOCK

    def _poll(self, wait_ms: int) -> None:
        for reader in self.readers:
            if reader.when is not None:
                watch = reader.when()
                if watch != reader.watched:  # re-registering every turn costs as much as a message
                    self.poller.register(reader.socket, POLLIN if watch else 0)
                    reader.watched = watch
        for sock, _, when in self.writables:
            watch = when()
            if watch != self._writable_watched[sock]:
                self.poller.register(sock, POLLOUT if watch else 0)
                self._writable_watched[sock] = watch
        ready = dict(self.poller.poll(wait_ms))
        if not ready:
            return
        for sock, handler, _ in self.writables:
            if ready.get(sock, 0) & POLLOUT:
                handler()
        for reader in self.readers:  # in the order of registration: the stage says what comes first
            if ready.get(reader.socket, 0) & POLLIN:
                self._read_ready(reader)

    def _read_ready(self, reader: Reader) -> None:
        """Up to a batch from a socket the poll called readable. The poll's word can be stale by the time
        the socket is read (ZeroMQ may announce input that a receive then does not find, e.g. on a ROUTER
        whose peer left under CURVE; or a handler before this one read it): then there is nothing to read."""
        try:
            self._handle(reader, NOBLOCK)
            for _ in range(reader.batch - 1):
                if not cast(int, reader.socket.get(zmq.EVENTS)) & POLLIN:
                    break
                self._handle(reader, NOBLOCK)
        except zmq.Again:
            return

    def _handle(self, reader: Reader, flags: int) -> None:
        peer, msg = self._receive(reader.socket, reader.envelope, flags)
        if msg is None:
            if reader.refused is not None:
                reader.refused(peer)
        elif reader.envelope:
            reader.handler(peer, msg)
        else:
            reader.handler(msg)

    # -- sending ---------------------------------------------------------------------------------
    def send(self, outbox: Outbox, header: Header, parts=(), *, peer: bytes | None = None,
             wait: bool = True, on_wait: Callable[[], None] | None = None) -> bool:
        """Send one message; when the peer's queue is full, wait for room (backpressure), turning
        (`waiting()`), or with wait=False give up at once. True when sent; False when given up or the
        stage stopped meanwhile. `on_wait()` runs on each turn of the wait (it may raise to fail)."""
        try:
            outbox.send(header, parts, peer=peer, flags=NOBLOCK)  # the usual case: room in the queue, no poll
            return True
        except zmq.Again:
            if not wait:
                return False
        while self._waiting():
            if outbox.socket.poll(self.poll_ms, POLLOUT):
                outbox.send(header, parts, peer=peer, flags=NOBLOCK)
                return True
            if on_wait is not None:
                on_wait()
        return False
