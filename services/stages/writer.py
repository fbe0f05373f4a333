"""The writer: collects results per scan, drops duplicates, writes files, keeps the accounting.

A scan is closed when every lane has ended it and the writer holds as many distinct frames as
the lanes say they passed on (or, failing that, after the end-of-scan timeout). Then, per scan:
expected = written + lost + unaccounted, where `lost` is what the aggregators reported as never
arrived and `unaccounted` must be 0: anything else is a frame that vanished silently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from detstream.services.electron_events import ElectronEventsFile
from detstream.services.plugins import plugin_class
from detstream.services.stage import POLL_MS, Stage, StageError
from detstream.services.wire import END_OF_SCAN, PARTIAL, RESULT, Header, Message
from detstream.v1.control_pb2 import ScanAccount

DRAIN_QUIET_S = 1.0  # a draining writer finishes after this long without input and no open scan


@dataclass
class WriterScan:
    number: int
    rows: int
    cols: int
    seen: np.ndarray
    file: ElectronEventsFile | None = None
    path: str = ""
    written: int = 0
    partial: int = 0
    duplicates: int = 0
    lanes: dict = field(default_factory=dict)   # distributor name -> its END_OF_SCAN
    ended_at: float = 0.0

    def account(self, complete: bool) -> ScanAccount:
        lost = sum(h.lost for h in self.lanes.values())
        return ScanAccount(scan=self.number, expected=self.rows * self.cols, written=self.written,
                           partial=self.partial, lost=lost, duplicates=self.duplicates, complete=complete,
                           file=self.path)


class WriterStage(Stage):
    role = "writer"

    def __init__(self, plan, index, bind_host=None, output: Path | None = None):
        super().__init__(plan, index, bind_host)
        self.output = Path(output or ".") / self.spec.output.path

    def setup(self):
        self.output.mkdir(parents=True, exist_ok=True)
        probe = self.output / ".detstream-write-test"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StageError(f"output folder {self.output} is not writable: {exc.strerror}") from None
        self.kind = plugin_class(self.spec.plugin.name).result
        self.results = self.socket(zmq.PULL, bind="results")
        self.scans: dict[int, WriterScan] = {}
        self.done: dict[int, ScanAccount] = {}
        self.last_input = time.monotonic()

    def step(self):
        if self.results.poll(POLL_MS):
            for _ in range(256):
                _, msg = self.receive(self.results)
                if msg is not None:
                    self.handle(msg)
                if not self.results.poll(0):
                    break
        now = time.monotonic()
        self.close_ready(now)
        if self.draining.is_set() and not self.scans and now - self.last_input > DRAIN_QUIET_S:
            self.finish()  # drained: every scan that started is closed and nothing more comes
        self.counters.scan_progress = max((s.written / s.seen.size for s in self.scans.values()), default=0.0)

    def handle(self, msg: Message) -> None:
        self.last_input = time.monotonic()
        h = msg.header
        if h.kind not in (RESULT, END_OF_SCAN):
            self.counters.rejected["kind"] += 1
            return
        if h.scan in self.done:
            if h.kind == RESULT:
                self.counters.outcomes["duplicate"] += 1
            return
        scan = self.scan(h)
        if scan is None:
            return
        if h.kind == END_OF_SCAN:
            scan.lanes[h.sender] = h
            scan.ended_at = time.monotonic()
            return
        if h.position >= scan.seen.size:
            self.counters.rejected["range"] += 1
            return
        self.counters.frames_in += 1
        self.counters.bytes_in += msg.payload_bytes
        if scan.seen[h.position]:
            scan.duplicates += 1
            self.counters.outcomes["duplicate"] += 1
            return
        scan.seen[h.position] = True
        scan.written += 1
        scan.partial += bool(h.flags & PARTIAL)
        self.counters.outcomes["written"] += 1
        if h.flags & PARTIAL:
            self.counters.outcomes["partial"] += 1
        if scan.file is not None:
            scan.file.write(h.position, np.frombuffer(msg.parts[0].buffer, dtype=np.uint32))

    def scan(self, h: Header) -> WriterScan | None:
        scan = self.scans.get(h.scan)
        if scan is None:
            rows, cols = h.scan_rows or self.spec.scan.rows, h.scan_cols or self.spec.scan.cols
            if rows * cols != self.spec.scan.frames:
                self.counters.rejected["geometry"] += 1
                return None
            scan = self.scans[h.scan] = WriterScan(h.scan, rows, cols, np.zeros(rows * cols, bool))
            if self.kind == "events":
                path = self.output / f"{self.plan.session}-scan{h.scan:04d}.h5"
                scan.path = str(path)
                scan.file = ElectronEventsFile(path, (rows, cols), (self.spec.detector.rows, self.spec.detector.cols),
                                               metadata={"session": self.plan.session, "scan": h.scan,
                                                         "plugin": self.spec.plugin.name,
                                                         "plugin_params": str(self.spec.plugin.params)})
        return scan

    def close_ready(self, now: float) -> None:
        lanes = self.spec.lanes
        timeout = self.spec.transport.end_of_scan_timeout_s
        for number, scan in list(self.scans.items()):
            if len(scan.lanes) < lanes:
                continue
            passed_on = sum(h.sent for h in scan.lanes.values())
            if scan.written >= passed_on or now - scan.ended_at > timeout:
                self.close(scan)

    def close(self, scan: WriterScan) -> None:
        if scan.file is not None:
            scan.file.close()
        account = self.done[scan.number] = scan.account(complete=True)
        del self.scans[scan.number]
        unaccounted = account.expected - account.written - account.lost
        log = self.log.error if unaccounted else (self.log.warning if account.lost else self.log.info)
        log("scan %d closed: %d expected, %d written (%d partial), %d lost, %d duplicates dropped%s",
            scan.number, account.expected, account.written, account.partial, account.lost,
            account.duplicates, f", {unaccounted} UNACCOUNTED" if unaccounted else "")
        if len(self.done) >= self.spec.scan.count:
            self.finish()

    def add_status(self, status):
        status.scans_total = self.spec.scan.count
        status.scans.extend(self.done[n] for n in sorted(self.done))
        status.scans.extend(s.account(complete=False) for s in self.scans.values())

    def run(self) -> int:
        try:
            return super().run()
        finally:
            for scan in getattr(self, "scans", {}).values():
                if scan.file is not None:
                    scan.file.abort()  # an unfinished scan never leaves a file that looks complete
