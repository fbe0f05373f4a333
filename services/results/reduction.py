"""Raw frames reduced where they are: in the worker that holds the frame, not in the writer.

A raw frame (the `frames` result kind: noop, photon-counting data) is 663 KB at 576x576 uint16; what the live
images need of it is a few numbers per scan position and, per scan, two patterns. So the worker reduces each
frame it holds (`FrameReducer.record`) and sends the writer only:
  - per frame, in its RESULT: the record, float64 (detectors + 3,): the sum of the frame over each virtual
    detector of the geometry (`DetectorGeometry.names` order), then the frame's total, its x moment
    sum(value * column) and its y moment sum(value * row), summed in float64: exact for integer pixels while
    the sums stay below 2**53 (16-bit pixels on a 576x576 frame: below 2**45).
  - per scan, every PATTERN_S or when its frames pause (`ScanPatterns`): a PATTERN message with the summed
    pattern (`sum_dtype`: uint32 for 8- and 16-bit pixels, sent at least every 65536 frames so it cannot
    overflow; int64 for 32-bit ones; float64 for float pixels) and the maximum pattern (the pixel type) of the
    frames it lists (their frame keys, uint64), all of whose results went before it on the same socket.
The writer places the records (`ScanImages.add_reduced`) and merges a PATTERN (`ScanImages.add_patterns`) only
when every frame it lists is one whose result the writer took from that worker: a frame processed twice (a
re-send after a worker was declared dead) is then never counted twice in the patterns; such a pattern is
dropped and its frames are left out, which the scan's `pattern_frames` says (feed.py).

Per frame and sector strip the work is: one copy into a float64 buffer; one matrix product with [ones, row
numbers] (the column sums and each column's y moment at once: exact, as every partial sum is an integer below
2**53; half the time of numpy's two integer reductions); one np.add.reduceat over the detectors' runs of pixels
along the rows (precomputed from the geometry: no full-frame mask product, and half the time of a gather of the
detectors' pixel indices); and the pattern's in-place add and maximum. The received buffers are read where they
lie (no joined frame). ~0.25 ms per 576x576 uint16 frame of 4 strips on one core here (record ~0.16 ms,
pattern ~0.09 ms; gathers and integer reductions took ~0.45 ms, the writer's float64 matrix product ~2 ms).

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
        self.sectors = sectors
        self.width = width = cols // sectors
        masks = geometry.masks(self.frame_shape).reshape(-1, rows, cols)
        self.runs = [_runs(masks[:, :, s * width:(s + 1) * width]) for s in range(sectors)]
        self.x = np.arange(cols, dtype=np.float64)
        self.rows_by = np.stack([np.ones(rows), np.arange(rows, dtype=np.float64)])  # (2, rows): [1, y]
        self.flat = np.zeros(rows * width + 1)  # one strip as float64, and a 0 past its end (see _runs)
        self.buffer = self.flat[:-1].reshape(rows, width)

    def record(self, strips: Sequence[np.ndarray]) -> np.ndarray:
        """float64 (detectors + 3,): the detector sums, total, x moment, y moment of one frame (see the module)."""
        detectors = np.zeros(len(self.geometry.radii))
        moments = np.zeros((2, self.frame_shape[1]))  # per column: its sum, and its sum of value * row
        for s, (strip, (bounds, detector_of)) in enumerate(zip(strips, self.runs)):
            np.copyto(self.buffer, strip)
            np.matmul(self.rows_by, self.buffer, out=moments[:, s * self.width:(s + 1) * self.width])
            if bounds.size:
                detectors += detector_of @ np.add.reduceat(self.flat, bounds)[::2]
        total, y_moment = moments.sum(axis=1)
        return np.concatenate((detectors, (total, moments[0] @ self.x, y_moment)))


def _runs(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The detectors `masks` (detectors, rows, width) of one strip as runs of pixels along its rows: `bounds`, the
    flat (start, end) of every run, interleaved (np.add.reduceat(flat, bounds)[::2] sums each run: the odd results,
    from an end to the next start, are not used; an end may be the strip's size, hence the 0 past its end), and
    `detector_of` (detectors, runs), 1 where a run is the detector's. A run's sum reads its pixels contiguously,
    where a gather of the pixel indices took twice as long."""
    detectors, rows, width = masks.shape
    padded = np.zeros((detectors, rows, width + 2), np.int8)
    padded[:, :, 1:-1] = masks
    edges = np.diff(padded, axis=2)  # +1 where a run starts, -1 one past where it ends
    detector, row, start = np.nonzero(edges == 1)
    end = np.nonzero(edges == -1)[2]  # the same runs, in the same (row-major) order
    bounds = np.stack([row * width + start, row * width + end], axis=1).ravel()
    detector_of = np.zeros((detectors, detector.size))
    detector_of[detector, np.arange(detector.size)] = 1
    return bounds, detector_of


class ScanPatterns:
    """One scan's summed and maximum patterns over the frames a worker reduced since the last `take`."""

    def __init__(self, reducer: FrameReducer):
        self.reducer = reducer
        strip = (reducer.frame_shape[0], reducer.width)
        # per strip, so each add runs over contiguous memory; joined by `take`
        self.sums = [np.zeros(strip, sum_dtype(reducer.dtype)) for _ in range(reducer.sectors)]
        self.maxima = [np.zeros(strip, reducer.dtype) for _ in range(reducer.sectors)]
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
