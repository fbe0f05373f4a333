"""Live 4D-STEM images of one scan, filled in position by position, in any order.

Per scan position, from its counted events (uint32 linear pixel indices p = row * cols + col, as the
electron_counting plugin emits them) or from its raw frame (noop / photon-counting data), which the worker that
holds it reduces to a small record (reduction.py: the writer gets no pixels):
  - virtual images: the sum of the frame over each detector of a `DetectorGeometry` (bright-field disc,
    annular dark fields), in electrons: `stempy.image.create_stem_images` on the same counted data gives
    exactly 65535 x these (it sums its mask value 0xFFFF per electron: stempy/image.h,
    calculateSTEMValuesSparse), and exactly these on raw frames;
  - centre of mass: com[0] = mean column (x), com[1] = mean row (y) of the events (weighted by pixel
    value for raw frames), NaN for a frame without counts, as `stempy.image.com_sparse(...,
    replace_nans=False)` and `com_dense` order them;
  - DPC = com - centre (pixels) and the iDPC phase integrated from it (`phase_from_com`);
and per scan the summed pattern (`stempy.image.calculate_sum_sparse`) and the maximum pattern (the
per-pixel maximum over frames; for counted data, whose frames hold each pixel at most once as electron
counting emits them, 1 wherever any frame had an event).

Positions not arrived yet (PENDING) or lost (MISSING) are NaN in every image; `status` gives each
position's state with the codes of the scan file's accounting/position_status, plus PENDING.

A new geometry is applied to the whole scan so far without re-acquisition, from the events the accumulator
keeps: 4 bytes per event plus 8 per position. A 1024 x 1024 scan at ~40 events per frame keeps ~160 MiB of
events + 8 MiB. The kept data is bounded by `keep_bytes` (default 256 MiB; while the buffer grows, one copy of
it exists for a moment): past it the accumulator frees what it kept, keeps filling in the images with the
current geometry, and refuses geometry changes for that scan (`RecomputeUnavailable`, naming the bound to
raise). A raw-frame scan holds only the records its workers made for the session's geometry, so it refuses
every new geometry (`RecomputeUnavailable`, saying so): set spec.liveView.geometry for the next session.
"""

from __future__ import annotations

import threading

import numpy as np

from detstream.services.dataplane.accounting import COMPLETE, MISSING, PARTIAL
from detstream.services.results.geometry import DetectorGeometry, find_centre
from detstream.services.results.reduction import FrameReducer, ScanPatterns

__all__ = ["ScanImages", "RecomputeUnavailable", "phase_from_com", "PENDING", "COMPLETE", "PARTIAL",
           "MISSING", "DEFAULT_KEEP_BYTES"]

PENDING = 3  # not arrived yet; COMPLETE, PARTIAL, MISSING are the scan file's position_status codes
DEFAULT_KEEP_BYTES = 256 * 2**20
_RECOMPUTE_BLOCK = 1 << 22  # events per step of a recompute, so its temporaries stay ~100 MB


class RecomputeUnavailable(RuntimeError):
    """The scan's events were not all kept (past `keep_bytes`), so a new geometry cannot be applied to it."""


def phase_from_com(com: np.ndarray, theta: float = 0.0, flip: bool = False, reg: float = 1e-10) -> np.ndarray:
    """iDPC phase (radians, up to a constant) from centre-of-mass shifts com (2, rows, cols) by Fourier
    integration: Phi = F^-1[(ky F(Cx) + kx F(Cy)) / (2 pi i (kx^2 + ky^2) + reg)], the DC term set to zero,
    after rotating the shifts by `theta` (radians, scan vs detector axes; `flip` for a mirrored detector).
    Returns float64 (rows, cols). NaN shifts (missing positions) count as zero shift.
    Source: Lazic, Bosch & Lazar, Ultramicroscopy 160 (2016) 265, as py4DSTEM (Hamish Brown) and
    `stempy.image.phase_from_com` implement it; equal to the latter on the same input."""
    cx, cy = np.nan_to_num(np.asarray(com, np.float64))
    if flip:
        cx, cy = cx * np.cos(theta) + cy * np.sin(theta), cx * np.sin(theta) - cy * np.cos(theta)
    else:
        cx, cy = cx * np.cos(theta) - cy * np.sin(theta), cx * np.sin(theta) + cy * np.cos(theta)
    ky, kx = np.fft.fftfreq(cx.shape[0])[:, None], np.fft.fftfreq(cx.shape[1])[None, :]
    numerator = ky * np.fft.fft2(cx) + kx * np.fft.fft2(cy)
    denominator = 2j * np.pi * (kx ** 2 + ky ** 2) + reg
    numerator[0, 0], denominator[0, 0] = 0, 1
    return np.real(np.fft.ifft2(numerator / denominator))


class _Growable:
    """A 1-D array appended to in place, capacity doubling (so one copy exists while it grows)."""

    def __init__(self, dtype):
        self.data = np.empty(1024, dtype)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        end = self.size + len(values)
        if end > len(self.data):
            grown = np.empty(max(end, 2 * len(self.data)), self.data.dtype)
            grown[:self.size] = self.data[:self.size]
            self.data = grown
        self.data[self.size:end] = values
        self.size = end

    @property
    def nbytes(self) -> int:
        return self.size * self.data.itemsize


class ScanImages:
    """The live images of one scan, thread-safe: one thread adds positions, others read and change geometry.

    scan_shape = (rows, cols) of scan positions, position p = row * cols + col; frame_shape = (rows, cols)
    of detector pixels. Add data with `add_events` (counted), or `add_reduced` and `add_patterns` (raw frames as
    the workers reduce them; `add_frames` reduces raw frames here), mark lost positions with `mark_lost`; read
    with `array(name)` (names in `array_names`); `version` grows with every change.
    Bad input raises ValueError naming the argument; nothing is changed then.
    """

    def __init__(self, scan_shape: tuple[int, int], frame_shape: tuple[int, int], geometry: DetectorGeometry,
                 keep_bytes: int = DEFAULT_KEEP_BYTES):
        self.scan_shape = (int(scan_shape[0]), int(scan_shape[1]))
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.positions = self.scan_shape[0] * self.scan_shape[1]
        self.pixels = self.frame_shape[0] * self.frame_shape[1]
        self.keep_bytes = int(keep_bytes)
        self._lock = threading.Lock()            # state; held briefly
        self._recompute_lock = threading.Lock()  # one geometry change at a time
        self._set_geometry(geometry)
        self.status = np.full(self.positions, PENDING, np.uint8)
        self._com_sum = np.zeros((2, self.positions))
        self._total = np.zeros(self.positions)   # counts (events, or summed pixel values) per position
        self.sum_pattern = np.zeros(self.pixels)
        self.max_pattern = np.zeros(self.pixels)
        self._pixel_x, self._pixel_y = (np.arange(self.pixels) % self.frame_shape[1],
                                        np.arange(self.pixels) // self.frame_shape[1])
        self._kept_pixels = _Growable(np.uint32)
        self._record_position, self._record_length = _Growable(np.uint32), _Growable(np.uint32)
        self.recomputable = True
        self.kind: str | None = None  # "events" or "frames", fixed by the first add
        self.pattern_frames = 0  # raw frames in the sum and max patterns (a pattern of re-sent frames is left out)
        self.version = 0

    # --- geometry --------------------------------------------------------------------------------
    def _set_geometry(self, geometry: DetectorGeometry) -> None:
        self._masks = geometry.masks(self.frame_shape)  # validates the centre against the frame
        self.geometry = geometry
        self._values = np.zeros((len(self._masks), self.positions))

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the current geometry on this scan's frames."""
        return self.geometry.centre_in(self.frame_shape)

    def found_centre(self) -> tuple[float, float] | None:
        """The direct-beam centre (x, y) found in the summed pattern so far (`find_centre`); None before any counts."""
        with self._lock:
            pattern = self.sum_pattern.reshape(self.frame_shape).copy()
        return find_centre(pattern)

    def set_geometry(self, geometry: DetectorGeometry) -> None:
        """Recompute every image for `geometry` from the kept events of the whole scan so far. The work is done
        outside the state lock (adds go on), then the positions added meanwhile are caught up.
        Raises GeometryError (bad geometry for these frames) or RecomputeUnavailable (events not kept)."""
        masks = geometry.masks(self.frame_shape)
        if self.kind == "frames":
            raise RecomputeUnavailable(
                "raw frames are reduced in the workers for the session's geometry (spec.liveView.geometry) and the "
                "writer keeps no pixels: this scan's images cannot be recomputed; set the geometry in the manifest")
        with self._recompute_lock:
            with self._lock:
                self._check_recomputable()
                done = self._record_position.size
                kept = self._kept_arrays()
            values = self._reduce_records(masks, *kept, 0, done)
            with self._lock:
                self._check_recomputable()
                values += self._reduce_records(masks, *self._kept_arrays(), done, self._record_position.size)
                self._masks, self.geometry, self._values = masks, geometry, values
                self.version += 1

    def _check_recomputable(self) -> None:
        if not self.recomputable:
            raise RecomputeUnavailable(
                f"this scan's events exceeded keep_bytes ({self.keep_bytes / 2**20:.0f} MiB) and were not kept, so "
                "its images cannot be recomputed for a new geometry; raise keep_bytes (live results) for the next scan")

    def _kept_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._record_position.data, self._record_length.data, self._kept_pixels.data

    def _reduce_records(self, masks, record_position, record_length, pixels, first, last) -> np.ndarray:
        """Detector sums (detectors, positions) of kept records [first, last), in blocks of ~_RECOMPUTE_BLOCK events."""
        result = np.zeros((len(masks), self.positions))
        lengths = record_length[:last].astype(np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        start = first
        while start < last:
            stop = int(np.searchsorted(offsets, offsets[start] + _RECOMPUTE_BLOCK, side="right")) - 1
            stop = min(max(stop, start + 1), last)
            span = slice(offsets[start], offsets[stop])
            local = np.repeat(np.arange(stop - start), lengths[start:stop])
            for d, mask in enumerate(masks):
                sums = np.bincount(local, mask[pixels[span]], minlength=stop - start)
                np.add.at(result[d], record_position[start:stop], sums)
            start = stop
        return result

    # --- adding data -----------------------------------------------------------------------------
    def add_events(self, positions, counts, events, status=COMPLETE) -> None:
        """Counted frames: positions (n,) linear scan positions, counts (n,) events of each, events (sum(counts),)
        uint32 linear pixel indices concatenated in the same order; status COMPLETE or PARTIAL (scalar or (n,))."""
        positions, status = self._check_positions(positions, status)
        counts = np.asarray(counts, np.int64).ravel()
        events = np.asarray(events).ravel()
        if counts.shape != positions.shape or (counts < 0).any() or counts.sum() != events.size:
            raise ValueError(f"counts: must be {positions.size} non-negative numbers summing to the "
                             f"{events.size} events given")
        if events.size and (events.min() < 0 or events.max() >= self.pixels):
            raise ValueError(f"events: pixel indices must be in [0, {self.pixels}) for {self.frame_shape} frames")
        events = events.astype(np.uint32, copy=False)
        unique, slot = np.unique(positions, return_inverse=True)
        local = np.repeat(slot, counts)  # per event, its position's index in `unique`
        with self._lock:
            self._check_kind("events")
            for d, mask in enumerate(self._masks):
                self._values[d, unique] += np.bincount(local, mask[events], minlength=unique.size)
            self._add_common(positions, status, unique, local, events)
            self._keep(positions, counts, events)

    def add_reduced(self, positions, records, status=COMPLETE) -> None:
        """Raw frames as the workers reduce them (`ScanPatterns.add`): positions (n,), records (n, detectors + 3)
        float64 (the geometry's detector sums, total, x moment, y moment); status COMPLETE or PARTIAL (scalar or
        (n,)). The records must be of this scan's geometry (the session's: it never changes for raw frames)."""
        positions, status = self._check_positions(positions, status)
        records = np.asarray(records, np.float64)
        width = len(self._masks) + 3
        if records.shape != (positions.size, width):
            raise ValueError(f"records: must be ({positions.size}, {width}) float64 for this geometry; "
                             f"got {records.shape}")
        with self._lock:  # a turn's few records each time: np.add.at (exact for a position twice) is the cheapest
            self._check_kind("frames")
            if self.recomputable:
                self.forget_events()  # nothing to keep: a raw-frame scan is never recomputed
            np.add.at(self._values.T, positions, records[:, :-3])  # (transposed views: rows by position)
            np.add.at(self._total, positions, records[:, -3])
            np.add.at(self._com_sum.T, positions, records[:, -2:])
            self.status[positions] = status
            self.version += 1

    def add_patterns(self, sum_pattern, max_pattern, frames: int) -> None:
        """Merge raw frames' summed and maximum patterns, each (frame rows, frame cols), over `frames` frames."""
        sum_pattern, max_pattern = np.asarray(sum_pattern), np.asarray(max_pattern)
        if sum_pattern.shape != self.frame_shape or max_pattern.shape != self.frame_shape:
            raise ValueError(f"patterns: must be {self.frame_shape}; got {sum_pattern.shape} and {max_pattern.shape}")
        with self._lock:
            self._check_kind("frames")
            self.sum_pattern += sum_pattern.ravel()
            np.maximum(self.max_pattern, max_pattern.ravel(), out=self.max_pattern)
            self.pattern_frames += int(frames)
            self.version += 1

    def add_frames(self, positions, frames, status=COMPLETE) -> None:
        """Raw frames reduced here, as a worker reduces them (`add_reduced` + `add_patterns`): positions (n,),
        frames (n, rows, cols) of any real dtype (pixel values, e.g. photon counts); status as `add_reduced`."""
        frames = np.asarray(frames)
        if frames.shape != (np.size(positions), *self.frame_shape) or not np.isrealobj(frames):
            raise ValueError(f"frames: must be real numbers of shape ({np.size(positions)}, {self.frame_shape[0]}, "
                             f"{self.frame_shape[1]}); got {frames.dtype} {frames.shape}")
        patterns = ScanPatterns(FrameReducer(self.frame_shape, self.geometry, frames.dtype))
        self.add_reduced(positions, [patterns.add([frame], 0, 0.0) for frame in frames], status)
        self.add_patterns(patterns.sums[0], patterns.maxima[0], len(frames))

    def mark_lost(self, positions) -> None:
        """Positions whose frame will never come (lost): MISSING, NaN in the images."""
        positions, _ = self._check_positions(positions, COMPLETE)
        with self._lock:
            self.status[positions] = MISSING
            self.version += 1

    def _check_positions(self, positions, status):
        positions = np.asarray(positions).ravel()
        if positions.size and (not np.issubdtype(positions.dtype, np.integer)
                               or positions.min() < 0 or positions.max() >= self.positions):
            raise ValueError(f"positions: must be integers in [0, {self.positions}) for a {self.scan_shape} scan")
        status = np.broadcast_to(np.asarray(status, np.uint8), positions.shape)
        if not ((status == COMPLETE) | (status == PARTIAL)).all():  # (np.isin: 15 us on a few values)
            raise ValueError(f"status: must be COMPLETE ({COMPLETE}) or PARTIAL ({PARTIAL})")
        return positions.astype(np.int64), status

    def _check_kind(self, kind: str) -> None:
        if self.kind not in (None, kind):
            raise ValueError(f"{kind}: this scan has {self.kind}; add the same kind for a whole scan")
        self.kind = kind

    def _add_common(self, positions, status, unique, local, pixels) -> None:
        """COM sums, totals, summed pattern and status of counted events `pixels` at scan positions unique[local];
        caller holds the lock. Sums per unique position, so fancy += is exact."""
        n = unique.size
        ones = np.ones(pixels.size)
        self._total[unique] += np.bincount(local, ones, minlength=n)
        self._com_sum[0, unique] += np.bincount(local, ones * self._pixel_x[pixels], minlength=n)
        self._com_sum[1, unique] += np.bincount(local, ones * self._pixel_y[pixels], minlength=n)
        np.add.at(self.sum_pattern, pixels, ones)  # not a bincount over every pixel: per batch of a few frames
        self.status[positions] = status
        self.version += 1

    def _keep(self, positions, lengths, pixels) -> None:
        """Keep what a recompute needs, within keep_bytes; past it free all and stop; caller holds the lock."""
        if not self.recomputable:
            return
        if self.kept_bytes + pixels.size * 4 + positions.size * 8 > self.keep_bytes:
            self.forget_events()
            return
        self._record_position.extend(positions)
        self._record_length.extend(lengths)
        self._kept_pixels.extend(pixels)

    def forget_events(self) -> None:
        """Free the kept events: the images go on filling in with the current geometry, but a new geometry is
        refused from now on (RecomputeUnavailable). Past keep_bytes, and for scans a long session no longer
        needs to recompute (see LiveStore.close_scan). The caller holds the lock, or the scan takes no more data."""
        self.recomputable = False
        self._kept_pixels, self._record_position, self._record_length = (_Growable(np.uint32) for _ in range(3))

    @property
    def kept_bytes(self) -> int:
        """Bytes of events and per-position records kept for recomputation."""
        return self._kept_pixels.nbytes + self._record_position.nbytes + self._record_length.nbytes

    # --- reading ---------------------------------------------------------------------------------
    @property
    def array_names(self) -> list[str]:
        """Names `array` takes: the geometry's images, com_x, com_y, dpc_x, dpc_y, idpc, sum, max, status."""
        return [*self.geometry.names, "com_x", "com_y", "dpc_x", "dpc_y", "idpc", "sum", "max", "status"]

    def array(self, name: str) -> np.ndarray:
        """A copy of one live array: virtual images, COM, DPC (pixels) and iDPC (radians) as float64 (scan rows,
        scan cols), NaN where not arrived or lost (COM, DPC also where a frame had no counts); sum and max as
        float64 (frame rows, frame cols); status uint8 (scan rows, scan cols). KeyError for an unknown name."""
        with self._lock:
            names = self.geometry.names
            arrived = np.isin(self.status, (COMPLETE, PARTIAL))
            if name in names:
                return np.where(arrived, self._values[names.index(name)], np.nan).reshape(self.scan_shape)
            if name == "sum":
                return self.sum_pattern.reshape(self.frame_shape).copy()
            if name == "max":  # counting emits a pixel at most once per frame: the maximum is 1 wherever hit
                pattern = (self.sum_pattern > 0).astype(np.float64) if self.kind == "events" else self.max_pattern
                return pattern.reshape(self.frame_shape).copy()
            if name == "status":
                return self.status.reshape(self.scan_shape).copy()
            if name not in ("com_x", "com_y", "dpc_x", "dpc_y", "idpc"):
                raise KeyError(f"{name!r}: not a live array; known: {', '.join(self.array_names)}")
            with np.errstate(invalid="ignore", divide="ignore"):
                com = self._com_sum / self._total
            com[:, ~arrived] = np.nan
            centre = self.centre
        com = com.reshape(2, *self.scan_shape)
        if name.startswith("com_"):
            return com["xy".index(name[-1])]
        dpc = com - np.asarray(centre)[:, None, None]
        if name.startswith("dpc_"):
            return dpc["xy".index(name[-1])]
        return np.where(np.isnan(dpc[0]), np.nan, phase_from_com(dpc))

    def describe(self) -> dict:
        """What the page and the client read of the scan (LiveStore.summary): view "stem", scan_shape,
        frame_shape, geometry, centre, arrays (names) and progress."""
        return {"view": "stem", "scan_shape": list(self.scan_shape), "frame_shape": list(self.frame_shape),
                "geometry": self.geometry.to_dict(), "centre": list(self.centre), "arrays": self.array_names,
                "progress": self.progress()}

    def progress(self) -> dict:
        """Counts of positions by state and the kept-event memory, for the page and the client."""
        with self._lock:
            counts = np.bincount(self.status, minlength=4)
            return {"positions": self.positions, "complete": int(counts[COMPLETE]), "partial": int(counts[PARTIAL]),
                    "lost": int(counts[MISSING]), "pending": int(counts[PENDING]), "version": self.version,
                    "kept_bytes": self.kept_bytes, "keep_bytes": self.keep_bytes, "recomputable": self.recomputable,
                    "kind": self.kind, "pattern_frames": self.pattern_frames}
