"""The source: sends each frame as sector messages to the lane that owns the frame.

Source s of S sends the sectors s, s+S, s+2S ... of every frame (as the 4D Camera's receivers
split them), to aggregator[frame % lanes]. After the last frame of a scan it tells every lane
how many sectors it sent (END_OF_SCAN). Sends block when the lane is full: that is the
backpressure, and the source waits rather than drops. Drain ends the current scan early (its
END_OF_SCAN says how much was sent, so the rest is reported lost) and sends no further scan.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import zmq

from detstream.services.dataplane.security import EXTERNAL
from detstream.services.sources.simulator import Simulator
from detstream.services.runtime.stage import Stage, StageError
from detstream.services.dataplane.wire import END_OF_SCAN, SECTOR, Header, Outbox

SEND_RETRY_MS = 100
ANSWER_POLL_S = 0.01  # how often a wait for a lane's answer looks
FLUSH_S = 10.0  # an outside source exits once its queued messages are delivered, or after this long


class FrameSource:
    """Sectors of frames, by (scan, frame, sector)."""

    def sector(self, scan: int, frame: int, sector: int) -> np.ndarray: ...


class ReplaySource(FrameSource):
    """Frames from a .npy file (memory-mapped) or an HDF5 dataset of shape (frames, rows, cols)."""

    def __init__(self, path: str, dataset: str, spec):
        self.frames = open_frames(Path(path), dataset)
        d = spec.detector
        want = (d.rows, d.cols)
        if self.frames.ndim != 3 or tuple(self.frames.shape[1:]) != want:
            raise StageError(f"replay file {path}: frames of shape {tuple(self.frames.shape)}; the session's "
                             f"detector needs (frames, {d.rows}, {d.cols}) (spec.detector.rows/cols)")
        if self.frames.dtype != np.dtype(d.dtype):
            raise StageError(f"replay file {path}: dtype {self.frames.dtype}, the session's detector is "
                             f"{d.dtype} (spec.detector.dtype)")
        self.per_scan = spec.scan.frames
        if self.frames.shape[0] < self.per_scan:
            raise StageError(f"replay file {path}: {self.frames.shape[0]} frames, a {spec.scan.rows}x"
                             f"{spec.scan.cols} scan needs {self.per_scan}")
        self.width = d.cols // d.sectors
        self.scans_in_file = self.frames.shape[0] // self.per_scan

    def sector(self, scan, frame, sector):
        index = (scan % self.scans_in_file) * self.per_scan + frame
        return np.ascontiguousarray(self.frames[index, :, sector * self.width:(sector + 1) * self.width])


def open_frames(path: Path, dataset: str):
    if not path.is_file():
        raise StageError(f"replay file {path} does not exist (spec.source.path)")
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r")
        except ValueError as exc:
            raise StageError(f"replay file {path} is not a readable .npy file: {exc}") from None
    import h5py
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StageError(f"replay file {path} is neither .npy nor readable HDF5: {exc}") from None
    if not dataset or dataset not in f:
        raise StageError(f"replay file {path}: no dataset {dataset!r} (spec.source.dataset); "
                         f"datasets at the top: {', '.join(f.keys())}")
    return f[dataset]


class SourceStage(Stage):
    role = "source"

    def __init__(self, plan, index, bind_host=None, connect: list[str] | None = None):
        super().__init__(plan, index, bind_host)
        self.connect = connect  # outside the session: the aggregators' ingest addresses, one per lane
        if connect:
            self.key_name = EXTERNAL  # a sender outside the session holds the session's `external` key

    def setup(self):
        spec = self.spec
        count = spec.source.replicas
        self.my_sectors = [s for s in range(spec.detector.sectors) if s % count == self.me.index]
        if spec.source.kind == "replay":
            self.frames = ReplaySource(spec.source.path, spec.source.dataset, spec)
        else:
            self.frames = Simulator(spec.source.simulator, spec.detector)
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

    def sectors(self) -> Iterator[None]:
        """Send every scan; yields after each frame so the main loop can notice Stop."""
        spec, g = self.spec, self.geometry
        shape = list(g.sector_shape)
        drop = spec.transport.on_full == "drop"
        # One schedule for the whole session, not one per scan: a source held up for a moment (a busy
        # core) catches up afterwards, instead of staying behind the other sources for good, which
        # would leave the aggregators holding half frames (up to frameTimeoutS) for the rest of the run.
        t0 = time.monotonic()
        for scan in range(spec.scan.count):
            sent = [0] * spec.lanes
            # one header for the scan, its frame and sector set per message (building one costs ~5 us)
            header = Header(kind=SECTOR, scan=scan, shape=shape, dtype=g.dtype, scan_rows=spec.scan.rows,
                            scan_cols=spec.scan.cols)
            for frame in range(spec.scan.frames):
                if self.draining.is_set():
                    break  # end the scan here: the frames not sent are reported lost downstream
                if spec.source.rate:
                    delay = t0 + (scan * spec.scan.frames + frame) / spec.source.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                lane = frame % spec.lanes
                for sector in self.my_sectors:
                    pixels = self.frames.sector(scan, frame, sector)
                    header.frame = header.position = frame
                    header.sector = sector
                    if drop:
                        try:
                            self.lanes[lane].send(header, [pixels], flags=zmq.NOBLOCK)
                        except zmq.Again:  # the lane is full: drop the rest of this frame, count it once
                            self.counters.dropped += 1
                            self.counters.outcomes["dropped"] += 1
                            if self.counters.dropped == 1:
                                self.log.warning("pipeline full: dropping frames (spec.transport.onFull: drop)")
                            break
                    elif not self.send(self.lanes[lane], header, [pixels]):
                        return
                    sent[lane] += 1
                    self.lane_sent[lane] += 1
                    self.counters.frames_out += 1
                    self.counters.bytes_out += pixels.nbytes
                yield
            for lane, outbox in enumerate(self.lanes):
                header = Header(kind=END_OF_SCAN, scan=scan, expected=spec.scan.frames, sent=sent[lane],
                                scan_rows=spec.scan.rows, scan_cols=spec.scan.cols)
                if not self.send(outbox, header):
                    return
            self.log.info("scan %d: %d sectors sent, %d frames dropped so far", scan, sum(sent),
                          self.counters.dropped)
            if self.draining.is_set():
                return

    def send(self, outbox: Outbox, header: Header, parts=()) -> bool:
        """Send, waiting while the lane is full; False if the stage is stopped meanwhile."""
        try:
            outbox.send(header, parts, flags=zmq.NOBLOCK)  # the usual case: room in the queue, no poll
            return True
        except zmq.Again:
            pass
        lane, give_up_at = self.lanes.index(outbox), time.monotonic() + FLUSH_S
        while self.waiting():
            if outbox.socket.poll(SEND_RETRY_MS, zmq.POLLOUT):
                outbox.send(header, parts, flags=zmq.NOBLOCK)
                return True
            if self.connect and time.monotonic() > give_up_at and not self.answered(lane, 0):
                raise StageError(self.undelivered([lane], "nothing answered there"))
        return False

    def answered(self, lane: int, timeout_s: float) -> bool:
        """Whether a lane's address has answered (a ZeroMQ handshake), waiting up to `timeout_s` for it."""
        deadline = time.monotonic() + timeout_s
        self.check_connections()
        while not self.reached[lane] and time.monotonic() < deadline:
            time.sleep(ANSWER_POLL_S)
            self.check_connections()
        return self.reached[lane]

    def undelivered(self, lanes: list[int], why: str) -> str:
        return "; ".join(f"{self.lane_sent[lane]} sector message(s) sent to {self.connect[lane]} (lane {lane}) did "
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

    def step(self):
        if next(self.work, StopIteration) is StopIteration:
            self.work = iter(())
            self.finish()
            if self.connect:  # an outside source has no launcher to stop it: deliver what is queued, then exit
                self.deliver()
                self.stopping.set()
            self.stopping.wait(0.1)
