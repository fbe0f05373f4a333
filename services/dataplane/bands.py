"""Bands: routing by slice, the second distribution mode of the lanes (spec.tomography set).

Reconstruction works on sinograms (one detector row over all angles), so each worker owns a band of detector
rows (the volume's slices) for the whole scan, and every frame is cut into row bands, each sent to the worker that
owns it: band k of `count` holds slices [first, first + n), the rows split evenly over the workers (the first
`rows % count` bands one row more), and takes `halo` rows of neighbours each side (Paganin's filter reaches
across the cut; clipped to the detector). Worker replica k owns band k: a StatefulSet that restarts ordinal k
gives the band back to it.

Row slices of a C-order sector strip (rows, cols / sectors) are contiguous views, so a source sends each band its
rows without a copy. Everything that counts frames in the block mode (credits, open frames, receipts, releases)
counts (frame, band) units in this one; with one band it is the block mode.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bands:
    """`count` bands over `rows` detector rows, each taking `halo` neighbour rows each side."""
    rows: int
    count: int = 1
    halo: int = 0

    def slices(self, band: int) -> tuple[int, int]:
        """(first, n): the band's own rows (the volume's slices it reconstructs)."""
        size, extra = divmod(self.rows, self.count)
        first = band * size + min(band, extra)
        return first, size + (band < extra)

    def rows_of(self, band: int) -> tuple[int, int]:
        """[lo, hi): the detector rows band `band` is sent (its slices and the halo, clipped)."""
        first, n = self.slices(band)
        return max(0, first - self.halo), min(self.rows, first + n + self.halo)

    @property
    def keyed(self) -> bool:
        """Whether frames are cut into bands (routing by slice), rather than routed whole."""
        return self.count > 1 or self.halo > 0

    @property
    def all(self) -> int:
        """The bit mask of every band."""
        return (1 << self.count) - 1

