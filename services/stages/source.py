"""The source stage: sends what its session's source kind yields, as sector messages to the lanes.

The kind (spec.source.kind, see services/sources) yields frames, each as the sectors this replica
sends, and the ends of scans. A frame's sectors go to aggregator[frame % lanes]; a scan's end tells
every lane how many sectors of the scan it was sent (END_OF_SCAN; flagged DETECTOR_END when the
detector itself ended the scan). Messages the kind refuses (from a detector) are counted by reason.
Sends block when the lane is full: that is the backpressure, and the source waits rather than drops
(unless spec.transport.onFull is drop). Drain ends the scans under way early (their END_OF_SCAN says
how much was sent, so the rest is reported lost) and sends no further scan.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial

import zmq

from detstream.services.dataplane.security import EXTERNAL
from detstream.services.dataplane.wire import DETECTOR_END, END_OF_SCAN, SECTOR, Header, Outbox
from detstream.services.runtime.stage import Stage, StageError
from detstream.services.sources import Frame, Refused, ScanEnd, SourceError, source_class

ANSWER_POLL_S = 0.01  # how often a wait for a lane's answer looks
FLUSH_S = 10.0  # an outside source exits once its queued messages are delivered, or after this long


class SourceStage(Stage):
    role = "source"

    def __init__(self, plan, index, bind_host=None, connect: list[str] | None = None):
        super().__init__(plan, index, bind_host)
        self.connect = connect  # outside the session: the aggregators' ingest addresses, one per lane
        if connect:
            self.key_name = EXTERNAL  # a sender outside the session holds the session's `external` key

    def setup(self):
        spec = self.spec
        try:
            self.source = source_class(spec.source.kind)(spec, self.me.index)
        except (SourceError, LookupError) as exc:
            raise StageError(str(exc)) from None
        lanes = self.connect or [("aggregator", lane, "ingest") for lane in range(spec.lanes)]
        # An outside source's lanes live in their own context, and it notes when each answers: see deliver().
        self.lane_ctx = zmq.Context() if self.connect else None
        self.reached = [False] * len(lanes)
        self.lanes = [Outbox(self.socket(zmq.PUSH, connect=[peer], server=f"aggregator-{lane}", context=self.lane_ctx,
                                         on_connect=partial(self.reached.__setitem__, lane, True) if self.connect
                                         else None), self.name)
                      for lane, peer in enumerate(lanes)]
        self.lane_sent = [0] * len(self.lanes)  # sector messages per lane, all scans
        self.work = self.sectors()
        self.reactor.every(0, self.send_next)

    def sectors(self) -> Iterator[None]:
        """Send what the source yields; yields after each frame so the main loop can notice Stop."""
        spec, g = self.spec, self.geometry
        shape = list(g.sector_shape)
        drop = spec.transport.on_full == "drop"
        # per scan under way: its header (its frame and sector set per message; building one costs ~5 us)
        # and the sector messages sent to each lane
        scans: dict[int, tuple[Header, list[int]]] = {}

        def under_way(scan: int) -> tuple[Header, list[int]]:
            if scan not in scans:
                scans[scan] = (Header(kind=SECTOR, scan=scan, shape=shape, dtype=g.dtype, scan_rows=spec.scan.rows,
                                      scan_cols=spec.scan.cols), [0] * spec.lanes)
            return scans[scan]

        for item in self.source:
            if isinstance(item, Refused):
                self.refuse(item.reason, None, item.detail)
                yield
                continue
            if self.draining.is_set() and not isinstance(item, ScanEnd):
                if item is not None:  # end the scans under way here: the frames not sent are reported lost
                    under_way(item.scan)
                for scan in sorted(scans):
                    if not self.end_scan(scan, spec.scan.frames, scans[scan][1]):
                        return
                return
            if item is None:
                yield
                continue
            header, sent = under_way(item.scan)
            if isinstance(item, ScanEnd):
                del scans[item.scan]
                if not self.end_scan(item.scan, item.frames, sent, item.final) or self.draining.is_set():
                    return
            elif not self.send_frame(item, header, sent, drop):
                return
            else:
                yield

    def send_frame(self, item: Frame, header: Header, sent: list[int], drop: bool) -> bool:
        """Send a frame's sectors to its lane; False if the stage is stopped meanwhile."""
        lane = item.frame % self.spec.lanes
        header.frame = header.position = item.frame
        for sector, pixels in item.sectors:
            header.sector = sector
            if not self.send(lane, header, [pixels], wait=not drop):
                if not drop:
                    return False
                # the lane is full: drop the rest of this frame, count it once
                self.counters.dropped += 1
                self.counters.outcomes["dropped"] += 1
                if self.counters.dropped == 1:
                    self.log.warning("pipeline full: dropping frames (spec.transport.onFull: drop)")
                return True
            sent[lane] += 1
            self.lane_sent[lane] += 1
            self.counters.frames_out += 1
            self.counters.bytes_out += pixels.nbytes
        return True

    def end_scan(self, scan: int, frames: int, sent: list[int], final: bool = False) -> bool:
        """Tell every lane how many sectors of `scan` (of `frames` positions) it was sent, and whether the
        detector ended it (`final`); False if stopped."""
        spec = self.spec
        for lane in range(len(self.lanes)):
            header = Header(kind=END_OF_SCAN, scan=scan, expected=frames, sent=sent[lane],
                            scan_rows=spec.scan.rows, scan_cols=spec.scan.cols, flags=DETECTOR_END if final else 0)
            if not self.send(lane, header):
                return False
        self.log.info("scan %d: %d sectors sent, %d frames dropped so far", scan, sum(sent), self.counters.dropped)
        return True

    def send(self, lane: int, header: Header, parts=(), wait: bool = True) -> bool:
        """Send to a lane, waiting while it is full (wait=False: not at all); False if not sent. An outside
        source whose lane never answered fails after FLUSH_S."""
        on_wait = self.fail_if_unanswered(lane) if self.connect else None  # (none per send in a session)
        return self.reactor.send(self.lanes[lane], header, parts, wait=wait, on_wait=on_wait)

    def fail_if_unanswered(self, lane: int):
        """A check, run while a send to `lane` waits: fail once FLUSH_S passed and the lane never answered."""
        give_up_at = time.monotonic() + FLUSH_S

        def check() -> None:
            if time.monotonic() > give_up_at and not self.answered(lane, 0):
                raise StageError(self.undelivered([lane], "nothing answered there"))
        return check

    def answered(self, lane: int, timeout_s: float) -> bool:
        """Whether a lane's address has answered (a ZeroMQ handshake), waiting up to `timeout_s` for it."""
        deadline = time.monotonic() + timeout_s
        self.check_connections()
        while not self.reached[lane] and time.monotonic() < deadline:
            time.sleep(ANSWER_POLL_S)
            self.check_connections()
        return self.reached[lane]

    def undelivered(self, lanes: list[int], why: str) -> str:
        addresses = self.connect or []
        return "; ".join(f"{self.lane_sent[lane]} sector message(s) sent to {addresses[lane]} (lane {lane}) did "
                         f"not reach a session: {why} within {FLUSH_S:g} s (check the address against the "
                         f"session's status.ingest, and that the session is running)" for lane in lanes)

    def deliver(self) -> None:
        """An outside source has no launcher to account for its data: it succeeds only when every lane's
        address answered and the queued messages left within FLUSH_S; else it fails naming them."""
        deadline = time.monotonic() + FLUSH_S
        silent = [lane for lane in range(len(self.lanes)) if not self.answered(lane, deadline - time.monotonic())]
        for outbox in self.lanes:
            outbox.socket.close(linger=0 if silent else max(0, int((deadline - time.monotonic()) * 1000)))
        for monitor in self.connection_monitors:
            monitor.close(linger=0)
        self.lane_ctx.term()  # returns once every queued message has left, or at the linger's end (dropped)
        if silent:
            raise StageError(self.undelivered(silent, "nothing answered there"))
        if time.monotonic() >= deadline:
            raise StageError(self.undelivered(list(range(len(self.lanes))), "the last messages did not leave"))

    def send_next(self, now: float) -> None:
        """A turn: send the next frame the source yields, or finish."""
        if next(self.work, StopIteration) is StopIteration:
            self.work = iter(())
            self.finish()
            if self.connect:  # an outside source has no launcher to stop it: deliver what is queued, then exit
                self.deliver()
                self.stopping.set()
            self.stopping.wait(0.1)
