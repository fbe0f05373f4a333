"""Flat- and dark-field correction of projections, and the -log that turns transmission into line integrals.

    transmission = (projection - mean dark) / (mean flat - mean dark)          (as tomopy.normalize)
    line integral = -log(max(transmission, MIN_TRANSMISSION))                   (as tomopy.minus_log)

The means build up as the dark and flat frames arrive (streaming: nothing waits for the whole set of them once
they are in). A pixel whose flat is not above its dark (a dead pixel) gets transmission 1, so it adds nothing.
"""

from __future__ import annotations

import numpy as np

MIN_TRANSMISSION = 1e-6   # a fully absorbed (or noisy) pixel: -log stays finite, 13.8


class FlatDark:
    """Running mean dark and flat of a band of detector rows: `shape` (rows, cols) of what `add_*` gets."""

    def __init__(self, shape: tuple[int, int]):
        self.dark_sum = np.zeros(shape)
        self.flat_sum = np.zeros(shape)
        self.darks = 0
        self.flats = 0

    def add_dark(self, pixels: np.ndarray) -> None:
        self.dark_sum += pixels
        self.darks += 1

    def add_flat(self, pixels: np.ndarray) -> None:
        self.flat_sum += pixels
        self.flats += 1

    def transmission(self, projection: np.ndarray) -> np.ndarray:
        """(projection - dark) / (flat - dark), float32 (rows, cols); ValueError without any flat."""
        if not self.flats:
            raise ValueError("no flat field yet: a projection cannot be corrected")
        dark = self.dark_sum / self.darks if self.darks else 0.0
        beam = self.flat_sum / self.flats - dark
        good = beam > 0
        out = np.ones(projection.shape, np.float32)
        out[good] = ((projection - dark)[good] / beam[good]).astype(np.float32)
        return out


def minus_log(transmission: np.ndarray) -> np.ndarray:
    """-log of a transmission, float32, clipped below at MIN_TRANSMISSION."""
    return -np.log(np.maximum(transmission, np.float32(MIN_TRANSMISSION)))
