"""Raw frames reduced where they are: in the worker that holds the frame, not in the writer.

A raw frame (the `frames` result kind: noop, photon-counting data) is 663 KB at 576x576 uint16; what the live
images need of it is a few numbers per scan position and, per scan, two patterns. So the worker reduces each
frame it holds (`FrameReducer.record`) and sends the writer only:
  - per frame, in its RESULT: the record, float64 (detectors + 3,): the sum of the frame over each virtual
    detector of the geometry (`DetectorGeometry.names` order), then the frame's total, its x moment
    sum(value * column) and its y moment sum(value * row). Integer pixels are summed in int64 (exact), float
    pixels in float64; the record is exact while the sums stay below 2**53.
  - per scan, every PATTERN_S or when its frames pause (`ScanPatterns`): a PATTERN message with the summed
    pattern (`sum_dtype`: uint32 for 8- and 16-bit pixels, sent at least every 65536 frames so it cannot
    overflow; int64 for 32-bit ones; float64 for float pixels) and the maximum pattern (the pixel type) of the
    frames it lists (their frame keys, uint64), all of whose results went before it on the same socket.
The writer places the records (`ScanImages.add_reduced`) and merges a PATTERN (`ScanImages.add_patterns`) only
when every frame it lists is one whose result the writer took from that worker: a frame processed twice (a
re-send after a worker was declared dead) is then never counted twice in the patterns; such a pattern is
dropped and its frames are left out, which the scan's `pattern_frames` says (feed.py).

Per frame the work is one pass per sector strip for the row and for the column sums (in uint32 for 8- and
16-bit pixels: exact, and half the memory traffic of int64), a gather of the detectors' pixel index lists
(precomputed: no full-frame mask product), and the pattern's in-place add and maximum; no copy of the frame
(the strips are reduced where they lie in the received buffers).

The geometry is the session's (spec.liveView.geometry): the writer cannot apply another one to the records,
so a raw-frame scan refuses a new geometry (`ScanImages.set_geometry` raises RecomputeUnavailable, shown on
the page).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detstream.services.results.geometry import DetectorGeometry

__all__ = ["FrameReducer", "ScanPatterns", "PATTERN_S", "PATTERN_MAX_FRAMES", "record_size", "sum_dtype"]

PATTERN_S = 0.25  # a worker sends each scan's patterns at least this often while frames come (the view's ~1 s)
PATTERN_MAX_FRAMES = 65536  # and at least every this many frames: 65536 x 65535 still fits a uint32 sum


def _small_integers(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) and dtype.itemsize <= 2


def sum_dtype(dtype) -> np.dtype:
    """The summed pattern's type for pixels of `dtype` (over at most PATTERN_MAX_FRAMES frames, exact): uint32 for
    8- and 16-bit integers, int64 for wider ones, float64 for floats."""
    dtype = np.dtype(dtype)
    if _small_integers(dtype):
        return np.dtype(np.uint32)
    return np.dtype(np.int64 if np.issubdtype(dtype, np.integer) else np.float64)


def record_size(geometry: DetectorGeometry) -> int:
    """Bytes of one frame's record: float64 per detector, then total, x moment, y moment."""
    return 8 * (len(geometry.radii) + 3)


class FrameReducer:
    """Reduces raw frames of `frame_shape` (rows, cols) and pixel `dtype`, given as `sectors` column strips of
    (rows, cols / sectors) each (one strip: the whole frame), for `geometry`. GeometryError for a geometry whose
    centre is outside the frame."""

    def __init__(self, frame_shape: tuple[int, int], geometry: DetectorGeometry, dtype, sectors: int = 1):
        rows, cols = self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.geometry = geometry
        self.dtype = np.dtype(dtype)
        self.acc = np.dtype(np.float64 if np.issubdtype(self.dtype, np.floating) else np.int64)  # whole-frame sums
        self.line = sum_dtype(dtype)  # a row's or column's sum: at most 65537 x 65535 for 16-bit pixels
        if _small_integers(self.dtype) and max(self.frame_shape) > 65537:
            self.line = self.acc
        width = cols // sectors
        masks = geometry.masks(self.frame_shape).reshape(-1, rows, cols)
        # per strip, per detector: the flat indices of its pixels within the strip (a strip is C-contiguous)
        self.indices = [[np.flatnonzero(mask[:, s * width:(s + 1) * width]) for mask in masks]
                        for s in range(sectors)]
        self.width = width
        self.x = np.arange(cols, dtype=self.acc)
        self.y = np.arange(rows, dtype=self.acc)

    def strips(self, frame: np.ndarray) -> list[np.ndarray]:
        """A whole (rows, cols) frame as this reducer's strips (views)."""
        return [frame[:, s * self.width:(s + 1) * self.width] for s in range(len(self.indices))]

    def record(self, strips: Sequence[np.ndarray]) -> np.ndarray:
        """float64 (detectors + 3,): the detector sums, total, x moment, y moment of one frame (see the module)."""
        detectors = np.zeros(len(self.geometry.radii), self.acc)
        row_sums = np.zeros(self.frame_shape[0], self.acc)
        column_sums = np.empty(self.frame_shape[1], self.acc)
        for s, (strip, indices) in enumerate(zip(strips, self.indices)):
            flat = strip.reshape(-1)
            for d, index in enumerate(indices):
                detectors[d] += flat.take(index).sum(dtype=self.acc)
            row_sums += strip.sum(axis=1, dtype=self.line)
            column_sums[s * self.width:(s + 1) * self.width] = strip.sum(axis=0, dtype=self.line)
        return np.concatenate((detectors, (row_sums.sum(), column_sums @ self.x, row_sums @ self.y))) \
            .astype(np.float64)


class ScanPatterns:
    """One scan's summed and maximum patterns over the frames a worker reduced since the last `take`."""

    def __init__(self, reducer: FrameReducer):
        self.reducer = reducer
        strip = (reducer.frame_shape[0], reducer.width)
        # per strip, so each add runs over contiguous memory; joined by `take`
        self.sums = [np.zeros(strip, sum_dtype(reducer.dtype)) for _ in reducer.indices]
        self.maxima = [np.zeros(strip, reducer.dtype) for _ in reducer.indices]
        self.keys: list[int] = []
        self.since = 0.0  # monotonic time of the first frame since the last take

    def add(self, strips: Sequence[np.ndarray], key: int, now: float) -> None:
        """Add one frame (as the reducer's strips), whose frame key is `key`."""
        if not self.keys:
            self.since = now
        for strip, total, maximum in zip(strips, self.sums, self.maxima):
            np.add(total, strip, out=total)
            np.maximum(maximum, strip, out=maximum)
        self.keys.append(key)

    @property
    def full(self) -> bool:
        """As many frames as the summed pattern's type holds exactly: `take` now."""
        return len(self.keys) >= PATTERN_MAX_FRAMES

    def take(self) -> list[bytes]:
        """The PATTERN message's parts (sum, max: (rows, cols) C order; frame keys as uint64), and start over."""
        parts = [np.hstack(self.sums).tobytes(), np.hstack(self.maxima).tobytes(),
                 np.array(self.keys, np.uint64).tobytes()]
        for pattern in (*self.sums, *self.maxima):
            pattern[:] = 0
        self.keys = []
        return parts
