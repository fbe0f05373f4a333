"""The aggregator of one lane: reassembles the sectors of each frame by frame number.

A complete frame goes on as one FRAME message whose parts are the very sector buffers that
arrived (no copy). A frame whose sectors do not all arrive within the frame timeout, or by the
end of its scan, goes on with the missing sectors zero-filled and flagged PARTIAL. When every
source has ended a scan (or it has been silent past the end-of-scan timeout), the lane reports
downstream how many of its frames it passed on, how many were partial and how many never came.

Scans are streamed back to back, so a scan nobody ever started is closed too: when no scan is
open and nothing has arrived for the end-of-scan timeout since the last activity (the last
input, or the close of the previous scan), the next scan of the session is closed with all its
frames lost, and so on, one timeout per scan, until the session's scan count is reached. The
first scan waits for the sources as long as it takes (a session is started before its detector). A
source that comes back sends the following scans as usual (its sectors of closed scans are
rejected as `late`). An aggregator started mid-session (a pod restarted by Kubernetes) closes the
scans below the first one it sees the same way, one timeout after it notices them: their frames
that its predecessor passed on are written, and the distributor names the others lost. When its
distributor restarts, the aggregator sends it the ends of the last scans it closed again (those
the previous distributor may have died holding; the ends of scans finished already are ignored).
Drain closes every open scan once the sectors already queued are read, and starts no further
scan: a drained session ends with the scans it had started.

Timeouts measure the sources' silence only while this stage can listen: time spent blocked on
a full distributor (backpressure) does not count, so a slow pipeline never closes scans early.
Frames waiting for missing sectors are bounded: past MAX_PENDING_PER_HWM x highWaterMark of them
(a source ahead of the others) the aggregator reads one message per pause, so the source ahead is
held back by its full queue while the others catch up; and each frame goes on (partial) after the
frame timeout, so a source that dies among others cannot make them grow either.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import zmq

from detstream.services.dataplane.accounting import ClosedScans
from detstream.services.runtime.stage import HOUSEKEEPING_S, POLL_MS, Stage
from detstream.services.dataplane.wire import END_OF_SCAN, FRAME, PARTIAL, SECTOR, Header, Message, Outbox

MAX_PENDING_PER_HWM = 8   # frames waiting for sectors from other sources, per unit of transport.highWaterMark
PACE_S = 0.001            # the pause per message while that many are waiting
ENDS_KEPT = 8             # ends of scans sent again to a restarted distributor: more than it ever has open


@dataclass
class OpenScan:
    frames: int                      # frames of this lane in the scan
    emitted: np.ndarray              # bitmap over the scan's frame numbers
    rows: int
    cols: int
    last_input: float
    ended_by: set = field(default_factory=set)
    sent: int = 0
    partial: int = 0


class AggregatorStage(Stage):
    role = "aggregator"

    def setup(self):
        self.lane = self.me.index
        self.ingest = self.socket(zmq.PULL, bind="ingest")
        self.ingest.setsockopt(zmq.RCVTIMEO, POLL_MS)
        self.out = Outbox(self.socket(zmq.PUSH, connect=[("distributor", self.lane, "frames")],
                                      on_connect=self.resend_ends), self.name)
        self.ends: deque[Header] = deque(maxlen=ENDS_KEPT)  # the last scans' ends, sent again to a new distributor
        self.sources = self.spec.source.replicas
        self.lanes = self.spec.lanes
        self.sectors = self.geometry.sectors
        self.sector_bytes = self.geometry.sector_bytes
        self.scan_rows, self.scan_cols = self.spec.scan.rows, self.spec.scan.cols
        self.scan_frames = self.geometry.scan_frames
        self.frame_header = Header(kind=FRAME, shape=self.geometry.sector_shape, dtype=self.geometry.dtype)
        self.pending: dict[tuple[int, int], tuple[list, float, list]] = {}  # parts, first arrival, [parts in]
        self.max_pending = MAX_PENDING_PER_HWM * self.spec.transport.high_water_mark
        self.scans: dict[int, OpenScan] = {}
        self.closed = ClosedScans()
        self.zero = zmq.Frame(bytes(self.geometry.sector_bytes))
        self.stalled = 0.0                   # seconds spent blocked on the distributor
        self.last_activity: float | None = None  # None until the first input: the first scan waits for ever
        self.skipped: tuple[int, float] | None = None  # a scan below an open one, never seen here; since when
        self.last_sweep = self.clock()

    def clock(self) -> float:
        """Seconds, not counting the time this stage could not listen (blocked downstream)."""
        return time.monotonic() - self.stalled

    def step(self):
        if len(self.pending) >= self.max_pending:
            # A source runs ahead of another (a busy core, or one that died): a pause per message, so
            # the others can catch up. ZeroMQ takes turns among the sources that have something
            # queued, so what is pending stops growing; the one ahead waits on its full queue
            # (backpressure), and a source that never comes is the frame timeout's.
            time.sleep(PACE_S)
        try:
            # One message per turn, waiting at most POLL_MS (the socket's receive timeout): no poll
            # and no refused read per message, which cost more than the rest of the turn.
            _, msg = self.receive(self.ingest)
            if msg is not None:
                self.handle(msg)
        except zmq.Again:  # nothing for POLL_MS
            if self.draining.is_set():
                self.drain_now()
        now = self.clock()
        if now - self.last_sweep > HOUSEKEEPING_S:
            self.last_sweep = now
            self.sweep(now)
            self.counters.queue_depth = len(self.pending)

    def handle(self, msg: Message) -> None:
        h = msg.header
        kind = h.kind
        if kind != SECTOR and kind != END_OF_SCAN:
            return self.refuse("kind", msg)
        number = h.scan
        scan = self.scans.get(number)  # an open scan is never closed: the closed check only for the others
        if scan is None and number in self.closed:
            self.last_activity = self.clock()  # a source is there (replaying old scans): keep the next one open
            return self.refuse("late", msg, "the scan is closed")
        if (h.scan_rows or self.scan_rows) * (h.scan_cols or self.scan_cols) != self.scan_frames:
            return self.refuse("geometry", msg, f"scan of {h.scan_rows}x{h.scan_cols}")
        if scan is None:
            scan = self.open_scan(h)
        scan.last_input = self.last_activity = self.clock()
        if kind == END_OF_SCAN:
            scan.ended_by.add(h.sender)
            if len(scan.ended_by) >= self.sources:
                self.close(number, "end of scan")
            return
        frame = h.frame
        emitted = scan.emitted[frame]
        if frame % self.lanes != self.lane or emitted:
            return self.refuse("late" if emitted else "misrouted", msg)
        counters = self.counters
        counters.frames_in += 1
        counters.bytes_in += self.sector_bytes  # checked on arrival
        key = (number, frame)
        entry = self.pending.get(key)
        if entry is None:
            entry = self.pending[key] = ([None] * self.sectors, scan.last_input, [0])
        parts, _, have = entry
        sector = h.sector
        if parts[sector] is not None:
            return self.refuse("duplicate-sector", msg, f"sector {sector} again")
        parts[sector] = msg.parts[0]
        have[0] += 1
        if have[0] == self.sectors:
            self.emit(key, parts)

    def open_scan(self, h: Header) -> OpenScan:
        scan = self.scans.get(h.scan)
        if scan is None:
            lane_frames = len(range(self.lane, self.geometry.scan_frames, self.spec.lanes))
            scan = self.scans[h.scan] = OpenScan(lane_frames, np.zeros(self.geometry.scan_frames, bool),
                                                 h.scan_rows or self.spec.scan.rows,
                                                 h.scan_cols or self.spec.scan.cols, self.clock())
        return scan

    def emit(self, key: tuple[int, int], parts: list) -> None:
        del self.pending[key]
        scan_no, frame = key
        scan = self.scans[scan_no]
        if None in parts:
            missing = [i for i, p in enumerate(parts) if p is None]
            mask = sum(1 << i for i, p in enumerate(parts) if p is not None)
            parts = [p if p is not None else self.zero for p in parts]
        else:
            missing, mask = (), (1 << len(parts)) - 1
        header = self.frame_header  # one for every frame, its fields set here (building one costs ~5 us)
        header.scan, header.frame, header.position, header.sector_mask = scan_no, frame, frame, mask
        header.flags, header.scan_rows, header.scan_cols = PARTIAL if missing else 0, scan.rows, scan.cols
        self.send(header, parts)
        scan.emitted[frame] = True
        scan.sent += 1
        scan.partial += bool(missing)
        self.counters.frames_out += 1
        self.counters.bytes_out += self.sector_bytes * len(parts)
        if missing:
            self.counters.outcomes["partial"] += 1
            self.log.warning("scan %d frame %d partial: sectors %s missing", scan_no, frame, missing)

    def send(self, header: Header, parts=()) -> None:
        """Blocking send (the distributor's queue full means: wait, and let the sources wait).
        The time spent waiting is taken off the clock the timeouts are measured with."""
        try:
            return self.out.send(header, parts, flags=zmq.NOBLOCK)  # the usual case: room in the queue
        except zmq.Again:
            pass
        t0 = time.monotonic()
        while self.waiting():
            if self.out.socket.poll(POLL_MS, zmq.POLLOUT):
                self.out.send(header, parts, flags=zmq.NOBLOCK)
                break
        self.stalled += time.monotonic() - t0

    def sweep(self, now: float) -> None:
        """Pass on frames past their timeout; close scans whose sources went silent, and the next
        scan when nobody started it."""
        timeout = self.spec.transport.end_of_scan_timeout_s
        frame_timeout = self.spec.transport.frame_timeout_s
        for key in [k for k, (_, first, _) in self.pending.items() if now - first > frame_timeout]:
            self.emit(key, self.pending[key][0])
        for number, scan in list(self.scans.items()):
            if now - scan.last_input > timeout:
                self.close(number, f"no input for {timeout:g} s")
        upcoming = self.closed.next_open()
        if upcoming in self.scans or upcoming >= self.spec.scan.count or self.draining.is_set():
            return
        if self.scans:  # open scans are all later: this one was over before this aggregator started
            if self.skipped is None or self.skipped[0] != upcoming:
                self.skipped = (upcoming, now)
            elif now - self.skipped[1] > timeout:
                self.open_scan(Header(scan=upcoming))
                self.close(upcoming, "never seen here: this aggregator started after it")
        elif self.last_activity is not None and now - self.last_activity > timeout:
            self.open_scan(Header(scan=upcoming))
            self.close(upcoming, f"never started: no input for {timeout:g} s")

    def resend_ends(self) -> None:
        """On each connection to the distributor (the first one, or to a restarted distributor), send
        the last scans' ends again: a distributor that died may have held them."""
        for end in self.ends:
            self.send(end)  # (stamped anew)
        if self.ends:
            self.log.info("distributor (re)connected: sent the ends of scans %s again", [e.scan for e in self.ends])

    def drain_now(self) -> None:
        """Drained and nothing more queued: close every open scan; no further scan starts."""
        for number in sorted(self.scans):
            self.close(number, "drained")
        self.finish()

    def close(self, number: int, why: str) -> None:
        for key in [k for k in self.pending if k[0] == number]:
            self.emit(key, self.pending[key][0])
        scan = self.scans.pop(number)
        self.closed.add(number)
        self.last_activity = self.clock()
        lost = scan.frames - scan.sent
        self.counters.outcomes["lost"] += lost
        end = Header(kind=END_OF_SCAN, scan=number, expected=self.geometry.scan_frames, sent=scan.sent,
                     partial=scan.partial, lost=lost, scan_rows=scan.rows, scan_cols=scan.cols)
        self.send(end)
        self.ends.append(end)
        log = self.log.warning if lost else self.log.info
        log("scan %d closed (%s): %d frames passed on, %d partial, %d lost", number, why, scan.sent,
            scan.partial, lost)
