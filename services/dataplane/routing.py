"""The lane's routing ledger: which worker takes each block, credits, frames open. No sockets, no clock.

Data moves once (docs/full-rate.md): a source asks the lane where a block goes (`want`), the lane
picks a worker with credit for the block's frames and every source sends its sectors of the block
there. A frame stays open (charged to the worker that holds its block) until the writer's receipt
(`acknowledge`) or the worker's word that it never came (`absent`); either gives that frame's credit
back. A worker declared dead (`dead`) leaves its blocks' open frames to be routed again, to other
workers, before any new block: the sources still keep those frames, and send them to the new worker.
A scan of the lane is finished once every source has ended it and none of its frames is open; its
lost frames are then the lane's frames never acknowledged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from detstream.services.dataplane.blocks import Blocks
from detstream.services.dataplane.scans import Scan, ScanBook
from detstream.services.dataplane.wire import FRAME_BITS, frame_key


@dataclass(eq=False)
class Worker:
    """A worker as the lane knows it: its ROUTER peer id and index (worker-N)."""
    peer: bytes
    index: int
    last_seen: float                  # when it last spoke (seconds, the stage's clock)
    credit: int = 0                   # frames it can take now
    blocks: set[Route] = field(default_factory=set)   # the blocks it holds with frames open
    samples_sent: int = 0             # of the lane's sample frames, in their order


@dataclass(eq=False)
class Route:
    """A block of a scan, where it goes, and which of its frames are still open."""
    scan: int
    block: int
    open: set[int]                    # frame numbers not acknowledged and not reported absent
    worker: Worker | None = None      # None while it waits for credit
    again: bool = False               # routed again after its worker died (its frames go flagged DUPLICATE)


class RoutingLedger:
    """The routing of lane `lane` of the session's `blocks`, scans of rows x cols positions; `max_credit`:
    the most credits a worker may hold (spec.workers.credits), so a confused peer cannot hoard blocks.

    The stage asks `want(scan, block)` for a source, `route_waiting()` after credit came, and broadcasts
    every Route that got a worker to the sources (ASSIGN)."""

    def __init__(self, lane: int, blocks: Blocks, rows: int, cols: int, max_credit: int):
        self.lane, self.blocks, self.rows, self.cols = lane, blocks, rows, cols
        self.lane_frames = np.zeros(rows * cols, bool)
        for b in blocks.lane_blocks(lane):
            self.lane_frames[blocks.frames(b).start:blocks.frames(b).stop] = True
        self.max_credit = max_credit
        self.workers: dict[bytes, Worker] = {}
        self.routes: dict[tuple[int, int], Route] = {}   # (scan, block) -> its route, while frames are open
        self.waiting: deque[Route] = deque()             # blocks waiting for credit, re-routes first
        self.book = ScanBook(Scan)
        self.scans = self.book.open

    # workers

    def heard(self, peer: bytes, index: int, credit: int, now: float) -> tuple[Worker, bool]:
        """Worker `index` spoke (CREDIT or HEARTBEAT) offering `credit` more frames. Returns it, and
        whether it is new."""
        worker = self.workers.get(peer)
        new = worker is None
        if worker is None:
            worker = self.workers[peer] = Worker(peer, index, now)
        worker.last_seen = now
        worker.credit = min(worker.credit + credit, self.max_credit)
        return worker, new

    def silent(self, now: float, timeout: float) -> list[Worker]:
        """The workers not heard from for longer than `timeout` seconds."""
        return [w for w in self.workers.values() if now - w.last_seen > timeout]

    def dead(self, worker: Worker) -> list[Route]:
        """Forget `worker`: its blocks with open frames go to be routed again, first. Returns them."""
        del self.workers[worker.peer]
        again = sorted(worker.blocks, key=lambda r: (r.scan, r.block), reverse=True)
        for route in again:
            route.worker, route.again = None, True
            self.waiting.appendleft(route)
        return again[::-1]

    # blocks

    def want(self, scan: int, block: int) -> Route | None:
        """A source asks where `block` of `scan` goes: its route (routed, or waiting for credit; ask
        `route_waiting` later), or None when the scan is finished here or the block is not this lane's."""
        if scan in self.book.closed or self.blocks.lane(block) != self.lane or block >= self.blocks.count:
            return None
        route = self.routes.get((scan, block))
        if route is None:
            done = self.scan(scan).done
            frames = {f for f in self.blocks.frames(block) if not done[f]}
            if not frames:
                return None
            route = self.routes[(scan, block)] = Route(scan, block, frames)
            self.scan(scan).in_flight += len(frames)
            self.waiting.append(route)
            self.route_waiting()
        return route

    def route_waiting(self) -> list[Route]:
        """Give waiting blocks, in order, each to the worker with the most credit (the least loaded), once it
        has credit for all the block's open frames. Returns the blocks routed now."""
        routed = []
        while self.waiting:
            route = self.waiting[0]
            worker = max(self.workers.values(), key=lambda w: w.credit, default=None)
            if worker is None or worker.credit < len(route.open):
                break
            self.waiting.popleft()
            worker.credit -= len(route.open)
            worker.blocks.add(route)
            route.worker = worker
            routed.append(route)
        return routed

    def acknowledge(self, key: int) -> None:
        """The writer has the result of frame `key`: done, its credit back to the worker that holds its
        block (a key done already, or of a finished scan, changes nothing)."""
        scan_number, frame = key >> FRAME_BITS, key & ((1 << FRAME_BITS) - 1)
        scan = self.scans.get(scan_number)
        if scan is None or frame >= scan.done.size or scan.done[frame]:
            return
        if self.close_frame(scan_number, frame):
            scan.done[frame] = True
            scan.count += 1

    def absent(self, worker: Worker, key: int) -> None:
        """`worker`, which holds its block, says frame `key` never came from any source: no longer open
        (it stays not done: lost, unless a copy of it is acknowledged later)."""
        scan_number, frame = key >> FRAME_BITS, key & ((1 << FRAME_BITS) - 1)
        route = self.routes.get((scan_number, self.blocks.of(frame)))
        if route is not None and route.worker is worker:
            self.close_frame(scan_number, frame)

    def close_frame(self, scan_number: int, frame: int) -> bool:
        """Frame `frame` of scan `scan_number` is no longer open: its credit back to its block's worker.
        False when it was not open."""
        route = self.routes.get((scan_number, self.blocks.of(frame)))
        if route is None or frame not in route.open:
            return False
        route.open.discard(frame)
        self.scans[scan_number].in_flight -= 1
        worker = route.worker
        if worker is not None and worker.peer in self.workers:
            worker.credit += 1
        if not route.open:
            del self.routes[(scan_number, route.block)]
            if worker is not None:
                worker.blocks.discard(route)
            if route in self.waiting:
                self.waiting.remove(route)
        return True

    # scans

    def scan(self, number: int) -> Scan:
        return self.book.start(number, self.rows, self.cols, 0.0)  # (no clock here: unused)

    def end(self, number: int, sender: str, end) -> None:
        """A source's END_OF_SCAN (of a scan not finished)."""
        self.scan(number).ended(sender, end)

    def finished(self, sources: int) -> Iterator[tuple[Scan, np.ndarray]]:
        """Close and yield each scan that `sources` sources ended with no frame open, with its lost frames
        (bool per frame: the lane's frames never acknowledged)."""
        for number, scan in list(self.scans.items()):
            if len(scan.ends) >= sources and scan.in_flight == 0:
                self.book.close(number)
                yield scan, self.lane_frames & ~scan.done

    def keys(self, route: Route) -> list[int]:
        """The frame keys of a route's open frames, ascending."""
        return [frame_key(route.scan, f) for f in sorted(route.open)]
