"""The frames themselves, one scan per HDF5 file, compressed with bitshuffle + LZ4 (hdf5plugin).

For users who must keep the raw data (the `frames` result kind: the noop plugin passes each frame on as it
arrived), with spec.output.keepFrames. Layout:
  frames            (scan rows, scan cols, detector rows, detector cols) of detector.dtype, one chunk per
                    frame, filter bitshuffle + LZ4 (HDF5 filter 32008, as DECTRIS' own files and the
                    stream v2 bslz4 payloads); 0 where no frame was written
  metadata/, accounting/   as every detstream scan file (scan_file.py): position_status says which
                    positions hold a frame (COMPLETE), a zero-filled one (PARTIAL) or none (MISSING)

Read it with h5py once hdf5plugin is imported (`import hdf5plugin, h5py; h5py.File(path)["frames"][r, c]`),
or with any HDF5 reader that has the bitshuffle filter (the field's viewers: ALBULA, DAWN, silx view ...).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from detstream.services.dataplane.wire import Geometry
from detstream.services.sinks.scan_file import ScanFile


class RawFramesFile(ScanFile):
    """One scan's frames (see the module's docstring). A result is the frame's `sectors` column strips, each
    (rows, cols / sectors) of `dtype`, as the worker assembled them."""

    result = "frames"

    def __init__(self, path: Path, scan_shape: tuple[int, int], frame_shape: tuple[int, int],
                 metadata: dict | None = None, dtype: str = "uint16", sectors: int = 1):
        self.geometry = Geometry(frame_shape[0], frame_shape[1], sectors, np.dtype(dtype).str,
                                 scan_shape[0] * scan_shape[1])
        super().__init__(path, scan_shape, frame_shape, metadata)

    @classmethod
    def open(cls, path, spec, scan_shape, metadata):
        d = spec.detector
        return cls(path, scan_shape, (d.rows, d.cols), metadata, dtype=d.dtype, sectors=d.sectors)

    def layout(self, file: h5py.File) -> None:
        rows, cols = self.frame_shape
        self._frames = file.create_dataset("frames", (*self.scan_shape, rows, cols), dtype=self.geometry.dtype,
                                           chunks=(1, 1, rows, cols), **hdf5plugin.Bitshuffle(cname="lz4"))

    @classmethod
    def refusal(cls, parts, spec):
        """As many parts as the detector has sectors, each a sector's bytes ("size")."""
        return None if Geometry.of(spec).is_frame(parts) else "size"

    def write_result(self, position, parts):
        self._frames[divmod(position, self.scan_shape[1])] = self.geometry.frame(parts)
