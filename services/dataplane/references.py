"""A source's reference frames (routing by slice): the frames of a scan every band needs before the others, kept so
that a band's worker restarted mid-scan gets them again. No sockets, no clock (docs/full-rate.md).

A worker owns its band for the whole scan (dataplane/bands.py), so what its plugin built from the scan's first
frames (tomo-fbp: the mean dark and flat that correct every projection) dies with it. The window drops a frame once
every band has its result, so a restarted worker would get the band's remaining projections but nothing to correct
them with. The plugin names those frames (`Plugin.references`); the source keeps its sectors of them for its last
`scans` scans and, on each connection to a worker, sends it those of the scans still open for its band (REFERENCE).
Memory: at most `scans` x len(frames) of this replica's frames, held by reference (no copy; while the window keeps a
frame too, the two share its buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Generic, TypeVar

REFERENCE_SCANS = 2   # the scan under way and the one before it (its last blocks may still be at a worker)


Item = TypeVar("Item")   # what the source keeps of a frame (its sectors: sources.Frame)


class References(Generic[Item]):
    """The reference frames (frame numbers in `frames`, e.g. range(darks + flats)) of the last `scans` scans."""

    def __init__(self, frames: Container[int], scans: int = REFERENCE_SCANS):
        self.frames, self.scans = frames, scans
        self.kept: dict[int, list[Item]] = {}   # scan -> its reference frames, in the order they came

    def keep(self, scan: int, frame: int, item: Item) -> None:
        """Keep `item`, frame `frame` of `scan`, if it is a reference frame; a new scan's first one forgets the
        oldest scan past `scans`."""
        if frame not in self.frames:
            return
        if scan not in self.kept:
            if len(self.kept) >= self.scans and scan < min(self.kept):
                return   # older than every scan kept (a source that replays a scan)
            self.kept[scan] = []
            while len(self.kept) > self.scans:
                del self.kept[min(self.kept)]
        self.kept[scan].append(item)

    def of(self, is_open: Callable[[int], bool]) -> list[Item]:
        """The kept reference frames of the scans `is_open` says a worker may still get frames of, scan by scan."""
        return [item for scan in sorted(self.kept) if is_open(scan) for item in self.kept[scan]]
