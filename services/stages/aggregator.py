"""The aggregator of one lane: reassembles the sectors of each frame by frame number.

A complete frame goes on as one FRAME message whose parts are the very sector buffers that
arrived (no copy). A frame whose sectors do not all arrive within the frame timeout, or by the
end of its scan, goes on with the missing sectors zero-filled and flagged PARTIAL. When every
source has ended a scan (or it has been silent past the end-of-scan timeout), the lane reports
downstream how many of its frames it passed on, how many were partial and how many never came.

The rules (which frame goes on when, which scan closes when, the scans nobody started) are those of
`dataplane/reassembly.py`; this module holds its sockets and clock. A source that comes back sends
the following scans as usual (its sectors of closed scans are rejected as `late`). An aggregator
started mid-session (a pod restarted by Kubernetes) closes the scans below the first one it sees one
timeout after it notices them: their frames that its predecessor passed on are written, and the
distributor names the others lost. When its
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

import zmq

from detstream.services.dataplane.reassembly import Reassembly
from detstream.services.dataplane.scans import Scan
from detstream.services.dataplane.wire import DETECTOR_END, END_OF_SCAN, FRAME, PARTIAL, SECTOR, Header, Message, Outbox
from detstream.services.runtime.stage import HOUSEKEEPING_S, Stage
from detstream.services.sources import source_class

MAX_PENDING_PER_HWM = 8   # frames waiting for sectors from other sources, per unit of transport.highWaterMark
PACE_S = 0.001            # the pause per message while that many are waiting
ENDS_KEPT = 8             # ends of scans sent again to a restarted distributor: more than it ever has open


class AggregatorStage(Stage):
    role = "aggregator"

    def setup(self):
        self.lane = self.me.index
        self.ingest = self.socket(zmq.PULL, bind="ingest")
        self.out = Outbox(self.socket(zmq.PUSH, connect=[("distributor", self.lane, "frames")],
                                      on_connect=self.resend_ends), self.name)
        self.ends: deque[Header] = deque(maxlen=ENDS_KEPT)  # the last scans' ends, sent again to a new distributor
        self.sector_bytes = self.geometry.sector_bytes
        self.frame_header = Header(kind=FRAME, shape=self.geometry.sector_shape, dtype=self.geometry.dtype)
        self.reassembly = Reassembly(self.lane, self.spec.lanes, self.geometry.sectors, self.spec.scan.rows,
                                     self.spec.scan.cols, self.spec.source.replicas,
                                     zmq.Frame(bytes(self.geometry.sector_bytes)), self.pass_on, self.end_scan,
                                     series=source_class(self.spec.source.kind).series)
        self.max_pending = MAX_PENDING_PER_HWM * self.spec.transport.high_water_mark
        self.reactor.on_message(self.ingest, self.handle)
        self.reactor.every(HOUSEKEEPING_S, self.housekeeping)

    def clock(self) -> float:
        """Seconds, not counting the time this stage could not listen (blocked downstream)."""
        return time.monotonic() - self.reactor.stalled_s

    def housekeeping(self, now: float) -> None:
        """Pass on frames past their timeout; close scans whose sources went silent, and the next scan
        when nobody started it; once drained and nothing more is queued, close every open scan."""
        transport = self.spec.transport
        self.reassembly.sweep(self.clock(), transport.frame_timeout_s, transport.end_of_scan_timeout_s,
                              self.spec.scan.count, self.draining.is_set())
        self.counters.queue_depth = len(self.reassembly.pending)
        if self.draining.is_set() and not self.ingest.poll(0):
            self.reassembly.drain(self.clock())
            self.finish()

    def handle(self, msg: Message) -> None:
        if len(self.reassembly.pending) >= self.max_pending:
            # A source runs ahead of another (a busy core, or one that died): a pause per message, so
            # the others can catch up. ZeroMQ takes turns among the sources that have something
            # queued, so what is pending stops growing; the one ahead waits on its full queue
            # (backpressure), and a source that never comes is the frame timeout's.
            time.sleep(PACE_S)
        h = msg.header
        kind = h.kind
        if kind == SECTOR:
            refused = self.reassembly.sector(h.scan, h.frame, h.sector, msg.parts[0], h.scan_rows, h.scan_cols,
                                             self.clock())
            if refused is None or refused[0] in ("duplicate-sector", "duplicate"):  # it arrived (a duplicate too)
                self.counters.frames_in += 1
                self.counters.bytes_in += self.sector_bytes  # checked on arrival
        elif kind == END_OF_SCAN:
            refused = self.reassembly.end(h.scan, h.sender, h.scan_rows, h.scan_cols, self.clock(),
                                          h.expected if h.flags & DETECTOR_END else None)
        else:
            return self.refuse("kind", msg)
        if refused is not None:
            self.refuse(refused[0], msg, refused[1])

    def pass_on(self, scan: Scan, frame: int, parts: list, missing, mask: int) -> None:
        """A frame, whole or not, goes to the distributor (the reassembly's on_frame)."""
        header = self.frame_header  # one for every frame, its fields set here (building one costs ~5 us)
        header.scan, header.frame, header.position, header.sector_mask = scan.number, frame, frame, mask
        header.flags, header.scan_rows, header.scan_cols = PARTIAL if missing else 0, scan.rows, scan.cols
        self.reactor.send(self.out, header, parts)
        self.counters.frames_out += 1
        self.counters.bytes_out += self.sector_bytes * len(parts)
        if missing:
            self.counters.outcomes["partial"] += 1
            self.log.warning("scan %d frame %d partial: sectors %s missing", scan.number, frame, missing)

    def resend_ends(self) -> None:
        """On each connection to the distributor (the first one, or to a restarted distributor), send
        the last scans' ends again: a distributor that died may have held them."""
        for end in self.ends:
            self.reactor.send(self.out, end)  # (stamped anew)
        if self.ends:
            self.log.info("distributor (re)connected: sent the ends of scans %s again", [e.scan for e in self.ends])

    def end_scan(self, scan: Scan, lost: int, why: str) -> None:
        """A scan closed (the reassembly's on_close): its end goes to the distributor, and is kept."""
        self.counters.outcomes["lost"] += lost
        end = Header(kind=END_OF_SCAN, scan=scan.number, expected=self.geometry.scan_frames, sent=scan.count,
                     partial=scan.partial, lost=lost, scan_rows=scan.rows, scan_cols=scan.cols)
        self.reactor.send(self.out, end)
        self.ends.append(end)
        log = self.log.warning if lost else self.log.info
        log("scan %d closed (%s): %d frames passed on, %d partial, %d lost", scan.number, why, scan.count,
            scan.partial, lost)
