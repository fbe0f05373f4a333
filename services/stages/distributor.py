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
The credits, the frames in flight and the lane's scans are `CreditLedger` in `dataplane/credits.py`;
this module holds the sockets, the clock and the samples.

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

import numpy as np
import zmq

from detstream.services.dataplane.credits import CreditLedger, Worker
from detstream.services.dataplane.scans import Scan
from detstream.services.dataplane.wire import (
    CREDIT,
    END_OF_SCAN,
    FRAME,
    HEARTBEAT,
    POLLIN,
    RECEIPT,
    SAMPLE,
    Header,
    Message,
    Outbox,
    pack_frames,
)
from detstream.services.model.plan import lane_routing_id
from detstream.services.plugins import plugin_class
from detstream.services.runtime.stage import HOUSEKEEPING_S, Stage


class DistributorStage(Stage):
    role = "distributor"

    def setup(self):
        self.frames = self.socket(zmq.PULL, bind="frames")
        work = self.socket(zmq.ROUTER, bind="work")
        work.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished worker raises instead of dropping
        self.work = Outbox(work, self.name)
        self.writer = Outbox(self.socket(zmq.DEALER, connect=[("writer", 0, "results")],
                                         routing_id=lane_routing_id(self.me.index)), self.name)
        self.ledger = CreditLedger(self.me.index, self.spec.lanes, self.spec.scan.rows, self.spec.scan.cols,
                                   self.spec.workers.credits)
        self.workers, self.ready, self.resend = self.ledger.workers, self.ledger.ready, self.ledger.resend
        self.samples_wanted = min(plugin_class(self.spec.plugin.name).samples(self.spec.plugin.params),
                                  self.geometry.scan_frames)
        self.samples: list[Message] = []              # this lane's sample frames, as SAMPLE messages
        self.sample_scan: int | None = None
        self.held_since = 0.0                         # since when frames wait for a credit (0: they do not)
        # In this order: receipts free credits, worker messages offer them, so both come before frames;
        # frames are read only while a worker has credit and no frame of a dead worker waits.
        self.reactor.on_message(self.writer.socket, self.from_writer)
        self.reactor.on_message(self.work.socket, self.from_worker, envelope=True)
        self.reactor.on_message(self.frames, self.from_aggregator, when=lambda: bool(self.ready) and not self.resend)
        self.reactor.every(0, self.after_turn)
        self.reactor.every(HOUSEKEEPING_S, self.housekeeping)

    def after_turn(self, now: float) -> None:
        """Re-send dead workers' frames as credit allows; count the time frames wait for credit."""
        while self.resend and self.ready:
            self.dispatch(self.resend.popleft())
        if self.held_since:
            self.counters.backpressure_s += now - self.held_since
        self.held_since = now if self.held_back() else 0.0

    def housekeeping(self, now: float) -> None:
        self.check_workers(now)
        self.update_gauges()

    def held_back(self) -> bool:
        """Whether frames wait here for a worker's credit (queued from the aggregator, or to re-send)
        and no worker has any."""
        return not self.ready and bool(self.resend or self.frames.get(zmq.EVENTS) & POLLIN)

    def from_aggregator(self, msg: Message) -> None:
        h = msg.header
        if h.scan in self.ledger.closed:
            self.refuse("late", msg, "the scan is finished in this lane")
        elif h.kind == END_OF_SCAN:
            self.ledger.end(h)
            self.finish_scans()
        elif h.kind == FRAME:
            if not self.ledger.take(h):
                self.refuse("late", msg, "frame done or in flight already")
                return
            self.counters.frames_in += 1
            self.counters.bytes_in += self.geometry.frame_bytes
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
                if not self.reactor.send(self.work, sample.header, sample.parts, peer=worker.peer, wait=False):
                    return  # full: the rest when it next speaks
            except zmq.ZMQError:  # gone: it will be declared dead
                return
            worker.samples_sent += 1

    def from_worker(self, peer: bytes, msg: Message) -> None:
        h = msg.header
        if h.kind not in (CREDIT, HEARTBEAT):
            self.refuse("kind", msg)
            return
        worker, new = self.ledger.heard(peer, h.credit, time.monotonic())
        if new:
            self.log.info("worker %s joined", h.sender)
        self.send_samples(worker)

    def from_writer(self, msg: Message) -> None:
        """The writer's RECEIPT: it has the results of these frames. Each is done, and its credit
        goes back to the worker that held it."""
        if msg.header.kind != RECEIPT:
            self.refuse("kind", msg)
            return
        for key in msg.header.acked:
            self.ledger.acknowledge(key)
        self.finish_scans()

    def dispatch(self, msg: Message) -> None:
        """Send a frame to the next worker with credit, or keep it first in line."""
        ledger = self.ledger
        while (worker := ledger.next_ready()) is not None:
            try:
                sent = self.reactor.send(self.work, msg.header, msg.parts, peer=worker.peer, wait=False)
            except zmq.ZMQError as exc:  # gone (EHOSTUNREACH): dead
                self.declare_dead(worker, f"send failed: {exc}")
                continue
            if not sent:  # its queue is full (more credits than the high-water mark lets through)
                ledger.refused_full(worker)
                continue
            ledger.sent(worker, msg)
            self.counters.frames_out += 1
            self.counters.bytes_out += self.geometry.frame_bytes
            return
        ledger.wait(msg)

    def check_workers(self, now: float) -> None:
        timeout = self.spec.transport.worker_timeout_s
        for worker in self.ledger.silent(now, timeout):
            self.declare_dead(worker, f"silent for {now - worker.last_seen:.1f} s")

    def declare_dead(self, worker: Worker, why: str) -> None:
        resent = self.ledger.dead(worker)
        self.work.forget(worker.peer)
        self.counters.workers_lost += 1
        self.counters.resent += resent
        self.log.warning("worker declared dead (%s); re-sending its %d frames", why, resent)

    def finish_scans(self) -> None:
        for scan, lost in self.ledger.finished():
            self.finish_scan(scan, lost)

    def finish_scan(self, scan: Scan, lost: np.ndarray) -> None:
        """Tell the writer the lane is done with the scan: frames acknowledged, and the lost ones as a bitmap."""
        end = scan.last_end
        count = int(np.count_nonzero(lost))
        self.reactor.send(self.writer, Header(kind=END_OF_SCAN, scan=scan.number, expected=end.expected,
                                              sent=scan.count, partial=end.partial, lost=count,
                                              scan_rows=end.scan_rows, scan_cols=end.scan_cols),
                          [pack_frames(lost)] if count else ())
        if count > end.lost:  # not the aggregator's: frames that died with a restarted stage (or on the way)
            self.log.warning("scan %d: %d frames the aggregator passed on were not acknowledged here (this stage "
                             "or the aggregator restarted mid-scan?): the writer counts those it lacks as lost",
                             scan.number, count - end.lost)
        self.log.info("scan %d done in this lane: %d frames, %d lost", scan.number, scan.count, count)

    def update_gauges(self) -> None:
        c = self.counters
        c.workers = len(self.workers)
        c.credits = sum(w.credit for w in self.workers.values())
        c.in_flight = sum(len(w.in_flight) for w in self.workers.values())
        c.queue_depth = len(self.resend)
