"""The scan records the stages keep: one `Scan` per open scan, and which scans are closed.

Each stage holds the scans it has open in a `ScanBook`, by number, with `ClosedScans` beside it: the
distributor (frames acknowledged by the writer) and the writer (frames written, the file). A scan is
open until the stage's own rule closes it (routing.py, accounting.py); once closed, its number stays
closed for the session; a source keeps, per lane, the scans a lane told it it has closed (window.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np


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


@dataclass(eq=False)
class Scan:
    """An open scan as a stage holds it. `done` is a bool per frame of the scan (rows x cols):
    acknowledged by the writer (distributor) or written (writer); `count` the frames done,
    each counted once. `ends` holds the END_OF_SCAN headers received, by sender, in order of arrival."""
    number: int
    rows: int
    cols: int
    done: np.ndarray
    count: int = 0
    partial: int = 0                  # of the frames done, how many had sectors missing
    in_flight: int = 0                # (distributor) frames with a worker, not yet acknowledged
    ends: dict[str, Any] = field(default_factory=dict)
    last_input: float = 0.0           # when input for it last came (seconds, on the stage's clock)
    images: int | None = None         # (distributor) the frames the detector said the scan has (DETECTOR_END)
    asked: bool = False               # (distributor) a source asked where a block of it goes

    def ended(self, sender: str, end) -> None:
        """Record `sender`'s END_OF_SCAN (again: its latest, last in order)."""
        self.ends.pop(sender, None)
        self.ends[sender] = end

    @property
    def last_end(self):
        """The END_OF_SCAN received last, or None."""
        return next(reversed(self.ends.values()), None)


@dataclass(eq=False)
class WrittenScan(Scan):
    """A scan at the writer: also the frames the lanes name lost, the sectors each written frame had
    (uint64 bit mask per frame), duplicates dropped, and its file once the first result came."""
    lost: np.ndarray = field(init=False)
    sectors: np.ndarray = field(init=False)
    duplicates: int = 0
    file: Any = None
    path: str = ""

    def __post_init__(self):
        self.lost = np.zeros(self.done.size, bool)
        self.sectors = np.zeros(self.done.size, np.uint64)


S = TypeVar("S", bound=Scan)


class ScanBook(Generic[S]):
    """The scans a stage has open (`open`: number -> a Scan of class `kind`) and those it has closed
    (`closed`)."""

    def __init__(self, kind: type[S]):
        self.kind = kind
        self.open: dict[int, S] = {}
        self.closed = ClosedScans()

    def start(self, number: int, rows: int, cols: int, now: float) -> S:
        """The open scan `number`, opened now (rows x cols positions) if it was not."""
        scan = self.open.get(number)
        if scan is None:
            scan = self.open[number] = self.kind(number, rows, cols, np.zeros(rows * cols, bool), last_input=now)
        return scan

    def close(self, number: int) -> S:
        """Close the open scan `number`: it is closed for good. KeyError if it is not open."""
        scan = self.open.pop(number)
        self.closed.add(number)
        return scan

    def next_open(self) -> int:
        """The lowest scan number not closed (open or not started)."""
        return self.closed.next_open()
