"""The distributor of one lane: gives frames only to workers that asked for them (credits).

Workers connect a DEALER to this ROUTER and offer credits; a frame is sent only against a
credit, and stays "in flight" (its buffers kept, no copy) until the writer acknowledges it: the
writer answers the results of this lane with RECEIPTs on the distributor's own connection to it,
and each receipt gives the credit back to the worker that held the frame. So a frame is done only
once its result is in the writer's hands (a worker killed with results still queued loses
nothing), the lane's end of scan, sent to the writer once every frame of the scan is
acknowledged, always arrives after the results it accounts for, and a worker sends nothing per
frame but its result. With no credit anywhere the distributor stops reading from its aggregator,
so backpressure reaches the sources instead of memory growing. A worker silent past the worker
timeout (no heartbeat) is declared dead and its in-flight frames go to others (the writer drops
the duplicates a late worker may still produce).

The lane's end of scan names its lost frames exactly: every frame of the lane this distributor never
saw acknowledged, as a bitmap, which the writer reads against the frames it has. That covers what
the aggregator never received and, after a restart of the aggregator or of this stage (a pod
restarted by Kubernetes), what died with the previous process: frames it had passed on are
written, the rest are lost, none is unaccounted. Frames of a scan finished here are refused late.

For a plugin that calibrates, the lane's share of the session's sample frames (frame numbers below the
plugin's `samples`, of the first scan this lane sees) is kept for the session and copied to every
worker as SAMPLE, also to a worker that joins later: so every worker calibrates on the same frames.
That costs `samples / lanes` frames of memory here.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import zmq

from detstream.services.dataplane.accounting import ClosedScans
from detstream.services.model.plan import lane_routing_id
from detstream.services.plugins import plugin_class
from detstream.services.runtime.stage import HOUSEKEEPING_S, POLL_MS, Stage
from detstream.services.dataplane.wire import (CREDIT, DUPLICATE, END_OF_SCAN, FRAME, HEARTBEAT, POLLIN, RECEIPT, SAMPLE,
                                     Header, Message, Outbox, frame_key, pack_frames)


@dataclass
class Worker:
    peer: bytes
    credit: int = 0
    full: bool = False                # its queue refused a frame: none more until it next speaks
    in_flight: dict[int, Message] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    samples_sent: int = 0             # of the distributor's sample frames, in their order

    @property
    def listed(self) -> bool:
        """Whether it is among the distributor's ready peers."""
        return self.credit > 0 and not self.full


@dataclass
class LaneScan:
    acked: np.ndarray                 # per frame of the scan: acknowledged already (a re-sent frame counts once)
    done: int = 0                     # frames acknowledged (each counted once)
    in_flight: int = 0
    end: Header | None = None         # the aggregator's END_OF_SCAN, once it came


class DistributorStage(Stage):
    role = "distributor"

    def setup(self):
        self.frames = self.socket(zmq.PULL, bind="frames")
        work = self.socket(zmq.ROUTER, bind="work")
        work.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished worker raises instead of dropping
        self.work = Outbox(work, self.name)
        self.writer = Outbox(self.socket(zmq.DEALER, connect=[("writer", 0, "results")],
                                         routing_id=lane_routing_id(self.me.index)), self.name)
        self.workers: dict[bytes, Worker] = {}
        self.holder: dict[int, Worker] = {}     # frame key -> the worker it is in flight with
        self.ready: deque[bytes] = deque()     # peers with credit, round-robin
        self.resend: deque[Message] = deque()  # frames of dead workers, sent before new ones
        self.scans: dict[int, LaneScan] = {}
        self.closed = ClosedScans()
        self.lane_frames = np.arange(self.geometry.scan_frames) % self.spec.lanes == self.me.index
        self.poller = zmq.Poller()   # in this order: zmq.Poller answers in the order of registration
        self.poller.register(self.writer.socket, zmq.POLLIN)
        self.poller.register(self.work.socket, zmq.POLLIN)
        self.reading_frames = False                  # whether the poller watches `frames`
        self.samples_wanted = min(plugin_class(self.spec.plugin.name).samples(self.spec.plugin.params),
                                  self.geometry.scan_frames)
        self.samples: list[Message] = []              # this lane's sample frames, as SAMPLE messages
        self.sample_scan: int | None = None
        self.last_check = time.monotonic()

    def step(self):
        wants_frames = bool(self.ready) and not self.resend
        if wants_frames != self.reading_frames:  # (re-registering every turn costs as much as a message)
            self.poller.register(self.frames, zmq.POLLIN if wants_frames else 0)
            self.reading_frames = wants_frames
        # One message from each socket that has one, per turn: a poll per message costs less than
        # draining a socket to its refused read. Receipts free credits, worker messages offer them,
        # so both come before frames.
        held_since = self.held_back()
        for sock, _ in self.poller.poll(POLL_MS):
            if sock is self.writer.socket:
                _, msg = self.receive(sock)
                if msg is not None:
                    self.from_writer(msg)
            elif sock is self.work.socket:
                peer, msg = self.receive(sock, envelope=True)
                if msg is not None:
                    self.from_worker(peer, msg)
            elif self.ready and not self.resend:
                _, msg = self.receive(sock)
                if msg is not None:
                    self.from_aggregator(msg)
        while self.resend and self.ready:
            self.dispatch(self.resend.popleft())
        now = time.monotonic()
        if held_since:
            self.counters.backpressure_s += now - held_since
        if now - self.last_check > HOUSEKEEPING_S:
            self.last_check = now
            self.check_workers(now)
            self.update_gauges()

    def held_back(self) -> float:
        """When frames wait here for a worker's credit (queued from the aggregator, or to re-send)
        and no worker has any: now, else 0. Only looked at while no worker has credit."""
        if self.ready or not (self.resend or self.frames.get(zmq.EVENTS) & POLLIN):
            return 0.0
        return time.monotonic()

    def from_aggregator(self, msg: Message) -> None:
        h = msg.header
        if h.scan in self.closed:
            self.refuse("late", msg, "the scan is finished in this lane")
        elif h.kind == END_OF_SCAN:
            self.lane_scan(h.scan).end = h
            self.finish_scans()
        elif h.kind == FRAME:
            scan = self.lane_scan(h.scan)
            if scan.acked[h.frame] or frame_key(h.scan, h.frame) in self.holder:
                self.refuse("late", msg, "frame done or in flight already")
                return
            self.counters.frames_in += 1
            self.counters.bytes_in += self.geometry.frame_bytes
            scan.in_flight += 1
            if h.frame < self.samples_wanted:
                self.keep_sample(msg)
            self.dispatch(msg)
        else:
            self.refuse("kind", msg)

    def keep_sample(self, msg: Message) -> None:
        """A sample frame of the first scan seen: kept, and copied to every worker (no credit needed)."""
        if self.sample_scan is None:
            self.sample_scan = msg.header.scan
        if msg.header.scan != self.sample_scan:
            return
        header = Header()
        header.CopyFrom(msg.header)
        header.kind = SAMPLE
        self.samples.append(Message(header, msg.parts))  # the same buffers: no copy
        for worker in list(self.workers.values()):
            self.send_samples(worker)

    def send_samples(self, worker: Worker) -> None:
        """The samples this worker lacks, as far as its queue takes them (the rest when it next speaks)."""
        while worker.samples_sent < len(self.samples):
            sample = self.samples[worker.samples_sent]
            try:
                self.work.send(sample.header, sample.parts, peer=worker.peer, flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # full (zmq.Again) or gone: again when it next speaks, or declared dead
                return
            worker.samples_sent += 1

    def lane_scan(self, number: int) -> LaneScan:
        scan = self.scans.get(number)
        if scan is None:
            scan = self.scans[number] = LaneScan(np.zeros(self.geometry.scan_frames, bool))
        return scan

    def from_worker(self, peer: bytes, msg: Message) -> None:
        h = msg.header
        if h.kind not in (CREDIT, HEARTBEAT):
            self.refuse("kind", msg)
            return
        worker = self.workers.get(peer)
        if worker is None:
            worker = self.workers[peer] = Worker(peer)
            self.log.info("worker %s joined", h.sender)
        worker.last_seen = time.monotonic()
        self.give_credit(worker, h.credit, room=True)  # it speaks, so it reads: its queue has room again
        self.send_samples(worker)

    def give_credit(self, worker: Worker, credit: int, room: bool = False) -> None:
        listed = worker.listed
        if room:
            worker.full = False
        # never more than a worker may hold: a confused or hostile peer cannot hoard frames
        worker.credit = min(worker.credit + credit, self.spec.workers.credits)
        if worker.listed and not listed:
            self.ready.append(worker.peer)

    def from_writer(self, msg: Message) -> None:
        """The writer's RECEIPT: it has the results of these frames. Each is done, and its credit
        goes back to the worker that held it."""
        if msg.header.kind != RECEIPT:
            self.refuse("kind", msg)
            return
        for key in msg.header.acked:
            self.acknowledge(key)
        self.finish_scans()

    def acknowledge(self, key: int) -> None:
        worker = self.holder.pop(key, None)
        if worker is None:
            return  # not in flight here: done already, or a dead worker's frame waiting to be re-sent
        msg = worker.in_flight.pop(key)
        if worker.peer in self.workers:
            self.give_credit(worker, 1)
        scan = self.scans.get(msg.header.scan)
        if scan is None or scan.acked[msg.header.frame]:
            return  # acknowledged already (the result of an earlier copy)
        scan.acked[msg.header.frame] = True
        scan.done += 1
        scan.in_flight -= 1

    def dispatch(self, msg: Message) -> None:
        while self.ready:
            peer = self.ready[0]
            worker = self.workers.get(peer)
            if worker is None or worker.credit <= 0:
                self.ready.popleft()
                continue
            try:
                self.work.send(msg.header, msg.parts, peer=peer, flags=zmq.NOBLOCK)
            except zmq.Again:  # its queue is full (more credits than the high-water mark lets through)
                worker.full = True
                self.ready.popleft()
                continue
            except zmq.ZMQError as exc:  # gone (EHOSTUNREACH): dead
                self.declare_dead(worker, f"send failed: {exc}")
                continue
            worker.credit -= 1
            key = frame_key(msg.header.scan, msg.header.frame)
            worker.in_flight[key] = msg
            self.holder[key] = worker
            self.ready.rotate(-1) if worker.credit else self.ready.popleft()
            self.counters.frames_out += 1
            self.counters.bytes_out += self.geometry.frame_bytes
            return
        self.resend.appendleft(msg)  # nobody can take it now; first in line when credit comes

    def check_workers(self, now: float) -> None:
        timeout = self.spec.transport.worker_timeout_s
        for worker in [w for w in self.workers.values() if now - w.last_seen > timeout]:
            self.declare_dead(worker, f"silent for {now - worker.last_seen:.1f} s")

    def declare_dead(self, worker: Worker, why: str) -> None:
        del self.workers[worker.peer]
        self.work.forget(worker.peer)
        self.counters.workers_lost += 1
        self.counters.resent += len(worker.in_flight)
        for key, msg in worker.in_flight.items():
            del self.holder[key]
            msg.header.flags |= DUPLICATE
            self.resend.append(msg)
        self.log.warning("worker declared dead (%s); re-sending its %d frames", why, len(worker.in_flight))

    def finish_scans(self) -> None:
        for number, scan in list(self.scans.items()):
            if scan.end is not None and scan.in_flight == 0:
                self.finish_scan(number, scan)

    def finish_scan(self, number: int, scan: LaneScan) -> None:
        end = scan.end
        lost = self.lane_frames & ~scan.acked
        count = int(np.count_nonzero(lost))
        self.writer.send(Header(kind=END_OF_SCAN, scan=number, expected=end.expected, sent=scan.done,
                                partial=end.partial, lost=count, scan_rows=end.scan_rows, scan_cols=end.scan_cols),
                         [pack_frames(lost)] if count else ())
        del self.scans[number]
        self.closed.add(number)
        if count > end.lost:  # not the aggregator's: frames that died with a restarted stage (or on the way)
            self.log.warning("scan %d: %d frames the aggregator passed on were not acknowledged here (this stage "
                             "or the aggregator restarted mid-scan?): the writer counts those it lacks as lost",
                             number, count - end.lost)
        self.log.info("scan %d done in this lane: %d frames, %d lost", number, scan.done, count)

    def update_gauges(self) -> None:
        c = self.counters
        c.workers = len(self.workers)
        c.credits = sum(w.credit for w in self.workers.values())
        c.in_flight = sum(len(w.in_flight) for w in self.workers.values())
        c.queue_depth = len(self.resend)
