"""What every HDF5 scan file of detstream's sinks shares: written as `path + '.partial'` and renamed to
`path` on close (so a file at `path` is always complete), the metadata, and what arrived where.

  metadata/                       the metadata dict: nested dicts become groups, other values attributes
  accounting/position_status      uint8 (scan rows, scan cols): COMPLETE, PARTIAL (some sectors zero-filled) or
                                  MISSING (no frame written: lost); mask with `position_status == COMPLETE`
  accounting/sectors_arrived      uint64 (scan rows, scan cols): bit i set when sector i of the frame arrived
                                  (0 where MISSING); attrs: the scan's totals (expected, written, partial, lost ...)
  stem/                           the scan's live images, when spec.liveView is on (`add_images`)

A sink subclasses ScanFile, lays out its own datasets in `layout` and writes what is left in `flush`.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from detstream.services.dataplane.accounting import CODES, COMPLETE, MISSING, PARTIAL
from detstream.services.results.images import ScanImages
from detstream.services.results.stem_file import write_stem_images
from detstream.services.sinks import ResultSink

_UNCLOSABLE: list = []  # HDF5 files that could not be closed (see ScanFile.abort)


def save_dict(d: dict, group: h5py.Group) -> None:
    """Nested dicts as groups of `group`, other values as their attributes."""
    for key, value in d.items():
        if isinstance(value, dict):
            save_dict(value, group.require_group(key))
        else:
            group.attrs[key] = value


class ScanFile(ResultSink):
    """One scan's HDF5 file, open at `path + '.partial'` (`self.file`) until close. `scan_shape` (rows, cols)
    of positions, `frame_shape` (rows, cols) of pixels; FileExistsError when `path` exists."""

    def __init__(self, path: Path, scan_shape: tuple[int, int], frame_shape: tuple[int, int],
                 metadata: dict | None = None):
        super().__init__(path, scan_shape, frame_shape, metadata)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.scan_shape = (int(scan_shape[0]), int(scan_shape[1]))
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.positions = self.scan_shape[0] * self.scan_shape[1]
        self._file: h5py.File | None = h5py.File(self.partial, "w")
        try:
            self.layout(self._file)
            save_dict(metadata or {}, self._file.create_group("metadata"))
        except BaseException:
            self.abort()
            raise

    def layout(self, file: h5py.File) -> None:
        """Create the sink's own datasets in the new file."""
        raise NotImplementedError

    def flush(self) -> None:
        """Write what the sink still holds, before the file closes."""

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            raise ValueError(f"{self.partial} is closed")
        return self._file

    def add_metadata(self, metadata: dict) -> None:
        """More metadata (nested dicts become groups of `metadata/`, other values attributes), before close."""
        save_dict(metadata, self.file.require_group("metadata"))

    def record_arrivals(self, written: np.ndarray, sectors_arrived: np.ndarray, sectors: int, totals: dict) -> None:
        """Record per position what arrived: `written` (bool) and `sectors_arrived` (uint64 bit masks), both of
        the scan's positions in linear order; `sectors` per frame; `totals` (name -> int) as attributes."""
        shape = self.scan_shape
        complete = np.uint64((1 << sectors) - 1)
        status = np.where(~written, MISSING, np.where(sectors_arrived == complete, COMPLETE, PARTIAL)).astype(np.uint8)
        group = self.file.require_group("accounting")
        dataset = group.create_dataset("position_status", data=status.reshape(shape))
        dataset.attrs.update(CODES)
        arrived = np.where(written, sectors_arrived, 0).astype(np.uint64)
        group.create_dataset("sectors_arrived", data=arrived.reshape(shape))
        group.attrs.update({"sectors": sectors, **totals})

    def close(self) -> Path:
        """Write what is left, close, and rename the temporary file to `path`; returns `path`."""
        file = self.file
        try:
            self.flush()
            file.close()
        except BaseException:
            self.abort()
            raise
        self._file = None
        os.replace(self.partial, self.path)
        return self.path

    def add_images(self, images: ScanImages) -> None:
        """The scan's live images under `stem/`, as stempy's save_stem_images lays them out (see stem_file)."""
        write_stem_images(self.file, images)

    def abort(self) -> None:
        """Close and delete the temporary file, also when closing fails: HDF5 cannot flush to a full disk, and
        then the handles left open fail again whenever they are freed (printed as "Exception ignored", burying
        the stage's own last words; freeing them at once can even crash HDF5). So they are kept, unfreed, for
        the rest of the process (which fails: this happens once), and the file is deleted below."""
        if self._file is not None:
            try:
                self._file.close()
            except (OSError, RuntimeError):
                _UNCLOSABLE.append((self._file, self))  # the file, and the datasets the sink holds
            self._file = None
        self.partial.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
