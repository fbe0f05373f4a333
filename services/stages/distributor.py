"""The distributor of one lane: routes the lane's blocks to workers with credit, with small messages only
(docs/full-rate.md). No pixel passes through it.

A source asks where a block goes (WANT, on its `route` port); the distributor picks a worker with
credit for the block's frames (its `work` port: workers offer credits there, naming their `data`
address) and answers every source that asked (ASSIGN); the sources send their sectors of the block
straight to that worker. A frame stays open until the writer's RECEIPT (on the distributor's own
connection to the writer), which gives its credit back and goes on to every source (RELEASE: they may
drop the frame); a worker's word that a frame of its block never came (absent) gives the credit back
too. So a frame is done only once its result is in the writer's hands, the lane's end of scan (sent
to the writer once every frame of the scan is done or named absent) always arrives after the results it
accounts for, and a worker sends nothing per frame but its result. With no credit anywhere, blocks
wait unrouted and the sources, which keep a bounded window of frames, wait: that is the backpressure.
A worker silent past the worker timeout (no heartbeat) is declared dead and its blocks' open frames are
routed again, to other workers (ASSIGN flagged DUPLICATE; the writer drops the copies a late worker may
still produce).
The routing, the credits, the open frames and the lane's scans are `RoutingLedger` in
`dataplane/routing.py`; this module holds the sockets and the clock.

The lane's end of scan names its lost frames exactly: every frame of the lane never acknowledged, as a
bitmap, which the writer reads against the frames it has. That covers frames no source sent, frames of
a source that died, and, after a restart of this stage (a pod restarted by Kubernetes), what died with
the previous process: the sources ask again for the blocks they still keep, frames written before are
acknowledged again by the writer's copies, the rest are lost, none is unaccounted. Messages of a scan
finished here are refused late.

Routed by slice (spec.tomography, dataplane/bands.py), a WANT gets one ASSIGN per band, naming the band and the
worker that owns it (its CREDIT names its band), each once that worker has credit for the block's frames; the
writer's receipts and the RELEASEs name the band of each frame key, and the units of a band given up for want of
a worker go to the sources as RELEASEs too.
"""

from __future__ import annotations

import time

import numpy as np
import zmq

from detstream.services.dataplane.blocks import Blocks
from detstream.services.dataplane.routing import Route, RoutingLedger, Worker
from detstream.services.dataplane.scans import Scan
from detstream.services.dataplane.wire import (
    ABSENT,
    ASSIGN,
    CREDIT,
    DETECTOR_END,
    DUPLICATE,
    END_OF_SCAN,
    GONE,
    HEARTBEAT,
    RECEIPT,
    RELEASE,
    TAKEN,
    WANT,
    Header,
    Message,
    Outbox,
    is_tcp_address,
    pack_frames,
)
from detstream.services.model.plan import lane_routing_id
from detstream.services.plugins import session_bands
from detstream.services.runtime.stage import HOUSEKEEPING_S, Stage
from detstream.services.sources import source_class


class DistributorStage(Stage):
    role = "distributor"

    def setup(self):
        spec = self.spec
        route = self.socket(zmq.ROUTER, bind="route")
        route.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished source raises instead of dropping
        # ASSIGN and RELEASE must reach every source however late it reads: at a full queue the send would fail
        # (ROUTER_MANDATORY), and a lost ASSIGN leaves that source's part of a block unsent (the block ends
        # partial: seen once in a full test run). They are a header each, so this queue has no high-water mark.
        route.setsockopt(zmq.SNDHWM, 0)
        self.route = Outbox(route, self.name)
        self.work = self.socket(zmq.ROUTER, bind="work")
        self.writer = Outbox(self.socket(zmq.DEALER, connect=[("writer", 0, "results")],
                                         routing_id=lane_routing_id(self.me.index)), self.name)
        self.blocks = Blocks(spec.scan.frames, spec.transport.block_frames, spec.lanes)
        self.ledger = RoutingLedger(self.me.index, self.blocks, spec.scan.rows, spec.scan.cols, spec.workers.credits,
                                    series=source_class(spec.source.kind).series, bands=session_bands(spec).count)
        self.sources: dict[bytes, str] = {}        # ROUTER peer id -> source name, of every source that spoke
        self.worker_keys = {s.name for s in self.plan.of_role("worker")}  # the CURVE keys workers may name
        self.held_since = 0.0   # since when blocks wait for a worker's credit (0: none waits)
        # In this order: receipts free credits, workers offer them, so both come before the sources' asks.
        self.reactor.on_message(self.writer.socket, self.from_writer)
        self.reactor.on_message(self.work, self.from_worker, envelope=True)
        self.reactor.on_message(self.route.socket, self.from_source, envelope=True)
        self.reactor.every(0, self.count_backpressure)
        self.reactor.every(HOUSEKEEPING_S, self.housekeeping)

    def count_backpressure(self, now: float) -> None:
        """Count the time blocks wait unrouted (detstream_backpressure_seconds_total): every turn routes what
        credit allows, so a block still waiting after it has no worker with credit for it, and its sources wait."""
        if self.held_since:
            self.counters.backpressure_s += now - self.held_since
        self.held_since = now if self.ledger.waiting else 0.0

    def housekeeping(self, now: float) -> None:
        self.check_workers(now)
        self.finish_scans(now)
        self.assign_routed()
        if self.draining.is_set():
            self.ledger.drain()
            self.finish_scans(now)
            if not self.ledger.scans:
                self.finish()
        self.update_gauges()

    # sources

    def from_source(self, peer: bytes, msg: Message) -> None:
        h = msg.header
        self.sources[peer] = h.sender
        now = time.monotonic()
        if h.kind == WANT:
            routes = self.ledger.want_bands(h.scan, h.block, now)
            if not routes:
                if h.scan in self.ledger.book.closed:  # the source drops the scan's frames: nothing takes them
                    self.refuse("late", msg, f"block {h.block} of scan {h.scan}: the scan is closed in this lane")
                    self.to_source(peer, Header(kind=END_OF_SCAN, scan=h.scan))
                elif h.block >= self.blocks.count or self.blocks.lane(h.block) != self.me.index:
                    self.refuse("misrouted", msg, f"block {h.block} of scan {h.scan} is not this lane's")
                return
            for route in routes:
                route.askers.add(peer)
                if route.worker is not None:   # routed already: tell this source too
                    self.assign(route, [peer])
            self.assign_routed()
        elif h.kind == HEARTBEAT:  # a source held by backpressure: its scans wait, they are not silent
            self.ledger.source_held(now)
        elif h.kind == END_OF_SCAN:
            if not self.ledger.end(h.scan, h.sender, now, h.expected if h.flags & DETECTOR_END else None, h.sent):
                self.refuse("late", msg, "the scan is finished in this lane")
                return
            self.finish_scans(now)
        else:
            self.refuse("kind", msg)

    def assign(self, route: Route, peers) -> None:
        """Tell these sources where the block goes."""
        worker = route.worker
        if worker is None:  # (waiting for credit: it is told when routed)
            return
        header = Header(kind=ASSIGN, scan=route.scan, block=route.block, address=worker.address, key=worker.key,
                        flags=DUPLICATE if route.again else 0, band=route.band)
        for peer in peers:
            self.to_source(peer, header)

    def assign_routed(self) -> None:
        """Route the blocks waiting for credit, as far as credit goes, and tell their sources; release what
        was given up (a band without a worker)."""
        for route in self.ledger.route_waiting():
            self.assign(route, route.askers)
        self.counters.frames_out = self.ledger.frames_routed
        if self.ledger.released:
            keys, bands = zip(*self.ledger.released)
            self.ledger.released.clear()
            self.log.warning("%d frames given up%s: the sources drop them", len(keys),
                             " (bands without a worker, or not sent)" if self.ledger.bands > 1 else "")
            self.release(list(keys), list(bands))

    def release(self, keys: list[int], bands: list[int]) -> None:
        """Tell every source it may drop these frames (routed by slice: these bands of them)."""
        header = Header(kind=RELEASE, acked=keys, bands=bands)
        for peer in list(self.sources):
            self.to_source(peer, header)

    def to_source(self, peer: bytes, header: Header) -> None:
        try:
            self.reactor.send(self.route, header, peer=peer)
        except zmq.ZMQError:  # gone (EHOSTUNREACH): it asks again when it comes back
            self.sources.pop(peer, None)

    # workers and the writer

    def from_worker(self, peer: bytes, msg: Message) -> None:
        h = msg.header
        if h.kind in (TAKEN, ABSENT):
            worker = self.ledger.workers.get(peer)
            if worker is None:  # (one declared dead: what it had went elsewhere)
                return
            if h.kind == TAKEN:
                self.ledger.taken(worker, h.scan, h.block, time.monotonic())
                return
            for frame in h.frames:   # frames of a block it holds that never came
                self.ledger.absent(worker, h.scan, frame)
            self.assign_routed()
            self.finish_scans(time.monotonic())
            return
        if h.kind not in (CREDIT, HEARTBEAT):
            self.refuse("kind", msg)
            return
        if not is_tcp_address(h.address) or h.key not in self.worker_keys:
            self.refuse("address", msg, f"data address {h.address[:80]!r}, key {h.key[:40]!r}")
            return
        _, new = self.ledger.heard(peer, h.address, h.key, h.credit if h.kind == CREDIT else None,
                                   time.monotonic(), h.band)
        if new:
            self.log.info("worker %s joined (data at %s)", h.sender, h.address)
        self.assign_routed()

    def from_writer(self, msg: Message) -> None:
        """The writer's RECEIPT: it has the results of these frames. Each is done, its credit goes back to
        the worker that held it, and the sources may drop it."""
        h = msg.header
        if h.kind != RECEIPT:
            self.refuse("kind", msg)
            return
        if h.bands:
            for key, band in zip(h.acked, h.bands):
                self.ledger.acknowledge(key, band)
        else:
            for key in h.acked:
                self.ledger.acknowledge(key)
        self.release(list(h.acked), list(h.bands))
        self.assign_routed()
        self.finish_scans(time.monotonic())

    def check_workers(self, now: float) -> None:
        timeout = self.spec.transport.worker_timeout_s
        for worker in self.ledger.silent(now, timeout):
            self.declare_dead(worker, f"silent for {now - worker.last_seen:.1f} s")

    def declare_dead(self, worker: Worker, why: str) -> None:
        again = self.ledger.dead(worker)
        frames = sum(len(r.open) for r in again)
        self.counters.workers_lost += 1
        self.counters.resent += frames
        self.log.warning("worker declared dead (%s; data at %s): routing its %d frames again (%d blocks)", why,
                         worker.address, frames, len(again))
        gone = Header(kind=GONE, address=worker.address)
        for peer in list(self.sources):   # they send it nothing more: its queue would hold them
            self.to_source(peer, gone)
        self.assign_routed()

    # scans

    def finish_scans(self, now: float) -> None:
        spec = self.spec
        self.ledger.sweep(now, max(spec.source.replicas, 1), spec.transport.end_of_scan_timeout_s,
                          spec.scan.count, self.draining.is_set())
        for scan, lost, why in self.ledger.finished(now):
            self.finish_scan(scan, lost, why)

    def finish_scan(self, scan: Scan, lost: np.ndarray, why: str) -> None:
        """Tell the writer the lane is done with the scan: frames acknowledged, and the lost ones as a bitmap."""
        count = int(np.count_nonzero(lost))
        self.counters.outcomes["lost"] += count
        self.reactor.send(self.writer, Header(kind=END_OF_SCAN, scan=scan.number, expected=scan.done.size,
                                              sent=scan.count, lost=count, scan_rows=scan.rows, scan_cols=scan.cols),
                          [pack_frames(lost)] if count else ())
        log = self.log.warning if count else self.log.info
        log("scan %d closed (%s): %d frames written, %d lost", scan.number, why, scan.count, count)

    def update_gauges(self) -> None:
        c = self.counters
        c.workers = len(self.ledger.workers)
        c.credits = sum(w.credit for w in self.ledger.workers.values())
        c.in_flight = self.ledger.frames_in_flight()
        c.queue_depth = len(self.ledger.waiting)
