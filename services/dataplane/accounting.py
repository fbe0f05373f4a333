"""Bookkeeping shared by the stages: which scans are closed, in memory that does not grow with
the length of a session (scans are numbered in order and close roughly in order)."""

from __future__ import annotations



class ClosedScans:
    """A set of closed scan numbers kept as a floor (every scan below it is closed) plus the few
    closed above it, so a session of 100,000 scans holds a handful of numbers, not 100,000."""

    def __init__(self):
        self.floor = 0          # every scan < floor is closed
        self.above: set[int] = set()

    def add(self, number: int) -> None:
        if number >= self.floor:
            self.above.add(number)
        while self.floor in self.above:
            self.above.discard(self.floor)
            self.floor += 1

    def __contains__(self, number: int) -> bool:
        return number < self.floor or number in self.above

    def __len__(self) -> int:
        return self.floor + len(self.above)

    def next_open(self) -> int:
        """The lowest scan number not closed."""
        return self.floor


def frames_so_far(writer_status) -> tuple[int, int]:
    """(written, lost) over the whole session from a writer's StageStatus: its closed scans' totals plus its open
    scans (the recent closed ones it lists are in the totals already)."""
    total = writer_status.closed_total
    open_scans = [s for s in writer_status.scans if not s.complete]
    return (total.written + sum(s.written for s in open_scans), total.lost + sum(s.lost for s in open_scans))


COUNTS = ("expected", "written", "partial", "lost", "duplicates", "unaccounted")


def scan_record(account) -> dict:
    """A ScanAccount as the report and the accounting file give it: scan, COUNTS (unaccounted = expected -
    written - lost, 0 when every frame is accounted for), complete, file."""
    return {"scan": account.scan, "expected": account.expected, "written": account.written,
            "partial": account.partial, "lost": account.lost, "duplicates": account.duplicates,
            "unaccounted": account.expected - account.written - account.lost, "complete": account.complete,
            "file": account.file}
