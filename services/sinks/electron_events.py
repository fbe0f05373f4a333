"""Electron events of one scan in the HDF5 layout stempy reads (stempy.io.load_electron_counts / SparseArray.from_hdf5).

Layout, as stempy's SparseArray.write_to_hdf5 (format version 3, one frame per scan position):
  attrs: version = 3
  electron_events/frames          vlen uint32, one entry per scan position p = scan_row * scan_cols + scan_col;
                                  attrs Nx = frame rows, Ny = frame cols (stempy reads frame_shape = (Nx, Ny))
  electron_events/scan_positions  arange(positions); attrs Nx = scan cols, Ny = scan rows (read back reversed)
  metadata/                       the metadata dict: nested dicts become groups, other values attributes
  stem/                           the scan's live images (`add_images`): stempy's save_stem_images layout and
                                  detstream's COM, iDPC, patterns and position_status beside it (results/stem_file.py)
and detstream's own `accounting/` (stempy ignores it): what arrived at each scan position (see scan_file.py).

This is the result sink of the `events` result kind (uint32 linear pixel indices, one payload part per frame).
The file is written as `path + '.partial'` and renamed to `path` on close, so a file at `path` is always complete.
Events are buffered per block of positions and a block is written as soon as all its positions have arrived, so
memory stays bounded when frames arrive roughly in scan order; whatever is incomplete is written at close.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from detstream.services.dataplane.accounting import COMPLETE, MISSING, PARTIAL
from detstream.services.sinks.scan_file import ScanFile

__all__ = ["ElectronEventsFile", "COMPLETE", "PARTIAL", "MISSING"]


_EMPTY = np.empty(0, np.uint32)


class ElectronEventsFile(ScanFile):
    """One scan's electron events, written as stempy writes them (see the module's docstring)."""

    result = "events"
    BLOCK = 4096  # positions per HDF5 write

    def __init__(self, path: Path, scan_shape: tuple[int, int], frame_shape: tuple[int, int],
                 metadata: dict | None = None):
        positions = int(scan_shape[0]) * int(scan_shape[1])
        self._events = np.empty(positions, dtype=object)
        self._events[:] = [_EMPTY] * positions
        self._written = np.zeros(positions, bool)
        self._missing = np.diff(np.append(np.arange(0, positions, self.BLOCK), positions))  # per block
        super().__init__(path, scan_shape, frame_shape, metadata)

    def layout(self, file: h5py.File) -> None:
        file.attrs["version"] = 3
        group = file.create_group("electron_events")
        scan_positions = group.create_dataset("scan_positions", data=np.arange(self.positions))
        scan_positions.attrs["Nx"] = self.scan_shape[1]
        scan_positions.attrs["Ny"] = self.scan_shape[0]
        self._frames = group.create_dataset("frames", (self.positions,), dtype=h5py.vlen_dtype(np.uint32))
        self._frames.attrs["Nx"] = self.frame_shape[0]
        self._frames.attrs["Ny"] = self.frame_shape[1]

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

    def flush(self) -> None:
        for block in np.flatnonzero(self._missing):
            self._flush(int(block))
