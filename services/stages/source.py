"""The source stage: sends what its session's source kind yields, block by block, straight to the worker
each block's lane names (docs/full-rate.md).

The kind (spec.source.kind, see services/sources) yields frames, each as the sectors this replica
sends, and the ends of scans. The source keeps every frame in its window (`dataplane/window.py`) until
the writer has its result; it asks a block's lane where the block goes (WANT, on the block's first
frame), sends its sectors of the block there in as few BLOCK messages as it can (one per block, or what
is there at each block timeout), and sends the block's frames again to another worker when the lane
routes the block anew (its worker died). A scan's end tells every lane (END_OF_SCAN; flagged
DETECTOR_END when the detector itself ended the scan). The session's sample frames (the first scan's
frames a calibrating plugin asks for) go to every worker the source learns of, so every worker
calibrates on the same frames. Messages the kind refuses (from a detector) are counted by reason.

The window holds at most spec.transport.sourceWindowFrames frames: when it is full the source waits for
the lanes' releases, and a send waits while a worker's queue is full: that is the backpressure, and the
source waits rather than drops (unless spec.transport.onFull is drop). Drain ends the scans under way
early (their END_OF_SCAN says how much was sent, so the rest is reported lost) and sends no further scan.

Routed by slice (spec.tomography, dataplane/bands.py), the lanes name a worker per band of each block, and the
source sends each its band's rows of the sector strips (views, no copy); a frame is kept until every band of it
is released. The frames every band needs first (the plugin's `references`: tomo-fbp's darks and flats) are kept
for the last scans (dataplane/references.py) and go, as REFERENCE, to a band's worker on each connection while
the band may still get frames of their scan: a worker restarted mid-scan gets them again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from functools import partial

import numpy as np
import zmq

from detstream.services.dataplane.blocks import Blocks
from detstream.services.dataplane.references import References
from detstream.services.dataplane.security import EXTERNAL
from detstream.services.dataplane.window import Send, SourceWindow
from detstream.services.dataplane.wire import (
    ASSIGN,
    BLOCK,
    BLOCK_END,
    DETECTOR_END,
    DUPLICATE,
    END_OF_SCAN,
    GONE,
    HEARTBEAT,
    REFERENCE,
    RELEASE,
    SAMPLE,
    WANT,
    Header,
    Message,
    Outbox,
    is_tcp_address,
)
from detstream.services.plugins import plugin_class, session_bands
from detstream.services.runtime.stage import Stage, StageError
from detstream.services.sources import Frame, Refused, ScanEnd, SourceError, source_class

ANSWER_POLL_S = 0.01  # how often an outside source looks whether the session has everything
ENDS_KEPT = 8  # ends of scans sent again to a restarted lane: more than it ever has open
FLUSH_S = 10.0  # an outside source exits once the session has its frames, or fails after this long


class SourceStage(Stage):
    role = "source"

    def __init__(self, plan, index, bind_host=None, connect: list[str] | None = None):
        super().__init__(plan, index, bind_host)
        self.connect = connect  # outside the session: the lanes' route addresses, one per lane
        if connect:
            self.key_name = EXTERNAL  # a sender outside the session holds the session's `external` key

    def setup(self):
        spec = self.spec
        try:
            self.source = source_class(spec.source.kind)(spec, self.me.index)
        except (SourceError, LookupError) as exc:
            raise StageError(str(exc)) from None
        lanes = self.connect or [("distributor", lane, "route") for lane in range(spec.lanes)]
        self.reached = [False] * len(lanes)
        self.lanes = [Outbox(self.socket(zmq.DEALER, connect=[peer], server=f"distributor-{lane}",
                                         on_connect=partial(self.lane_connected, lane)), self.name)
                      for lane, peer in enumerate(lanes)]
        for lane, outbox in enumerate(self.lanes):
            self.reactor.on_message(outbox.socket, partial(self.from_lane, lane), batch=64)
        self.workers: dict[str, Outbox] = {}  # data address -> a PUSH to that worker
        self.gone: set[str] = set()   # data addresses of workers declared dead (until assigned again)
        # routed by slice: BLOCKs a worker's full queue did not take yet, in order (the source does not wait on
        # one band's worker: its window fills instead, and while it waits full it hears its lanes)
        self.backlog: dict[str, deque[tuple[Header, list]]] = {}
        self.worker_keys = {s.name for s in self.plan.of_role("worker")}  # the CURVE keys workers may name
        self.blocks = Blocks(spec.scan.frames, spec.transport.block_frames, spec.lanes)
        self.bands = session_bands(spec)
        self.window = SourceWindow(self.blocks, spec.transport.source_window_frames,
                                   self.bands.count if self.bands.keyed else 1)
        sector_cols = self.geometry.sector_shape[1]
        self.band_rows = [slice(*self.bands.rows_of(b)) for b in range(self.bands.count)]
        self.block_headers = [Header(kind=BLOCK, shape=(rows.stop - rows.start, sector_cols), dtype=self.geometry.dtype,
                                     band=band) for band, rows in enumerate(self.band_rows)]
        plugin = plugin_class(spec.plugin.name)
        self.samples_wanted = min(plugin.samples(spec.plugin.params), spec.scan.frames)
        self.samples: list[Frame] = []       # the session's sample frames (this replica's sectors), kept
        self.sample_scan: int | None = None
        # routed by slice: the last scans' frames every band needs first (darks, flats), for a restarted worker
        self.references: References[Frame] = References(plugin.references(spec) if self.bands.keyed else range(0))
        self.ends: dict[int, list[int]] = {}  # scans under way: frames sent to each lane
        self.lane_sent = [0] * len(self.lanes)
        self.work = self.items()
        self.more = True   # the kind may yield more
        self.reactor.busy = lambda: self.more and not self.window.full
        self.last_beat = 0.0
        self.ends_sent: deque[list[Header]] = deque(maxlen=ENDS_KEPT)  # the last scans' ends, per lane
        self.reactor.every(0, self.send_next)
        self.reactor.every(spec.transport.block_timeout_s, lambda now: self.send_all(self.window.flush()))
        if self.bands.keyed:
            self.reactor.every(spec.transport.block_timeout_s, self.send_backlog)
        self.reactor.every(spec.transport.heartbeat_s / 2, self.beat_if_held)

    # what the kind yields

    def items(self) -> Iterator[None]:
        """Take what the source yields; yields after each item so the main loop turns (and notices Stop)."""
        drop = self.spec.transport.on_full == "drop"
        for item in self.source:
            if isinstance(item, Refused):
                self.refuse(item.reason, None, item.detail)
            elif self.draining.is_set():
                if isinstance(item, (Frame, ScanEnd)):
                    self.ends.setdefault(item.scan, [0] * len(self.lanes))
                for scan in sorted(self.ends):
                    self.end_scan(scan, self.spec.scan.frames)
                return
            elif isinstance(item, ScanEnd):
                self.end_scan(item.scan, item.frames, item.final)
            elif isinstance(item, Frame):
                while self.window.full and not drop:
                    if not self.waiting():
                        return
                    yield  # the loop turns: the lanes' releases make room
                if self.window.full:
                    self.dropped()
                else:
                    self.frame(item)
            yield

    def send_next(self, now: float) -> None:
        """A turn: take the next item the source yields, or finish."""
        if not self.more:
            return  # (a source in a session goes on answering its lanes: a dead worker's blocks may come back)
        if next(self.work, StopIteration) is StopIteration:
            self.work, self.more = iter(()), False
            self.finish()
            if self.connect:  # an outside source has no launcher to stop it: wait until the session has it all
                self.deliver_by = now + FLUSH_S
                self.reactor.every(ANSWER_POLL_S, self.deliver)

    def beat_if_held(self, now: float) -> None:
        """While backpressure holds this source (its window full), tell the lanes it is there: its scans are
        not silent, only waiting."""
        if self.window.full and now - self.last_beat >= self.spec.transport.heartbeat_s:
            self.last_beat = now
            for lane in range(len(self.lanes)):
                self.tell(lane, Header(kind=HEARTBEAT))

    def frame(self, item: Frame) -> None:
        taken = self.window.frame(item.scan, item.frame, item.sectors)
        if taken is None:  # late: its lane has closed the scan
            return
        ask, sends = taken
        lane = self.blocks.lane(self.blocks.of(item.frame))
        self.ends.setdefault(item.scan, [0] * len(self.lanes))[lane] += 1
        self.lane_sent[lane] += 1
        if ask is not None:
            self.tell(self.blocks.lane(ask[1]), Header(kind=WANT, scan=ask[0], block=ask[1]))
        self.send_all(sends)
        self.counters.frames_out += 1
        self.counters.bytes_out += len(item.sectors) * self.geometry.sector_bytes
        self.references.keep(item.scan, item.frame, item)
        if self.sample_scan in (None, item.scan) and item.frame < self.samples_wanted:
            self.sample_scan = item.scan
            self.samples.append(item)
            for address in self.workers:
                self.send_kept(address, [item])

    def dropped(self) -> None:
        """The pipeline cannot take a frame now and the policy says drop: count it."""
        self.counters.dropped += 1
        self.counters.outcomes["dropped"] += 1
        if self.counters.dropped == 1:
            self.log.warning("pipeline full: dropping frames (spec.transport.onFull: drop)")

    def end_scan(self, scan: int, frames: int, final: bool = False) -> None:
        """Send what waits of the scan's last block, and tell every lane how many frames of `scan` (of
        `frames` positions) it was sent, and whether the detector ended it (`final`)."""
        self.send_all(self.window.pass_current())
        sent = self.ends.pop(scan, [0] * len(self.lanes))
        spec = self.spec
        ends = [Header(kind=END_OF_SCAN, scan=scan, expected=frames, sent=sent[lane], scan_rows=spec.scan.rows,
                       scan_cols=spec.scan.cols, flags=DETECTOR_END if final else 0) for lane in range(len(self.lanes))]
        for lane, end in enumerate(ends):
            self.tell(lane, end)
        self.ends_sent.append(ends)
        self.log.info("scan %d: %d frames sent, %d dropped so far", scan, sum(sent), self.counters.dropped)

    # the lanes

    def from_lane(self, lane: int, msg: Message) -> None:
        h = msg.header
        if h.kind == ASSIGN:
            if not is_tcp_address(h.address) or h.key not in self.worker_keys:
                self.refuse("address", msg, f"data address {h.address[:80]!r}, key {h.key[:40]!r}")
                return
            self.gone.discard(h.address)
            self.worker(h.address, h.key, h.band)
            self.send_all(self.window.assigned(h.scan, h.block, h.address, bool(h.flags & DUPLICATE), h.band))
        elif h.kind == GONE:
            self.worker_gone(h.address)
        elif h.kind == RELEASE:
            self.window.release(h.acked, h.bands)
        elif h.kind == END_OF_SCAN:  # the lane closed the scan already: its frames there are late
            if h.scan not in self.window.closed[lane]:
                self.log.info("lane %d has closed scan %d already: its frames there are not sent", lane, h.scan)
            self.window.close(h.scan, lane)
        else:
            self.refuse("kind", msg)

    def lane_connected(self, lane: int) -> None:
        """A lane answered (the first time, or a restarted one): ask it again for the blocks still kept
        of its lane and send it the last scans' ends again (a restarted lane knows nothing of them; what it
        finished already it refuses as late)."""
        first = not self.reached[lane]
        self.reached[lane] = True
        if first:
            return
        for scan, block in self.window.ask_again(lane):
            self.tell(lane, Header(kind=WANT, scan=scan, block=block))
        for ends in self.ends_sent:
            self.tell(lane, ends[lane])

    def tell(self, lane: int, header: Header) -> None:
        self.reactor.send(self.lanes[lane], header, on_wait=self.fail_if_unanswered(lane) if self.connect else None)

    # the workers

    def worker(self, address: str, key: str, band: int = 0) -> Outbox:
        """The PUSH to the data port of a worker (of band `band`), connected on first use (`connected` on each
        connection)."""
        outbox = self.workers.get(address)
        if outbox is None:
            outbox = self.workers[address] = Outbox(self.socket(
                zmq.PUSH, connect=[address], server=key, on_connect=lambda: self.connected(address, band)), self.name)
        return outbox

    def connected(self, address: str, band: int) -> None:
        """A connection to the worker at `address`, the first or to a process restarted there (which needs them
        again): the session's samples, and routed by slice the reference frames of the scans its band may still
        get frames of (under way here, or some of the band's frames of it kept)."""
        self.send_kept(address, self.samples)
        self.send_kept(address, self.references.of(
            lambda scan: scan in self.ends or self.window.holds(scan, band)), band)

    def worker_gone(self, address: str) -> None:
        """A lane declared the worker at `address` dead: its queued messages are dropped (a worker restarted there
        starts afresh) and what was assigned to it waits for its lane's next ASSIGN."""
        self.gone.add(address)
        self.window.worker_gone(address)
        self.backlog.pop(address, None)
        outbox = self.workers.pop(address, None)
        if outbox is not None:
            outbox.socket.close(linger=0)

    def send_all(self, sends: list[Send]) -> None:
        for send in sends:
            self.send_block(send)

    def send_block(self, send: Send) -> None:
        """One BLOCK message: this replica's sectors of the frames still kept (a released frame is done); routed
        by slice, the band's rows of them."""
        frames: list[int] = []
        parts: list = []
        sectors: list[int] | None = None
        rows = self.band_rows[send.band] if self.bands.keyed else None
        for frame in send.frames:
            kept = self.window.sectors(send.scan, frame)
            if kept is None:
                continue
            frames.append(frame)
            sectors = [s for s, _ in kept]
            parts.extend(p if rows is None else self.strip(p)[rows] for _, p in kept)
        h = self.block_headers[send.band]
        h.scan, h.block, h.flags = send.scan, send.block, (BLOCK_END if send.end else 0) | (
            DUPLICATE if send.again else 0)
        del h.frames[:]
        h.frames.extend(frames)
        del h.sectors[:]
        h.sectors.extend(sectors or self.source_sectors())
        if send.worker in self.gone or send.worker not in self.workers:
            return
        if not self.bands.keyed:
            self.reactor.send(self.workers[send.worker], h, parts)
            return
        self.send_to_band(send.worker, h, parts)

    def send_to_band(self, address: str, h: Header, parts: list) -> None:
        """Routed by slice: a message to a band's worker, now if its queue takes it, else behind its backlog."""
        backlog = self.backlog.get(address)
        if backlog or not self.reactor.send(self.workers[address], h, parts, wait=False):
            kept = Header()
            kept.CopyFrom(h)
            self.backlog.setdefault(address, deque()).append((kept, parts))

    def strip(self, pixels) -> np.ndarray:
        """A sector's pixels (an array, or a zmq.Frame of its bytes) as a (rows, cols / sectors) view."""
        return np.frombuffer(pixels, self.geometry.dtype).reshape(self.geometry.sector_shape)

    def send_backlog(self, now: float) -> None:
        """Routed by slice: the BLOCKs waiting for room in their worker's queue, in order, as far as it takes them."""
        for address, backlog in list(self.backlog.items()):
            while backlog and self.reactor.send(self.workers[address], *backlog[0], wait=False):
                backlog.popleft()
            if not backlog:
                del self.backlog[address]

    def source_sectors(self) -> list[int]:
        """The sectors this replica sends (what an empty BLOCK names)."""
        return list(getattr(self.source, "sectors", range(self.geometry.sectors)))

    def send_kept(self, address: str, frames: list[Frame], band: int | None = None) -> None:
        """Kept frames to a worker, one message each (not ended: other sources send the same frames' other
        sectors): the session's samples (SAMPLE, whole sectors), or with `band` a scan's reference frames
        (REFERENCE: routed by slice, the band's rows, behind the worker's backlog as its BLOCKs)."""
        if not frames or address not in self.workers:   # (declared dead since it connected)
            return
        h = Header(kind=SAMPLE, shape=self.geometry.sector_shape, dtype=self.geometry.dtype) if band is None else \
            Header(kind=REFERENCE, shape=self.block_headers[band].shape, dtype=self.geometry.dtype, band=band)
        for item in frames:
            h.scan, h.block = item.scan, self.blocks.of(item.frame)
            del h.frames[:]
            h.frames.append(item.frame)
            del h.sectors[:]
            h.sectors.extend(s for s, _ in item.sectors)
            if band is not None:
                self.send_to_band(address, h, [self.strip(p)[self.band_rows[band]] for _, p in item.sectors])
            else:
                self.reactor.send(self.workers[address], h, [p for _, p in item.sectors])

    # outside the session

    def fail_if_unanswered(self, lane: int):
        """A check, run while a send to `lane` waits: fail once FLUSH_S passed and the lane never answered."""
        give_up_at = time.monotonic() + FLUSH_S

        def check() -> None:
            if time.monotonic() > give_up_at and not self.reached[lane]:
                raise StageError(self.undelivered([lane], "nothing answered there"))
        return check

    def undelivered(self, lanes: list[int], why: str) -> str:
        addresses = self.connect or []
        return "; ".join(f"{self.lane_sent[lane]} frame(s) sent to {addresses[lane]} (lane {lane}) did not reach a "
                         f"session: {why} within {FLUSH_S:g} s (check the address against the session's "
                         f"status.ingest, and that the session is running)" for lane in lanes)

    def deliver(self, now: float) -> None:
        """An outside source has no launcher to account for its data: it succeeds (stops) once every lane
        answered and the session has the result of every frame it sent (its window is empty), and fails
        naming why when that has not happened FLUSH_S after its last frame."""
        silent = [lane for lane, reached in enumerate(self.reached) if not reached]
        if not silent and not self.window.kept:
            self.stopping.set()
        elif now > self.deliver_by:
            raise StageError(self.undelivered(silent, "nothing answered there") if silent else self.undelivered(
                list(range(len(self.lanes))), f"the session did not confirm {len(self.window.kept)} frames"))
