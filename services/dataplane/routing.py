"""The lane's routing ledger: which worker takes each block, credits, frames open. No sockets, no clock.

Data moves once (docs/full-rate.md): a source asks the lane where a block goes (`want`), the lane
picks a worker with credit for the block's frames and every source sends its sectors of the block
there. A frame stays open (charged to the worker that holds its block) until the writer's receipt
(`acknowledge`) or the worker's word that it never came (`absent`); either gives that frame's credit
back. A worker declared dead (`dead`) leaves its blocks' open frames to be routed again, to other
workers, before any new block: the sources still keep those frames, and send them to the new worker.
A scan of the lane is finished once it has ended and none of its frames is open; its lost frames are
then the lane's frames never acknowledged. A scan ends when every source has ended it (END_OF_SCAN),
when it has had no input for the end-of-scan timeout, or on drain; with a detector that streams
series (a DECTRIS DCU: one source replica hears the series' end, DETECTOR_END, naming its frame count)
also once every frame of the lane below that count is done.

Scans are streamed back to back, so a scan nobody ever started ends too: when no scan is open and
nothing has come for the end-of-scan timeout since the last activity, the next scan of the session ends
with all its frames lost, and so on, one timeout per scan, until the session's scan count is reached.
The first scan waits for the sources as long as it takes (a session is started before its detector).
A scan below an open one that never came here (this lane started mid-session) ends the same way, one
timeout after it is noticed. With series, no scan ends as never started while none is open (scans start
when the detector starts a series, however long after the previous one).

Routing by slice (`bands` > 1, dataplane/bands.py): every block has one route per band, each given only to the
worker that owns the band (its CREDIT names it) when that worker has credit for the block's frames; credits,
open frames and acknowledgements count (frame, band) units, and a frame is done (not lost) once any band of it
is acknowledged (the writer names the frames some bands lack partial). So a slow band holds its routes, the
sources keep those frames, and their full windows hold them: the backpressure of the block mode, per band. A
band whose worker was declared dead waits for it to come back (Kubernetes restarts the same ordinal); once it
has had no worker for the end-of-scan timeout its routes are given up (their units closed, lost, and released
to the sources: `released`) until a worker of the band speaks again.
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
    """A worker as the lane knows it: its ROUTER peer id, the address of its `data` port and the name of
    its CURVE key (what the sources need to send it blocks)."""
    peer: bytes
    address: str
    key: str
    last_seen: float                  # when it last spoke (seconds, the stage's clock)
    band: int = 0                     # routing by slice: the band it owns
    credit: int = 0                   # frames it can take now
    blocks: set[Route] = field(default_factory=set)   # the blocks it holds with frames open


@dataclass(eq=False)
class Route:
    """A block of a scan, where it goes, and which of its frames are still open."""
    scan: int
    block: int
    open: set[int]                    # frame numbers not acknowledged and not reported absent
    band: int = 0                     # routing by slice: the band of the block's frames it routes
    worker: Worker | None = None      # None while it waits for credit
    again: bool = False               # routed again after its worker died (its frames go flagged DUPLICATE)
    taken: bool = False               # its worker has had a first message of it (it is being worked on)
    askers: set[bytes] = field(default_factory=set)   # the sources that asked for it (ROUTER peer ids)


# A scan every source ended, of which they sent this lane frames but asked nothing here, waits this long for
# their WANTs: a restarted lane gets the ends its predecessor missed, queued in the sources' sockets, before the
# sources (which notice the restart within a reactor turn) ask again for the blocks they keep.
ASK_GRACE_S = 1.0


class RoutingLedger:
    """The routing of lane `lane` of the session's `blocks`, scans of rows x cols positions; `max_credit`:
    the most credits a worker may hold (spec.workers.credits), so a confused peer cannot hoard blocks; `bands`:
    routing by slice over that many bands (1: the block mode).

    The stage asks `want(scan, block)` for a source, `route_waiting()` after credit came, and broadcasts
    every Route that got a worker to the sources (ASSIGN)."""

    def __init__(self, lane: int, blocks: Blocks, rows: int, cols: int, max_credit: int, series: bool = False,
                 bands: int = 1):
        self.lane, self.blocks, self.rows, self.cols, self.bands = lane, blocks, rows, cols, bands
        self.lane_frames = np.zeros(rows * cols, bool)
        for b in blocks.lane_blocks(lane):
            self.lane_frames[blocks.frames(b).start:blocks.frames(b).stop] = True
        self.max_credit = max_credit
        self.workers: dict[bytes, Worker] = {}
        self.rotation: deque[bytes] = deque()            # the workers in turn (round robin)
        self.routes: dict[tuple[int, int, int], Route] = {}   # (scan, block, band) -> its route, while frames are open
        self.waiting: deque[Route] = deque()             # blocks waiting for credit, re-routes first
        self.book = ScanBook(Scan)
        self.scans = self.book.open
        self.series = series
        self.why: dict[int, str] = {}                     # open scans that ended, and why
        self.last_activity: float | None = None           # None until the first input: the first scan waits
        self.skipped: tuple[int, float] | None = None     # a scan below an open one, never seen here; since when
        self.orphans: dict[int, float] = {}               # bands whose worker died -> since when
        self.given_up: set[int] = set()                   # orphans past the timeout: their routes are given up
        self.released: list[tuple[int, int]] = []         # (frame key, band) units given up, to release
        self.frames_routed = 0   # frames given to workers, re-routes included (by slice: band 0's, so a frame once)

    # workers

    def heard(self, peer: bytes, address: str, key: str, offer: int | None, now: float,
              band: int = 0) -> tuple[Worker, bool]:
        """A worker spoke (CREDIT or HEARTBEAT), naming its `data` address, CURVE key and (routing by slice) the
        band it owns; `offer` (a CREDIT's): the frames it may hold from this lane in all, of which those of its
        blocks still open are taken. A worker new here holds nothing of this lane, so it has the full credit (one
        declared dead that speaks again: its blocks went elsewhere). Returns it, and whether it is new."""
        worker = self.workers.get(peer)
        new = worker is None
        if worker is None:
            worker = self.workers[peer] = Worker(peer, address, key, now, credit=self.max_credit,
                                                 band=band if self.bands > 1 else 0)
            self.rotation.append(peer)
            self.orphans.pop(worker.band, None)
            self.given_up.discard(worker.band)
        worker.last_seen = now
        if offer is not None:
            worker.credit = min(offer, self.max_credit) - sum(len(r.open) for r in worker.blocks)
        return worker, new

    def silent(self, now: float, timeout: float) -> list[Worker]:
        """The workers not heard from for longer than `timeout` seconds."""
        return [w for w in self.workers.values() if now - w.last_seen > timeout]

    def dead(self, worker: Worker) -> list[Route]:
        """Forget `worker`: its blocks with open frames go to be routed again, first. Returns them."""
        del self.workers[worker.peer]
        self.rotation.remove(worker.peer)
        if self.bands > 1 and not any(w.band == worker.band for w in self.workers.values()):
            self.orphans.setdefault(worker.band, worker.last_seen)
        again = sorted(worker.blocks, key=lambda r: (r.scan, r.block), reverse=True)
        for route in again:
            route.worker, route.again, route.taken = None, True, False
            self.waiting.appendleft(route)
        return again[::-1]

    # blocks

    def want(self, scan: int, block: int, now: float) -> Route | None:
        """A source asks where `block` of `scan` goes: its route (routed already, or waiting: `route_waiting`
        routes it as credit allows), or None when the scan is finished here, the block is not this lane's or
        every frame of it is done already. (Routing by slice: the first band's; `want_bands` gives them all.)"""
        routes = self.want_bands(scan, block, now)
        return routes[0] if routes else None

    def want_bands(self, scan: int, block: int, now: float) -> list[Route]:
        """A source asks where `block` of `scan` goes: its routes, one per band with frames open (none: the scan
        is finished here, the block is not this lane's, or every frame of it is done already)."""
        if scan in self.book.closed:
            self.last_activity = now  # a source is there (replaying old scans): keep the next one open
            return []
        if self.blocks.lane(block) != self.lane or block >= self.blocks.count:
            return []
        self.scan(scan, now).last_input = self.last_activity = now
        self.scan(scan, now).asked = True
        routes = [r for r in (self.routes.get((scan, block, band)) for band in range(self.bands)) if r is not None]
        if not routes:
            done = self.scan(scan, now).done
            frames = [f for f in self.blocks.frames(block) if not done[f]]
            for band in range(self.bands) if frames else ():
                route = self.routes[(scan, block, band)] = Route(scan, block, set(frames), band)
                self.scan(scan, now).in_flight += len(frames)
                self.waiting.append(route)
                routes.append(route)
        return routes

    def route_waiting(self) -> list[Route]:
        """Give waiting blocks, in order, each to the next worker in turn (round robin) with credit for all the
        block's open frames (routing by slice: the worker of the route's band; a band that waits does not hold the
        others): a worker gets work as fast as it gives credit back. Returns the blocks routed now. The routes of
        a band given up close, lost, into `released`."""
        routed = []
        held: set[int] = set()   # bands whose first waiting route found no credit
        for route in list(self.waiting):
            if len(held) == self.bands:
                break
            if route.band in self.given_up:
                self.give_up(route)
                continue
            if route.band in held:
                continue
            worker = self.next_worker(len(route.open), route.band)
            if worker is None:
                held.add(route.band)
                continue
            self.waiting.remove(route)
            worker.credit -= len(route.open)
            worker.blocks.add(route)
            route.worker = worker
            routed.append(route)
            if route.band == 0:
                self.frames_routed += len(route.open)
        return routed

    def frames_in_flight(self) -> int:
        """Frames given to workers and not yet acknowledged; routing by slice a frame counts once, however many of
        its bands are out (the launcher's and the metric's counts are frames)."""
        routed = [r for r in self.routes.values() if r.worker is not None]
        if self.bands == 1:
            return sum(len(r.open) for r in routed)
        return len({frame_key(r.scan, frame) for r in routed for frame in r.open})

    def give_up(self, route: Route) -> None:
        """Close a route's open units undone (lost) and put them in `released`, for the sources to drop."""
        for frame in sorted(route.open):
            self.close_frame(route.scan, frame, route.band)
            self.released.append((frame_key(route.scan, frame), route.band))

    def next_worker(self, need: int, band: int = 0) -> Worker | None:
        """The next worker in turn with at least `need` credits (routing by slice: that owns `band`; it goes to
        the back of the turn), or None."""
        for _ in range(len(self.rotation)):
            peer = self.rotation[0]
            self.rotation.rotate(-1)
            worker = self.workers[peer]
            if worker.credit >= need and (self.bands == 1 or worker.band == band):
                return worker
        return None

    def acknowledge(self, key: int, band: int = 0) -> None:
        """The writer has the result of frame `key` (of band `band`): that unit is done, its credit back to the
        worker that holds its block, and the frame done (a unit done already, or of a finished scan, changes
        nothing)."""
        scan_number, frame = key >> FRAME_BITS, key & ((1 << FRAME_BITS) - 1)
        scan = self.scans.get(scan_number)
        if scan is None or frame >= scan.done.size:
            return
        if self.close_frame(scan_number, frame, band) and not scan.done[frame]:
            scan.done[frame] = True
            scan.count += 1

    def taken(self, worker: Worker, scan_number: int, block: int, now: float) -> None:
        """`worker` has had the first message of a block routed to it: the block is being worked on."""
        route = self.routes.get((scan_number, block, worker.band))
        if route is not None and route.worker is worker:
            route.taken = True
            self.scans[scan_number].last_input = now

    def absent(self, worker: Worker, scan_number: int, frame: int) -> None:
        """`worker`, which holds its block, says `frame` of scan `scan_number` never came from any source: no
        longer open (it stays not done: lost, unless a copy of it is acknowledged later)."""
        route = self.routes.get((scan_number, self.blocks.of(frame), worker.band))
        if route is not None and route.worker is worker:
            self.close_frame(scan_number, frame, worker.band)

    def close_frame(self, scan_number: int, frame: int, band: int = 0) -> bool:
        """Frame `frame` (band `band`) of scan `scan_number` is no longer open: its credit back to its block's
        worker. False when it was not open."""
        route = self.routes.get((scan_number, self.blocks.of(frame), band))
        if route is None or frame not in route.open:
            return False
        route.open.discard(frame)
        self.scans[scan_number].in_flight -= 1
        worker = route.worker
        if worker is not None and worker.peer in self.workers:
            worker.credit = min(worker.credit + 1, self.max_credit)
        if not route.open:
            del self.routes[(scan_number, route.block, band)]
            if worker is not None:
                worker.blocks.discard(route)
            if route in self.waiting:
                self.waiting.remove(route)
        return True

    # scans

    def scan(self, number: int, now: float = 0.0) -> Scan:
        return self.book.start(number, self.rows, self.cols, now)

    def end(self, number: int, sender: str, now: float, images: int | None = None, sent: int = 0) -> bool:
        """A source's END_OF_SCAN, saying it sent this lane `sent` frames; `images`: the detector ended the scan
        (DETECTOR_END), which has that many frames. False when the scan is finished here already (the message is
        late)."""
        if number in self.book.closed:
            self.last_activity = now  # a source is there (replaying old scans): keep the next one open
            return False
        scan = self.scan(number, now)
        scan.last_input = self.last_activity = now
        scan.ended(sender, sent)
        if images is not None and scan.images is None:   # the detector's first word on it stands
            scan.images = min(images, scan.done.size)
        return True

    def source_held(self, now: float) -> None:
        """A source is there, held by backpressure: the open scans wait for the pipeline, they are not silent."""
        for scan in self.scans.values():
            scan.last_input = now

    def sweep(self, now: float, sources: int, scan_timeout: float, scan_count: int, draining: bool) -> None:
        """End the scans that `sources` sources ended, that the detector's frames completed, or that were
        silent longer than scan_timeout; and the next scan of the session's `scan_count` when nobody started
        it (not once draining). Call `finished` then."""
        for band, since in self.orphans.items():
            if now - since > scan_timeout:
                self.given_up.add(band)
        for number, scan in self.scans.items():
            if number in self.why:
                continue
            if len(scan.ends) >= sources:
                if any(scan.ends.values()) and not scan.asked and now - scan.last_input <= ASK_GRACE_S:
                    continue   # sources sent this lane frames no WANT of which came yet: a restarted lane
                self.why[number] = "end of scan"
            elif scan.images is not None and not (self.lane_frames[:scan.images] & ~scan.done[:scan.images]).any():
                self.why[number] = f"the detector ended it: its {scan.images} frames are in"
            elif any(r.taken for r in self.routes_of(number)):  # workers are on it: busy, not silent
                scan.last_input = now
            elif now - scan.last_input > scan_timeout:
                self.why[number] = f"no input for {scan_timeout:g} s"
                self.abandon(number)
        upcoming = self.book.next_open()
        if upcoming in self.scans or upcoming >= scan_count or draining or (self.series and not self.scans):
            return
        if self.scans:  # open scans are all later: this one was over before this lane started
            if self.skipped is None or self.skipped[0] != upcoming:
                self.skipped = (upcoming, now)
            elif now - self.skipped[1] > scan_timeout:
                self.scan(upcoming, now)
                self.why[upcoming] = ("never seen here: the detector went on to a later one" if self.series else
                                      "never seen here: this lane started after it")
        elif self.last_activity is not None and now - self.last_activity > scan_timeout:
            self.scan(upcoming, now)
            self.why[upcoming] = f"never started: no input for {scan_timeout:g} s"

    def drain(self) -> None:
        """End every open scan: nothing more comes."""
        for number in self.scans:
            self.why.setdefault(number, "drained")
            self.abandon(number)

    def routes_of(self, number: int) -> list[Route]:
        return [r for (scan, _, _), r in self.routes.items() if scan == number]

    def abandon(self, number: int) -> None:
        """Give up the blocks of scan `number` that no worker has had a message of (their sources went
        silent, or drain): their open frames close undone (lost), their credit goes back, and the sources may
        drop what they keep of them (`released`)."""
        for route in self.routes_of(number):
            if not route.taken:
                self.give_up(route)

    def finished(self, now: float) -> Iterator[tuple[Scan, np.ndarray, str]]:
        """Close and yield each ended scan with no frame open, in scan order (a scan waits for the ones before
        it): with its lost frames (bool per frame: the lane's frames never acknowledged) and why it ended."""
        for number in sorted(self.why):
            scan = self.scans[number]
            if scan.in_flight or any(n < number for n in self.scans if n not in self.why):
                return
            self.book.close(number)
            self.last_activity = now
            yield scan, self.lane_frames & ~scan.done, self.why.pop(number)

