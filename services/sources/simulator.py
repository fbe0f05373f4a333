"""A 4D Camera simulator: sparse electron events on a noisy dark background, with ground truth.

Every frame is a pure function of (seed, scan, frame), so any source process can produce just
its own sectors of it, and the ground truth can be recomputed anywhere. Noise comes from a small
bank of precomputed dark+noise frames (fresh Gaussian noise per frame would cap the simulator
far below the pipeline); events and X-ray hits are drawn per frame.

`SimulatorSource` is the `simulator` source kind (spec.source.simulator holds its settings).
"""

from __future__ import annotations

import numpy as np

from detstream.services.model.schema import FieldError
from detstream.services.sources import GridSource

BANK_SIZE = 8
SHARE = 0.15          # fraction of an electron's signal its 4 neighbours each receive
_SPREAD = ((0, 0, 1.0), (-1, 0, SHARE), (1, 0, SHARE), (0, -1, SHARE), (0, 1, SHARE))
XRAY_COUNTS = 6000.0  # an X-ray hit: far above the X-ray threshold


def dark_reference(seed: int, rows: int, cols: int, level: float) -> np.ndarray:
    """The simulated detector's dark reference (float32), what a dark acquisition would average to."""
    rng = np.random.default_rng([seed, 0xDA4C])
    return np.clip(rng.normal(level, level * 0.05, (rows, cols)), 0, None).astype(np.float32)


class Simulator:
    """Frames of a simulated 4D Camera: `sim` the spec.source.simulator settings, `detector` spec.detector."""

    def __init__(self, sim, detector):
        self.sim = sim
        self.rows, self.cols, self.sectors = detector.rows, detector.cols, detector.sectors
        self.dtype = np.dtype(detector.dtype)
        self.width = self.cols // self.sectors
        self.dark = dark_reference(sim.seed, self.rows, self.cols, sim.dark_level)
        rng = np.random.default_rng([sim.seed, 0xBA4C])
        top = np.iinfo(self.dtype).max if self.dtype.kind == "u" else np.finfo(self.dtype).max
        bank = self.dark + sim.pedestal + rng.normal(0.0, sim.noise_sigma, (BANK_SIZE, self.rows, self.cols))
        bank = np.clip(np.rint(bank), 0, top).astype(self.dtype)
        # Stored as contiguous sector strips, so producing a sector is one contiguous copy.
        self.bank = np.ascontiguousarray(bank.reshape(BANK_SIZE, self.rows, self.sectors, self.width)
                                         .transpose(0, 2, 1, 3))
        self.top = top
        self._cached: tuple = (None, None)

    def _events(self, scan: int, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        rng = np.random.default_rng([self.sim.seed, scan, frame])
        n = rng.poisson(self.sim.electrons_per_frame)
        # Keep centres off the frame border so every neighbour exists; centres of one frame are
        # kept at least 3 pixels apart so each one is a strict local maximum (countable truth).
        rows = rng.integers(1, self.rows - 1, n)
        cols = rng.integers(1, self.cols - 1, n)
        keep = _spread(rows, cols)
        rows, cols = rows[keep], cols[keep]
        signal = rng.normal(self.sim.electron_signal, self.sim.electron_signal * 0.1, rows.size).clip(1)
        xray = rng.random() < self.sim.xray_probability
        xray_at = int(rng.integers(0, self.rows * self.cols)) if xray else -1
        return rows, cols, signal, xray_at

    def truth(self, scan: int, frame: int) -> np.ndarray:
        """Linear pixel indices of the electron events put into the frame, ascending."""
        rows, cols, _, xray_at = self._events(scan, frame)
        idx = rows * self.cols + cols
        if xray_at >= 0:  # a hit on or next to an event destroys that event
            xr, xc = divmod(xray_at, self.cols)
            idx = idx[(np.abs(rows - xr) > 1) | (np.abs(cols - xc) > 1)]
        return np.sort(idx).astype(np.uint32)

    def sector(self, scan: int, frame: int, sector: int) -> np.ndarray:
        """One sector (rows x cols/sectors, contiguous) of the frame."""
        out = self.bank[(frame * 7 + scan) % BANK_SIZE, sector].copy()
        idx, add = self._deposits(scan, frame, sector)
        if idx.size:
            flat = out.reshape(-1)
            flat[idx] = np.clip(np.rint(flat[idx] + add), 0, self.top)
        return out

    def _deposits(self, scan: int, frame: int, sector: int) -> tuple[np.ndarray, np.ndarray]:
        """Linear indices inside the sector and the counts added there (touches only event pixels).
        Worked out once per frame for all its sectors: a source sends several sectors of each frame."""
        if self._cached[0] != (scan, frame):
            self._cached = ((scan, frame), self._frame_deposits(scan, frame))
        rows, cols, counts = self._cached[1]
        lo = sector * self.width
        inside = (cols >= lo) & (cols < lo + self.width)
        return rows[inside] * self.width + (cols[inside] - lo), counts[inside]

    def _frame_deposits(self, scan: int, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row, column and summed counts of every pixel of the frame that receives signal."""
        rows, cols, signal, xray_at = self._events(scan, frame)
        r = np.concatenate([rows + dr for dr, _, _ in _SPREAD])
        c = np.concatenate([cols + dc for _, dc, _ in _SPREAD])
        counts = np.concatenate([signal * share for _, _, share in _SPREAD])
        if xray_at >= 0:
            xr, xc = divmod(xray_at, self.cols)
            r, c, counts = np.append(r, xr), np.append(c, xc), np.append(counts, XRAY_COUNTS)
        # Contributions to one pixel are summed in the order they come, as per sector before.
        pixel, where = np.unique(r * self.cols + c, return_inverse=True)
        summed = np.bincount(where, weights=counts, minlength=pixel.size)
        return pixel // self.cols, pixel % self.cols, summed

    def frame(self, scan: int, frame: int) -> np.ndarray:
        return np.hstack([self.sector(scan, frame, s) for s in range(self.sectors)])


def _spread(rows: np.ndarray, cols: np.ndarray, gap: int = 3) -> np.ndarray:
    """Mask keeping the first of any events closer than `gap` pixels (Chebyshev distance): an event
    is dropped when an earlier event that is kept lies that close."""
    keep = np.ones(rows.size, dtype=bool)
    if rows.size < 2:
        return keep
    near = (np.abs(rows[:, None] - rows[None, :]) < gap) & (np.abs(cols[:, None] - cols[None, :]) < gap)
    near = np.triu(near, 1)          # near[j, i]: j comes before i
    for i in np.flatnonzero(near.any(axis=0)):   # the few events with an earlier neighbour, in order
        keep[i] = not (keep & near[:, i]).any()
    return keep


class SimulatorSource(GridSource):
    """The `simulator` source kind: frames from `Simulator`, with spec.source.simulator's settings."""

    summary = "the built-in 4D Camera simulator"

    @classmethod
    def check(cls, spec):
        # electron events are drawn with their 3x3 neighbourhood inside the frame
        return [FieldError(f"spec.detector.{axis}", f"must be >= 3 with the simulator source (an electron event "
                           f"spreads over 3x3 pixels); got {getattr(spec.detector, axis)}")
                for axis in ("rows", "cols") if getattr(spec.detector, axis) < 3]

    def __init__(self, spec, replica):
        super().__init__(spec, replica)
        self.sector = Simulator(spec.source.simulator, spec.detector).sector
