"""A worker's assembly of frames from the blocks it was routed (docs/full-rate.md). No sockets, no clock.

Each source replica sends its sectors of a block's frames in BLOCK messages, the last flagged
BLOCK_END. A frame is handed on as soon as all its sectors are in; once every source has ended the
block, its frames still missing sectors are handed on with those sectors filled (partial), and the
block's frames of which no sector came are named absent (the lane then counts them lost, unless a
copy comes). A source that never ends a block (it died) is waited for `frame_timeout` seconds of the
block's silence; a frame missing sectors is handed on partial `frame_timeout` seconds after its first
sector, whatever the block does. A frame handed on and sent again while its block is open here (a
source's duplicate) is refused, unless it comes as a re-send (its lane routed the block anew: the first
result may have been acknowledged to a lane that died); a block that comes again after it finished here is
assembled anew. The writer drops second results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Refusal = tuple[str, str]   # (reason as the stage counts it, detail for the log)


@dataclass(eq=False)
class Pending:
    """A frame with some sectors in: parts by sector (None: not yet), how many, first arrival."""
    parts: list
    have: int
    first: float


@dataclass(eq=False)
class BlockState:
    frames: range                     # the block's frames
    last: float                       # last arrival
    ends: set[str] = field(default_factory=set)
    pending: dict[int, Pending] = field(default_factory=dict)
    handed: set[int] = field(default_factory=set)   # frames handed on


class Assembly:
    """The blocks a worker assembles. `sectors` per frame, `sources` replicas each ending every block;
    `fill` stands for a missing sector. Hands on through two callbacks:

    - on_frame(scan: int, frame: int, parts: list, mask: int): parts in sector order (`fill` where one is
      missing), mask bit i set for each sector i that came;
    - on_absent(scan: int, frames: list[int]): frames of a finished block of which nothing came.
    """

    def __init__(self, sectors: int, sources: int, fill: Any, on_frame: Callable, on_absent: Callable):
        self.sectors, self.sources, self.fill = sectors, sources, fill
        self.all_sectors = (1 << sectors) - 1
        self.on_frame, self.on_absent = on_frame, on_absent
        self.blocks: dict[tuple[int, int], BlockState] = {}

    def block(self, scan: int, block: int, frames_of_block: range, sender: str, frames: Sequence[int],
              sectors: Sequence[int], parts: Sequence[Any], end: bool, now: float,
              again: bool = False) -> list[Refusal]:
        """Take a BLOCK message: sectors `sectors` of each of `frames` (all in `frames_of_block`), parts frame
        by frame; `end`: the sender's last of this block; `again`: a re-send (its lane routed the block anew),
        whose frames go on again even if they went on before. Returns what was refused, per frame."""
        state = self.blocks.get((scan, block))
        if state is None:
            state = self.blocks[(scan, block)] = BlockState(frames_of_block, now)
        state.last = now
        refused = []
        k = len(sectors)
        for i, frame in enumerate(frames):
            if frame not in state.frames:
                refused.append(("misrouted", f"frame {frame} is not in block {block}"))
            elif frame in state.handed and not again:
                refused.append(("duplicate", f"frame {frame} again"))
            else:
                state.handed.discard(frame)
                problem = self.take(state, scan, frame, sectors, parts[i * k:(i + 1) * k], now)
                if problem:
                    refused.append(problem)
        if end:
            state.ends.add(sender)
            if len(state.ends) >= self.sources:
                self.finish(scan, block)
        return refused

    def take(self, state: BlockState, scan: int, frame: int, sectors: Sequence[int], parts: Sequence[Any],
             now: float) -> Refusal | None:
        entry = state.pending.get(frame)
        if entry is None:
            entry = state.pending[frame] = Pending([None] * self.sectors, 0, now)
        for sector, part in zip(sectors, parts):
            if entry.parts[sector] is not None:
                return "duplicate-sector", f"frame {frame} sector {sector} again"
            entry.parts[sector] = part
            entry.have += 1
        if entry.have == self.sectors:
            self.hand_on(state, scan, frame)
        return None

    def hand_on(self, state: BlockState, scan: int, frame: int) -> None:
        parts = state.pending.pop(frame).parts
        state.handed.add(frame)
        mask = self.all_sectors
        if None in parts:
            mask = sum(1 << i for i, p in enumerate(parts) if p is not None)
            parts = [p if p is not None else self.fill for p in parts]
        self.on_frame(scan, frame, parts, mask)

    def finish(self, scan: int, block: int) -> None:
        """Every source ended the block (or went silent): hand on what waits, name what never came."""
        state = self.blocks.pop((scan, block))
        for frame in sorted(state.pending):
            self.hand_on(state, scan, frame)
        absent = [f for f in state.frames if f not in state.handed]
        if absent:
            self.on_absent(scan, absent)

    def sweep(self, now: float, frame_timeout: float) -> None:
        """Hand on frames waiting for sectors longer than `frame_timeout`; finish blocks silent that long."""
        for (scan, block), state in list(self.blocks.items()):
            if now - state.last > frame_timeout:
                self.finish(scan, block)
                continue
            for frame in [f for f, p in state.pending.items() if now - p.first > frame_timeout]:
                self.hand_on(state, scan, frame)

    @property
    def waiting(self) -> int:
        """Frames waiting for sectors."""
        return sum(len(s.pending) for s in self.blocks.values())
