"""Electron counting that reproduces stempy 3.6 (electron.cpp, electronthresholds.cpp) without gain.

What stempy.image.electron_count_frame and electron_count with the threaded sector readers do per frame:
  1. v = frame - (uint16)dark: the float32 dark is cast to an integer (truncation toward zero; x86 gives
     INT_MIN, i.e. 0 in the low 16 bits, for out-of-range values) and the difference wraps modulo 2**16,
     so a pixel below the dark becomes a large value (zeroed by any X-ray threshold below it).
  2. v is zeroed where v <= background or v >= xray (a pixel exactly at either threshold is dropped).
  3. an event is a pixel strictly greater than each of its existing 3x3 neighbours in the thresholded frame:
     no wrap-around at the borders, missing neighbours are skipped, equal neighbours (ties) kill both.
  Output: ascending uint32 linear indices row * cols + col.
(stempy.image.electron_count with a non-threaded reader differs in step 1: it subtracts the float dark and then
truncates, trunc(frame - dark); the two agree when the dark reference holds whole numbers.)

Frames of other integer types: uint8 counts exactly as uint16; a uint32 pixel above 65535 (which stempy would
wrap, and might count as an electron) is out of range, as over any X-ray threshold (thresholds live in uint16).

Implementation: subtract into a padded buffer; pixel w = (frame - dark - lo) mod 2**16 is in range iff
w <= span, with lo..hi the integer range kept by the thresholds; the padding holds 0xFFFF, "out of range".
Two ways to find the maxima, the same events (chosen per frame by the fraction of pixels in range):
  sparse (few in range, the usual 4D-STEM frame): find the candidates with one compare, then test the
         8 neighbours of the candidates only; costs grow with the candidates.
  dense  (more than DENSE_FRACTION in range): m = w + 1 in range, 0 out of range (so "out of range" loses to
         any candidate); an event is m > the maximum of its 8 shifted neighbours. A fixed cost of about ten
         whole-frame uint16 operations, whatever the density.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Thresholds", "ThresholdFit", "calculate_thresholds", "fit_thresholds", "Counter"]

_INT_MIN = -(2**31)
# Above this fraction of pixels in range the dense way is faster (576x576 frames, one core: both ways ~0.7 ms
# per frame at 2.4%; the sparse way takes ~14 ms at 50%, the dense ~1 ms; benchmarks/counting.py --densities).
DENSE_FRACTION = 0.02


class Thresholds(NamedTuple):
    background: float
    xray: float


class ThresholdFit(NamedTuple):
    """What stempy records of a threshold fit (its ElectronCountedMetadata, written by stempy.io as the file's
    `metadata/electron_counting`); the same names, so the field's tools read them."""
    background_threshold: float
    x_ray_threshold: float
    number_of_samples: int           # frames sampled
    min_sample: int                  # smallest and largest dark-subtracted sample value (uint16-wrapped)
    max_sample: int
    mean: float
    variance: float
    std_dev: float
    number_of_bins: int
    x_ray_threshold_n_sigma: float
    background_threshold_n_sigma: float
    optimized_mean: float            # of the Gaussian fitted to the histogram
    optimized_std_dev: float

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(self.background_threshold, self.x_ray_threshold)

    def metadata(self) -> dict:
        """As stempy writes it, with threshold_calculated = True."""
        return {"threshold_calculated": True, **self._asdict()}


def _c_int(x: float) -> int:
    """C++ static_cast<int>(double) as compiled on x86 (cvttsd2si): truncation, INT_MIN when out of range."""
    return int(x) if -(2**31) < x < 2**31 else _INT_MIN


def _dark_u16(dark: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """The dark reference as stempy subtracts it from uint16 frames: low 16 bits of the truncated float32."""
    if dark is None:
        return np.zeros(shape, np.uint16)
    d = np.asarray(dark, np.float32).astype(np.float64)
    if d.shape != tuple(shape):
        raise ValueError(f"dark reference shape {d.shape} != frame shape {tuple(shape)}")
    ok = (d > -(2**31) - 1) & (d < 2**31)  # False for nan/inf too
    return np.trunc(np.where(ok, d, 0)).astype(np.int64).astype(np.uint16)


def _saturated(frames: np.ndarray) -> np.ndarray:
    """uint32 frames clipped to uint16 (what is above is above any X-ray threshold); others unchanged."""
    return np.minimum(frames, 0xFFFF).astype(np.uint16) if frames.dtype.itemsize > 2 else frames


def calculate_thresholds(
    frames: np.ndarray, dark: np.ndarray | None, background_sigma: float = 4.0, xray_sigma: float = 10.0
) -> Thresholds:
    """The (background, X-ray) thresholds of `fit_thresholds`."""
    return fit_thresholds(frames, dark, background_sigma, xray_sigma).thresholds


def fit_thresholds(
    frames: np.ndarray, dark: np.ndarray | None, background_sigma: float = 4.0, xray_sigma: float = 10.0
) -> ThresholdFit:
    """stempy's calculateThresholds on exactly these sampled frames (n, rows, cols), each used once.

    Samples are (frame - dark) wrapped to uint16.  xray = mean + xray_sigma * std (sample std, n - 1).
    Histogram: unit bins [lo, hi) with lo = max(min, int(mean - xray * std)), hi = min(max, int(mean + xray * std))
    (sic: stempy multiplies the X-ray threshold, not its n-sigma, by std; the maximum sample is never binned).
    A Gaussian a*exp(-(x - mu)**2 / (2 s**2)) is least-squares fitted from (max count, mean, std);
    background = mu + background_sigma * |s|.  stempy's Eigen Levenberg-Marquardt and the fit here converge to
    the same optimum, but Eigen stops early (xtol = ftol = 1.5e-8 on its scaled state): the background threshold
    agrees to ~1e-6 relative, 2e-5 at worst (~5e-4 counts), with a lower residual here.  The X-ray threshold is
    bit-identical (same sample order, same summation order).
    Like stempy, raises ValueError when wrapped samples blow the histogram range up, RuntimeError if the fit fails.
    """
    frames = _saturated(np.asarray(frames))
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    d16 = _dark_u16(dark, frames.shape[1:])
    hist = np.zeros(65536, np.int64)
    for frame in frames:
        hist += np.bincount(np.subtract(frame, d16, dtype=np.uint16).ravel(), minlength=65536)
    n = int(hist.sum())
    mean = float(hist @ np.arange(65536, dtype=np.int64)) / n
    squares = 0.0  # stempy sums (v - mean)**2 one sample after the other: np.cumsum does the same rounding
    for frame in frames:
        deviations = np.subtract(frame, d16, dtype=np.uint16).ravel() - mean
        squares = np.cumsum(np.concatenate(([squares], deviations * deviations)))[-1]
    std = math.sqrt(squares / (n - 1.0))
    xray = mean + xray_sigma * std

    present = np.flatnonzero(hist)
    max_bin = min(int(present[-1]), _c_int(mean + xray * std))
    min_bin = max(int(present[0]), _c_int(mean - xray * std))
    n_bins = max_bin - min_bin
    if n_bins < 0:
        raise ValueError(f"cannot histogram the samples (bins {min_bin}..{max_bin}): "
                         "frames below the dark reference wrap")
    bins = np.arange(min_bin, max_bin, dtype=np.float64)
    counts = hist[min_bin:max_bin].astype(np.float64)
    if n_bins < 3:
        raise RuntimeError("Optimization did not converge")
    mu, sigma = _fit_gaussian(bins, counts, np.array([counts.max(), mean, std]))
    return ThresholdFit(mu + abs(sigma) * background_sigma, xray, len(frames), int(present[0]), int(present[-1]),
                        mean, std * std, std, n_bins, float(xray_sigma), float(background_sigma), mu, sigma)


def _fit_gaussian(x: np.ndarray, y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Levenberg-Marquardt least squares of a*exp(-(x-mu)^2/(2 s^2)) to y, started at p = (a, mu, s)."""

    def residual(p):
        return p[0] * np.exp(-((x - p[1]) ** 2) / (2 * p[2] ** 2)) - y

    r = residual(p)
    cost, damping = r @ r, 1e-3
    for _ in range(500):
        dx = x - p[1]
        e = np.exp(-(dx**2) / (2 * p[2] ** 2))
        jac = np.column_stack([e, p[0] * dx * e / p[2] ** 2, p[0] * dx**2 * e / p[2] ** 3])
        a, g = jac.T @ jac, jac.T @ r
        try:
            step = np.linalg.solve(a + damping * np.diag(np.diag(a)), -g)
        except np.linalg.LinAlgError:
            break
        trial = p + step
        r_trial = residual(trial)
        cost_trial = r_trial @ r_trial
        if cost_trial <= cost:
            p, r, cost, damping = trial, r_trial, cost_trial, damping / 10
            if np.all(np.abs(step) <= 1e-13 * (np.abs(p) + 1e-300)):
                return float(p[1]), float(p[2])
        else:
            damping *= 10
            if damping > 1e16:  # no further descent possible: at the optimum to machine precision
                return float(p[1]), float(p[2])
    if not np.all(np.isfinite(p)):
        raise RuntimeError("Optimization did not converge")
    return float(p[1]), float(p[2])


class Counter:
    """Counts one frame at a time; holds the dark reference (as stempy applies it) and the thresholds, and
    preallocated scratch buffers so the hot path only allocates the (small) candidate and result arrays."""

    def __init__(self, dark: np.ndarray | None, thresholds: Thresholds, frame_shape: tuple[int, int]):
        rows, cols = self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.dark = None if dark is None else np.asarray(dark, np.float32)
        self.thresholds = Thresholds(float(thresholds[0]), float(thresholds[1]))
        bg, xr = self.thresholds
        # stempy keeps v with bg < v < xr; v = 0 never beats a neighbour, so lo >= 1 (nan compares false).
        lo = 1 if not bg >= 0 else (math.floor(bg) + 1 if bg < 65536 else 65536)
        hi = 65535 if not xr <= 65536 else math.ceil(xr) - 1
        self._span = hi - lo  # <= 65534, so the 0xFFFF padding is never in range
        self._offset = ((_dark_u16(dark, self.frame_shape).astype(np.int64) + lo) & 0xFFFF).astype(np.uint16)
        self._padded = np.full((rows + 2, cols + 2), 0xFFFF, np.uint16)
        self._inner = self._padded[1:-1, 1:-1]
        self._flat = self._padded.ravel()
        self._mask = np.empty(self._padded.shape, bool)
        width = cols + 2
        self._neighbours = np.array([-width - 1, -width, -width + 1, -1, 1, width - 1, width, width + 1])
        self.dense_fraction = DENSE_FRACTION
        self._m = np.zeros(self._padded.shape, np.uint16)  # dense way: w + 1 in range, 0 elsewhere (and border)
        self._m_inner = self._m[1:-1, 1:-1]
        self._m_around = [self._m[1 + dr : rows + 1 + dr, 1 + dc : cols + 1 + dc]
                          for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]
        self._highest = np.empty(self.frame_shape, np.uint16)  # the highest neighbour of each pixel
        self._in_range = np.empty(self.frame_shape, bool)
        self._strips: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = {}  # per sector layout: (dark, out)

    def count(self, frame: np.ndarray) -> np.ndarray:
        """2-D uint16 frame -> ascending uint32 linear pixel indices (row * cols + col) of electron events."""
        if frame.shape != self.frame_shape:
            raise ValueError(f"frame shape {frame.shape} != {self.frame_shape}")
        self._subtract(frame, self._offset, self._inner)
        return self._events()

    def count_sectors(self, sectors: Sequence[np.ndarray]) -> np.ndarray:
        """The frame given as its column strips left to right; same as count(np.hstack(sectors)), no hstack copy."""
        shapes = tuple(s.shape for s in sectors)
        views = self._strips.get(shapes)
        if views is None:
            rows, cols = self.frame_shape
            if any(len(s) != 2 or s[0] != rows for s in shapes) or sum(s[1] for s in shapes) != cols:
                raise ValueError(f"sectors {shapes} do not tile a {rows}x{cols} frame column-wise")
            edges = np.cumsum([0] + [s[1] for s in shapes])
            views = [(self._offset[:, a:b].copy(), self._inner[:, a:b]) for a, b in zip(edges[:-1], edges[1:])]
            self._strips[shapes] = views
        for sector, (offset, out) in zip(sectors, views):
            self._subtract(sector, offset, out)
        return self._events()

    def _subtract(self, pixels: np.ndarray, offset: np.ndarray, out: np.ndarray) -> None:
        """out = (pixels - offset) mod 2**16; a uint32 pixel above 65535 is put out of range, not wrapped."""
        np.subtract(pixels, offset, out=out)
        if pixels.dtype.itemsize > 2:
            np.copyto(out, self._span + 1, where=pixels > 0xFFFF)

    def _events(self) -> np.ndarray:
        rows, cols = self.frame_shape
        if rows * cols == 1:  # stempy: a pixel without neighbours is always a maximum
            return np.zeros(1, np.uint32)
        if self._span < 0:
            return np.empty(0, np.uint32)
        np.less_equal(self._padded, self._span, out=self._mask)
        if np.count_nonzero(self._mask) > self.dense_fraction * rows * cols:
            return self._dense_events()
        candidates = np.flatnonzero(self._mask)
        values = self._flat[candidates]
        around = self._flat[candidates[:, np.newaxis] + self._neighbours]
        # a neighbour out of range counts as 0 (< any candidate); in range, compare wrapped values directly
        maxima = candidates[((around > self._span) | (around < values[:, np.newaxis])).all(axis=1)]
        r, c = np.divmod(maxima, cols + 2)
        return ((r - 1) * cols + (c - 1)).astype(np.uint32)

    def _dense_events(self) -> np.ndarray:
        np.less_equal(self._inner, self._span, out=self._in_range)
        np.add(self._inner, 1, out=self._m_inner)  # wraps only where out of range, zeroed next
        np.multiply(self._m_inner, self._in_range, out=self._m_inner)
        around = self._m_around
        np.maximum(around[0], around[1], out=self._highest)
        for neighbour in around[2:]:
            np.maximum(self._highest, neighbour, out=self._highest)
        np.greater(self._m_inner, self._highest, out=self._in_range)  # a strict maximum, hence in range
        return np.flatnonzero(self._in_range).astype(np.uint32)
