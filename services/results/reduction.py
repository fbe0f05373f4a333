"""Raw frames reduced where they are: in the worker that holds the frame, not in the writer.

A raw frame (the `frames` result kind: noop, photon-counting data) is 663 KB at 576x576 uint16; what the live
images need of it is a few numbers per scan position and, per scan, two patterns. So the worker reduces each
frame it holds (`ScanPatterns.add`) and sends the writer only:
  - per frame, in its RESULT: the record, float64 (detectors + 3,): the sum of the frame over each virtual
    detector of the geometry (`DetectorGeometry.names` order), then the frame's total, its x moment
    sum(value * column) and its y moment sum(value * row): exact for integer pixels while the sums stay below
    2**53 (16-bit pixels on a 576x576 frame: below 2**45).
  - per scan, every PATTERN_S or when its frames pause (`ScanPatterns`): a PATTERN message with the summed
    pattern (`sum_dtype`: uint32 for 8- and 16-bit pixels, sent at least every 65536 frames so it cannot
    overflow; int64 for 32-bit ones; float64 for float pixels) and the maximum pattern (the pixel type) of the
    frames it lists (their frame keys, uint64), all of whose results went before it on the same socket.
The writer places the records (`ScanImages.add_reduced`) and merges a PATTERN (`ScanImages.add_patterns`) only
when every frame it lists is one whose result the writer took from that worker: a frame processed twice (a
re-send after a worker was declared dead) is then never counted twice in the patterns; such a pattern is
dropped and its frames are left out, which the scan's `pattern_frames` says (feed.py).

Per frame and sector strip the work is one pass over its pixels (`_reduce_strip`, compiled by numba, as LiberTEM
reduces raw 4D-STEM frames): it adds each pixel to the summed pattern, keeps the maximum, sums the strip's total
and moments in 64-bit integers (float64 for float pixels), and after each row sums the detectors' runs of pixels
along it (precomputed from the geometry) while the row is in cache. The received buffers are read where they lie
(no joined frame, no copy). ~0.1 ms per 576x576 uint16 frame of 4 strips on one core here: 2x one numpy pass
over the frame, and 0.28 of the numpy passes it replaces (a float64 copy, a matrix product, np.add.reduceat, the
pattern's add and maximum): `python -m benchmarks.reduction --against 070778d`.

The geometry is the session's (spec.liveView.geometry): the writer cannot apply another one to the records,
so a raw-frame scan refuses a new geometry (`ScanImages.set_geometry` raises RecomputeUnavailable, shown on
the page).
"""

from __future__ import annotations

import functools
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


def _reduce_strip(strip, x0, runs, sums, maxima, record, zero):
    """Adds one strip (rows, width) whose first column is the frame's column `x0` to `sums` and `maxima` (rows,
    width) and to `record` (detectors + 3,) of `zero`'s type: each detector's sum over its `runs` (`_runs`), then
    the total, x moment sum(value * column) and y moment sum(value * row). Integer pixels are summed in int64
    (exact), float ones in float64. Loops run over rows and slices of them, whose indices numba knows are not
    negative: LLVM then vectorizes them (an index from a run's start was 2x slower)."""
    total = x_moment = y_moment = zero
    run = 0
    for y in range(strip.shape[0]):
        row = strip[y]
        row_sum = row_x = zero
        for x in range(row.shape[0]):
            value = row[x]
            sums[y, x] += value
            maxima[y, x] = max(maxima[y, x], value)
            row_sum += value
            row_x += value * x
        total += row_sum
        x_moment += row_x + row_sum * x0
        y_moment += row_sum * y
        while run < runs.shape[0] and runs[run, 0] == y:  # this row's runs, while the row is in cache
            pixels = row[runs[run, 1]:runs[run, 2]]
            run_sum = zero
            for x in range(pixels.shape[0]):
                run_sum += pixels[x]
            record[runs[run, 3]] += run_sum
            run += 1
    record[-3] += total
    record[-2] += x_moment
    record[-1] += y_moment


@functools.cache
def _compiled():
    """`_reduce_strip` compiled by numba, imported here: numba adds ~60 MB to a process and ~0.2 s to its start,
    which only the processes that reduce raw frames pay."""
    import numba
    return numba.njit(nogil=True)(_reduce_strip)


def _runs(masks: np.ndarray) -> np.ndarray:
    """The detectors `masks` (detectors, rows, width) of one strip as runs of pixels along its rows: (runs, 4)
    int64 of (row, start, end, detector), in row order (`_reduce_strip` sums a row's runs right after the row)."""
    detectors, rows, width = masks.shape
    padded = np.zeros((detectors, rows, width + 2), np.int8)
    padded[:, :, 1:-1] = masks
    edges = np.diff(padded, axis=2)  # +1 where a run starts, -1 one past where it ends
    detector, row, start = np.nonzero(edges == 1)
    end = np.nonzero(edges == -1)[2]  # the same runs, in the same (detector, row) order
    runs = np.stack([row, start, end, detector], axis=1).astype(np.int64)
    return runs[np.argsort(row, kind="stable")]


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
        self.zero = np.int64(0) if np.issubdtype(self.dtype, np.integer) else np.float64(0)
        # compiled now, not on a scan's first frame, for what a worker reduces: views of received zmq.Frames
        # (writable, C order; numba compiles read-only arrays and other layouts apart, on their first use)
        self.kernel = _compiled()
        empty = np.zeros((0, width), self.dtype)
        self.kernel(empty, 0, self.runs[0], np.zeros((0, width), sum_dtype(self.dtype)),
                      np.zeros((0, width), self.dtype), np.zeros(len(geometry.radii) + 3, self.zero.dtype), self.zero)

    def reduce(self, strips: Sequence[np.ndarray], sums: Sequence[np.ndarray],
               maxima: Sequence[np.ndarray]) -> np.ndarray:
        """Adds one frame's strips to the patterns' strips `sums` and `maxima`; returns its record, float64
        (detectors + 3,): the detector sums, total, x moment, y moment (see the module)."""
        record = np.zeros(len(self.geometry.radii) + 3, self.zero.dtype)
        for s, (strip, runs, total, maximum) in enumerate(zip(strips, self.runs, sums, maxima)):
            self.kernel(strip, s * self.width, runs, total, maximum, record, self.zero)
        return record.astype(np.float64)


class ScanPatterns:
    """One scan's summed and maximum patterns over the frames a worker reduced since the last `take`."""

    def __init__(self, reducer: FrameReducer):
        self.reducer = reducer
        strip = (reducer.frame_shape[0], reducer.width)
        # per strip, so each is added to where the strip lies; joined by `take`
        self.sums = [np.zeros(strip, sum_dtype(reducer.dtype)) for _ in range(reducer.sectors)]
        self.maxima = [np.zeros(strip, reducer.dtype) for _ in range(reducer.sectors)]
        self.keys: list[int] = []
        self.since = 0.0  # monotonic time of the first frame since the last take

    def add(self, strips: Sequence[np.ndarray], key: int, now: float) -> np.ndarray:
        """Reduce one frame (as the reducer's strips), whose frame key is `key`: adds it to the patterns and
        returns its record (`FrameReducer.reduce`)."""
        if not self.keys:
            self.since = now
        self.keys.append(key)
        return self.reducer.reduce(strips, self.sums, self.maxima)

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
