"""Electron events of one scan in the HDF5 layout stempy reads (stempy.io.load_electron_counts / SparseArray.from_hdf5).

Layout, as stempy's SparseArray.write_to_hdf5 (format version 3, one frame per scan position):
  attrs: version = 3
  electron_events/frames          vlen uint32, one entry per scan position p = scan_row * scan_cols + scan_col;
                                  attrs Nx = frame rows, Ny = frame cols (stempy reads frame_shape = (Nx, Ny))
  electron_events/scan_positions  arange(positions); attrs Nx = scan cols, Ny = scan rows (read back reversed)
  metadata/                       the metadata dict: nested dicts become groups, other values attributes
  stem/                           the scan's live images (`add_images`): stempy's save_stem_images layout and
                                  detstream's COM, iDPC, patterns and position_status beside it (results/stem_file.py)
and, written by `record_arrivals` (detstream's own; stempy ignores it), what arrived at each scan position:
  accounting/position_status      uint8 (scan rows, scan cols): COMPLETE, PARTIAL (some sectors zero-filled) or
                                  MISSING (no frame written: lost); mask with `position_status == COMPLETE`
  accounting/sectors_arrived      uint64 (scan rows, scan cols): bit i set when sector i of the frame arrived
                                  (0 where MISSING); attrs: the scan's totals (expected, written, partial, lost ...)

This is the result sink of the `events` result kind (uint32 linear pixel indices, one payload part per frame).
The file is written as `path + '.partial'` and renamed to `path` on close, so a file at `path` is always complete.
Events are buffered per block of positions and a block is written as soon as all its positions have arrived, so
memory stays bounded when frames arrive roughly in scan order; whatever is incomplete is written at close.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from detstream.services.dataplane.accounting import COMPLETE, MISSING, PARTIAL
from detstream.services.results.images import ScanImages
from detstream.services.results.stem_file import write_stem_images
from detstream.services.sinks import ResultSink

__all__ = ["ElectronEventsFile", "COMPLETE", "PARTIAL", "MISSING"]


_EMPTY = np.empty(0, np.uint32)
_UNCLOSABLE: list = []  # HDF5 handles whose file could not be closed (see ElectronEventsFile.abort)


def _save_dict(d: dict, group: h5py.Group) -> None:
    for key, value in d.items():
        if isinstance(value, dict):
            _save_dict(value, group.require_group(key))
        else:
            group.attrs[key] = value


class ElectronEventsFile(ResultSink):
    """One scan's electron events, written as stempy writes them (see the module's docstring)."""

    result = "events"
    BLOCK = 4096  # positions per HDF5 write

    def __init__(self, path: Path, scan_shape: tuple[int, int], frame_shape: tuple[int, int],
                 metadata: dict | None = None):
        super().__init__(path, scan_shape, frame_shape, metadata)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.scan_shape = (int(scan_shape[0]), int(scan_shape[1]))
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.positions = self.scan_shape[0] * self.scan_shape[1]
        self._events = np.empty(self.positions, dtype=object)
        self._events[:] = [_EMPTY] * self.positions
        self._written = np.zeros(self.positions, bool)
        self._missing = np.diff(np.append(np.arange(0, self.positions, self.BLOCK), self.positions))  # per block
        self._file = h5py.File(self.partial, "w")
        try:
            self._file.attrs["version"] = 3
            group = self._file.create_group("electron_events")
            scan_positions = group.create_dataset("scan_positions", data=np.arange(self.positions))
            scan_positions.attrs["Nx"] = self.scan_shape[1]
            scan_positions.attrs["Ny"] = self.scan_shape[0]
            self._frames = group.create_dataset("frames", (self.positions,), dtype=h5py.vlen_dtype(np.uint32))
            self._frames.attrs["Nx"] = self.frame_shape[0]
            self._frames.attrs["Ny"] = self.frame_shape[1]
            _save_dict(metadata or {}, self._file.create_group("metadata"))
        except BaseException:
            self.abort()
            raise

    @classmethod
    def refusal(cls, parts, spec):
        """One part of whole uint32s ("size"), each a pixel of the frame ("range")."""
        if len(parts) != 1 or memoryview(parts[0]).nbytes % 4:
            return "size"
        pixels = spec.detector.rows * spec.detector.cols
        if memoryview(parts[0]).nbytes and int(np.frombuffer(parts[0], np.uint32).max()) >= pixels:
            return "range"
        return None

    def write_result(self, position, parts):
        self.write(position, np.frombuffer(parts[0], dtype=np.uint32))

    def write(self, position: int, events: np.ndarray) -> None:
        """Events (uint32 linear pixel indices) of the frame at linear scan position `position`, at most once each."""
        if self._file is None:
            raise ValueError(f"{self.partial} is closed")
        if not 0 <= position < self.positions:
            raise IndexError(f"position {position} outside the scan of {self.positions} positions")
        if self._written[position]:
            raise ValueError(f"position {position} written twice")
        self._written[position] = True
        self._events[position] = np.array(events, dtype=np.uint32).ravel()
        block = position // self.BLOCK
        self._missing[block] -= 1
        if self._missing[block] == 0:
            self._flush(block)

    def _flush(self, block: int) -> None:
        span = np.s_[block * self.BLOCK : min((block + 1) * self.BLOCK, self.positions)]
        # write_direct hands the object array to HDF5 as is: Dataset.__setitem__ would turn equal-length
        # event arrays into a 2-D array and fail
        self._frames.write_direct(self._events, span, span)
        self._events[span] = [_EMPTY] * (span.stop - span.start)

    def add_metadata(self, metadata: dict) -> None:
        """More metadata (nested dicts become groups of `metadata/`, other values attributes), before close."""
        _save_dict(metadata, self._file.require_group("metadata"))

    def record_arrivals(self, written: np.ndarray, sectors_arrived: np.ndarray, sectors: int, totals: dict) -> None:
        """Record per position what arrived: `written` (bool) and `sectors_arrived` (uint64 bit masks), both of
        the scan's positions in linear order; `sectors` per frame; `totals` (name -> int) as attributes."""
        shape = self.scan_shape
        complete = np.uint64((1 << sectors) - 1)
        status = np.where(~written, MISSING, np.where(sectors_arrived == complete, COMPLETE, PARTIAL)).astype(np.uint8)
        group = self._file.require_group("accounting")
        dataset = group.create_dataset("position_status", data=status.reshape(shape))
        dataset.attrs.update({"COMPLETE": COMPLETE, "PARTIAL": PARTIAL, "MISSING": MISSING})
        arrived = np.where(written, sectors_arrived, 0).astype(np.uint64)
        group.create_dataset("sectors_arrived", data=arrived.reshape(shape))
        group.attrs.update({"sectors": sectors, **totals})

    def add_images(self, images: ScanImages) -> None:
        """The scan's live images under `stem/`, as stempy's save_stem_images lays them out (see stem_file)."""
        write_stem_images(self._file, images)

    def close(self) -> Path:
        """Write what is left, close, and rename the temporary file to `path`; returns `path`."""
        if self._file is None:
            raise ValueError(f"{self.partial} is closed")
        try:
            for block in np.flatnonzero(self._missing):
                self._flush(int(block))
            self._file.close()
        except BaseException:
            self.abort()
            raise
        self._file = None
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file, also when closing fails: HDF5 cannot flush to a full disk, and
        then the handles left open fail again whenever they are freed (printed as "Exception ignored", burying
        the stage's own last words; freeing them at once can even crash HDF5). So they are kept, unfreed, for
        the rest of the process (which fails: this happens once), and the file is deleted below."""
        if self._file is not None:
            try:
                self._file.close()
            except (OSError, RuntimeError):
                _UNCLOSABLE.append((self._file, self._frames))
            self._file = None
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> ElectronEventsFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
