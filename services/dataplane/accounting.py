"""The accounting of a session's scans: the rule (expected = written + lost + unaccounted, and
unaccounted must be 0), the writer's scan accounting that applies it, and a scan's record as the
report and the accounting file give it."""

from __future__ import annotations

from collections import deque

import numpy as np

from detstream.services.dataplane.scans import ScanBook, WrittenScan
from detstream.v1.control_pb2 import ScanAccount, ScanVolume


def frames_so_far(writer_status) -> tuple[int, int]:
    """(written, lost) over the whole session from a writer's StageStatus: its closed scans' totals plus its open
    scans (the recent closed ones it lists are in the totals already)."""
    total = writer_status.closed_total
    open_scans = [s for s in writer_status.scans if not s.complete]
    return (total.written + sum(s.written for s in open_scans), total.lost + sum(s.lost for s in open_scans))


# What a scan's file says of each scan position (accounting/position_status, and the live view's masks)
COMPLETE, PARTIAL, MISSING = 0, 1, 2  # every sector arrived / some sectors zero-filled / no frame (lost)
CODES = {"COMPLETE": COMPLETE, "PARTIAL": PARTIAL, "MISSING": MISSING}  # a status dataset's attributes name them

COUNTS = ("expected", "written", "partial", "lost", "duplicates", "unaccounted")


def scan_record(account) -> dict:
    """A ScanAccount as the report and the accounting file give it: scan, COUNTS (unaccounted = expected -
    written - lost, 0 when every frame is accounted for), complete, file."""
    return {"scan": account.scan, "expected": account.expected, "written": account.written,
            "partial": account.partial, "lost": account.lost, "duplicates": account.duplicates,
            "unaccounted": account.expected - account.written - account.lost, "complete": account.complete,
            "file": account.file}


def add_fields(account: ScanAccount, fields: dict) -> None:
    """What a scan's sink adds to its record (`record_fields`) that its ScanAccount carries to the status too: a
    volume's totals (projections_expected/used/lost, slices_missing, complete)."""
    if "volume" in fields:
        account.volume.CopyFrom(ScanVolume(**fields["volume"]))


def scan_account(scan: WrittenScan, complete: bool) -> ScanAccount:
    """A writer's scan as a ScanAccount: its lost frames are those named lost (by a lane, or by being
    missing from a stale scan) that are not written; an open scan's file is not there yet."""
    lost = int(np.count_nonzero(scan.lost & ~scan.done))
    return ScanAccount(scan=scan.number, expected=scan.rows * scan.cols, written=scan.count, partial=scan.partial,
                       lost=lost, duplicates=scan.duplicates, complete=complete, file=scan.path if complete else "")


class WriterScans:
    """The writer's scan accounting, without sockets or clock (each call is given `now`, in seconds).

    A scan of `rows` x `cols` positions is open from its first message until every one of `lanes` has
    ended it and as many distinct frames are written as the lanes say they passed on, or, failing
    that, for `end_timeout` s after its last input; a scan some lane never ended closes once it has
    been silent for `stale_timeout` s, every frame not written lost. The first scan not closed, of
    which nothing came, is opened (so that it closes when stale) when a later scan is open, or, once
    anything came, when nothing has come for the stale timeout (not with `series`: the scans are a
    detector's series, which it starts when it will). `count` scans make the session; the status lists
    the last `recent` scans closed (and sums them all).
    """

    def __init__(self, lanes: int, rows: int, cols: int, count: int, end_timeout: float, stale_timeout: float,
                 recent: int, series: bool = False):
        self.lanes, self.rows, self.cols, self.count, self.series = lanes, rows, cols, count, series
        self.end_timeout, self.stale_timeout = end_timeout, stale_timeout
        self.book = ScanBook(WrittenScan)
        self.scans = self.book.open
        self.closed = self.book.closed
        self.recent: deque[ScanAccount] = deque(maxlen=recent)
        self.closed_total = ScanAccount()  # summed over every closed scan
        self.scans_unaccounted = 0

    def scan(self, number: int, rows: int, cols: int, now: float) -> WrittenScan | None:
        """The open scan `number` (rows x cols, 0: the session's), opened if need be, input for it now;
        None for a scan of another size than the session's."""
        scan = self.scans.get(number)
        if scan is None:
            rows, cols = rows or self.rows, cols or self.cols
            if rows * cols != self.rows * self.cols:
                return None
            scan = self.book.start(number, rows, cols, now)
        scan.last_input = now
        return scan

    @staticmethod
    def result(scan: WrittenScan, position: int, sector_mask: int, partial: bool) -> bool:
        """A result for `position`: False if that frame is written already (a duplicate, counted)."""
        if scan.done[position]:
            scan.duplicates += 1
            return False
        scan.done[position] = True
        scan.sectors[position] = sector_mask
        scan.count += 1
        scan.partial += partial
        return True

    @staticmethod
    def band_result(scan: WrittenScan, position: int, band: int, bands: int, partial: bool = False) -> bool:
        """Routing by slice: band `band`'s result for `position` (of `bands` bands, recorded in scan.sectors as
        a bit per band; `partial`: the band's rows came with strips missing, so its bit stays clear): False if
        that band's is written already (a duplicate, counted). A frame is written with its first band's result,
        partial until every band's came whole."""
        bit = np.uint64(1 << band)
        if scan.sectors[position] & bit:
            scan.duplicates += 1
            return False
        if not partial:
            scan.sectors[position] |= bit
        if not scan.done[position]:
            scan.done[position] = True
            scan.count += 1
            scan.partial += 1
        if scan.sectors[position] == np.uint64((1 << bands) - 1):
            scan.partial -= 1
        return True

    @staticmethod
    def lane_ended(scan: WrittenScan, sender: str, end, lost: np.ndarray) -> None:
        """A lane's END_OF_SCAN (`end`: its header) and its lost frames (bool per frame)."""
        scan.lost |= lost
        scan.ended(sender, end)

    def due(self, now: float, last_input: float | None, draining: bool) -> list[tuple[WrittenScan, float | None]]:
        """The scans to close now, each with None, or, if it is stale, the seconds it has been silent.
        last_input: when anything last came (None: nothing yet); draining: open no scan."""
        first = self.closed.next_open()
        if last_input is not None and not (first in self.scans or first >= self.count or draining) and (
                any(n > first for n in self.scans)
                or (not self.scans and not self.series and now - last_input > self.stale_timeout)):
            self.book.start(first, self.rows, self.cols, last_input)
        due: list[tuple[WrittenScan, float | None]] = []
        for scan in self.scans.values():
            silent = now - scan.last_input
            if len(scan.ends) >= self.lanes:
                if scan.count >= sum(h.sent for h in scan.ends.values()) or silent > self.end_timeout:
                    due.append((scan, None))
            elif silent > self.stale_timeout:
                due.append((scan, silent))
        return due

    @staticmethod
    def stale(scan: WrittenScan) -> None:
        """A scan some lane never ended is closed as it is: every frame not written is lost."""
        scan.lost |= ~scan.done

    def close(self, scan: WrittenScan, account: ScanAccount, unaccounted: int) -> None:
        """`scan` is closed (as `account`): in the totals, among the recent ones, closed for good."""
        self.recent.append(account)
        total = self.closed_total
        total.expected += account.expected
        total.written += account.written
        total.partial += account.partial
        total.lost += account.lost
        total.duplicates += account.duplicates
        self.scans_unaccounted += bool(unaccounted)
        self.book.close(scan.number)

    def progress(self) -> float:
        """The largest share of its frames written of any open scan (0 to 1)."""
        return max((s.count / s.done.size for s in self.scans.values()), default=0.0)

    def add_status(self, status) -> None:
        """The accounting into a writer's StageStatus: recent closed scans, open ones, totals."""
        status.scans_total = self.count
        status.scans.extend(self.recent)
        status.scans.extend(scan_account(s, complete=False) for s in self.scans.values())
        status.scans_closed = len(self.closed)
        status.closed_total.CopyFrom(self.closed_total)
        status.scans_unaccounted = self.scans_unaccounted
