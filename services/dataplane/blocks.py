"""Blocks: the unit in which frames are routed and sent (docs/full-rate.md).

A scan's frames are cut into blocks of `block_frames` consecutive frames: block b holds frames
b * block_frames .. (b + 1) * block_frames - 1 (the last block of a scan may be shorter), and belongs to
lane b % lanes. A block is routed once (the lane picks its worker) and sent by each source replica in as
few messages as it can; a frame stays the unit of credit, receipts and accounting.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Blocks:
    """Block arithmetic of a session: scans of `scan_frames` frames, `block_frames` per block, `lanes` lanes."""
    scan_frames: int
    block_frames: int
    lanes: int

    def of(self, frame: int) -> int:
        """The block of a frame."""
        return frame // self.block_frames

    def lane(self, block: int) -> int:
        """The lane that routes a block."""
        return block % self.lanes

    def frames(self, block: int) -> range:
        """The frames of a block (fewer than block_frames for a scan's last block)."""
        first = block * self.block_frames
        return range(first, min(first + self.block_frames, self.scan_frames))

    @property
    def count(self) -> int:
        """Blocks per scan."""
        return -(-self.scan_frames // self.block_frames)

    def lane_blocks(self, lane: int) -> range:
        """The blocks of a scan that `lane` routes."""
        return range(lane, self.count, self.lanes)

    def lane_frames(self, lane: int) -> int:
        """How many frames of a scan `lane` routes."""
        return sum(len(self.frames(b)) for b in self.lane_blocks(lane))
