"""A source replica's window: the frames it keeps until the writer has them, and where each block goes.
No sockets, no clock (docs/full-rate.md).

A source keeps every frame (its own sectors of it) from the moment it has it until the lane forwards
the writer's receipt (`release`), so a block whose worker dies can be sent again to another. It asks a
block's lane for the block's worker on its first frame (`WANT`), sends the block's frames to that
worker once it is known, in as few messages as it can, and ends the block (BLOCK_END) once it has
gone past it: a frame of a later block, the end of the scan, or `flush` at the block timeout (which
sends what is there without ending). The window is full at `limit` frames kept: then the source
waits for releases (backpressure). A lane that has closed a scan already (a source that comes back
replays scans the session has given up) says so, and the window drops that scan's frames of the lane.

Routing by slice (`bands` > 1, dataplane/bands.py): a block goes out per band, each band to the worker its lane
names for it (ASSIGN names the band), with the band's rows of each kept sector; a frame is kept until every
band of it is released.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from detstream.services.dataplane.blocks import Blocks
from detstream.services.dataplane.scans import ClosedScans
from detstream.services.dataplane.wire import FRAME_BITS, frame_key


class Send(NamedTuple):
    """A BLOCK message to send: to the worker whose `data` address is `worker`, these frames of a block
    (their kept sectors); `end`: the last of the block; `again`: a re-send after its first worker died."""
    worker: str
    scan: int
    block: int
    frames: list[int]
    end: bool
    again: bool
    band: int = 0


@dataclass(eq=False)
class OutBlock:
    worker: str | None = None         # the `data` address of the worker the lane named (None: not yet)
    again: bool = False
    unsent: list[int] = field(default_factory=list)   # kept frames not yet sent to `worker`
    sent: list[int] = field(default_factory=list)     # frames sent to `worker`
    passed: bool = False              # the source has gone past it: no frame of it will come
    ended: bool = False               # BLOCK_END sent to `worker`


class SourceWindow:
    """The window of one source replica over the session's `blocks`, cut in `bands` bands; at most `limit`
    frames kept."""

    def __init__(self, blocks: Blocks, limit: int, bands: int = 1):
        self.blocks, self.limit, self.bands = blocks, limit, bands
        self.kept: dict[int, list[tuple[int, Any]]] = {}   # frame key -> [(sector, pixels)]
        self.unreleased: dict[int, int] = {}               # (by slice) frame key -> bit mask of bands not released
        self.out: dict[tuple[int, int, int], OutBlock] = {}    # (scan, block, band) -> what goes where
        self.current: tuple[int, int] | None = None       # the block frames come for now
        self.closed = [ClosedScans() for _ in range(blocks.lanes)]   # per lane, the scans it has closed

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.limit

    def frame(self, scan: int, frame: int,
              sectors: list[tuple[int, Any]]) -> tuple[tuple[int, int] | None, list[Send]] | None:
        """Keep a frame. Returns the block to ask its lane for (a new one, else None) and what to send now; or
        None, keeping nothing, when its lane has closed the scan (`closed`)."""
        key = (scan, self.blocks.of(frame))
        if scan in self.closed[self.blocks.lane(key[1])]:
            return None
        sends = self.pass_current() if key != self.current else []
        self.current = key
        self.kept[frame_key(scan, frame)] = sectors
        if self.bands > 1:
            self.unreleased[frame_key(scan, frame)] = (1 << self.bands) - 1
        ask = key if (scan, key[1], 0) not in self.out else None
        for band in range(self.bands):
            out = self.out.get((scan, key[1], band))
            if out is None:
                out = self.out[(scan, key[1], band)] = OutBlock()
            out.unsent.append(frame)
        return ask, sends

    def pass_current(self) -> list[Send]:
        """The source has gone past the current block (end of scan, or a frame of another block)."""
        if self.current is None:
            return []
        (scan, block), self.current = self.current, None
        sends = []
        for band in range(self.bands):
            out = self.out.get((scan, block, band))
            if out is not None:
                out.passed = True
                sends += self.sends((scan, block, band), out)
        return sends

    def assigned(self, scan: int, block: int, worker: str, again: bool, band: int = 0) -> list[Send]:
        """The lane named the worker of the block's band `band` (`again`: anew, after its first worker died):
        what to send."""
        key = (scan, block, band)
        out = self.out.get(key)
        if out is None:
            return []
        if again or (out.worker is not None and out.worker != worker):
            self.send_again(scan, out, band)
        out.worker = worker
        return self.sends(key, out)

    def keeps(self, scan: int, frame: int, band: int) -> bool:
        """Whether band `band` of a frame is kept (not released)."""
        return self.keeps_key(frame_key(scan, frame), band)

    def keeps_key(self, key: int, band: int) -> bool:
        return key in self.kept and (self.bands == 1 or bool(self.unreleased.get(key, 0) >> band & 1))

    def holds(self, scan: int, band: int) -> bool:
        """Whether band `band` of some frame of `scan` is kept (not released): its worker may still get it."""
        return any(key >> FRAME_BITS == scan and self.keeps_key(key, band) for key in self.kept)

    def send_again(self, scan: int, out: OutBlock, band: int = 0) -> None:
        """Everything still kept of a block goes (to the worker named next), flagged as a re-send, ended anew."""
        out.unsent = [f for f in sorted(set(out.sent) | set(out.unsent)) if self.keeps(scan, f, band)]
        out.sent, out.ended, out.again = [], False, True

    def worker_gone(self, worker: str) -> None:
        """The worker at `worker` was declared dead: nothing more goes there; what was assigned to it goes, whole
        and flagged as a re-send, where its lane names next."""
        for (scan, _, band), out in self.out.items():
            if out.worker == worker:
                self.send_again(scan, out, band)
                out.worker = None

    def ask_again(self, lane: int) -> list[tuple[int, int]]:
        """Lane `lane` restarted: it knows nothing of its blocks. Each block of it still kept goes, once the
        lane names a worker again, whole (what is kept of it) and flagged as a re-send. Returns those blocks,
        to ask it for."""
        keys = [key for key in self.out if self.blocks.lane(key[1]) == lane]
        for key in keys:
            self.send_again(key[0], self.out[key], key[2])
            self.out[key].worker = None
        return sorted({(scan, block) for scan, block, _ in keys})

    def flush(self) -> list[Send]:
        """At the block timeout: send the current block's frames that can go, without ending it."""
        if self.current is None:
            return []
        scan, block = self.current
        keys = [(scan, block, band) for band in range(self.bands)]
        return [send for key in keys if key in self.out for send in self.sends(key, self.out[key], end=False)]

    def sends(self, key: tuple[int, int, int], out: OutBlock, end: bool = True) -> list[Send]:
        if out.worker is None or out.ended:
            return []
        ending = end and out.passed
        if not out.unsent and not ending:
            return []
        frames, out.unsent = out.unsent, []
        out.sent.extend(frames)
        out.ended = ending
        return [Send(out.worker, key[0], key[1], frames, ending, out.again, key[2])]

    def close(self, scan: int, lane: int) -> None:
        """Lane `lane` has closed `scan` (its frames were late): drop what is kept of it there, keep nothing more."""
        self.closed[lane].add(scan)
        for key in [k for k in self.out if k[0] == scan and self.blocks.lane(k[1]) == lane]:
            out = self.out.pop(key)
            for frame in out.sent + out.unsent:
                self.kept.pop(frame_key(scan, frame), None)
                self.unreleased.pop(frame_key(scan, frame), None)
        if self.current is not None and self.current[0] == scan and self.blocks.lane(self.current[1]) == lane:
            self.current = None

    def release(self, keys, bands=()) -> None:
        """The writer has these frames' results (or their scan is closed): drop them, and forget the blocks
        gone past with nothing left. Routing by slice: `bands` names the band of each key, and a frame goes once
        every band of it is released."""
        if self.bands > 1:
            keys = self.released_bands(keys, bands)
        for key in keys:
            self.kept.pop(key, None)
        for k in [k for k, out in self.out.items() if (out.ended or out.passed) and not any(
                frame_key(k[0], f) in self.kept for f in out.sent + out.unsent)]:
            del self.out[k]

    def released_bands(self, keys, bands) -> list[int]:
        """Clear these (key, band) units; returns the keys of which every band is released now."""
        done = []
        for key, band in zip(keys, bands):
            left = self.unreleased.get(key)
            if left is not None:
                left &= ~(1 << band)
                if left:
                    self.unreleased[key] = left
                else:
                    del self.unreleased[key]
                    done.append(key)
        return done

    def sectors(self, scan: int, frame: int) -> list[tuple[int, Any]] | None:
        """The kept sectors of a frame (None: released)."""
        return self.kept.get(frame_key(scan, frame))
