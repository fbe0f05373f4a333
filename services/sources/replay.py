"""The `replay` source kind: frames recorded earlier, from a .npy file or an HDF5 dataset.

The file holds frames of shape (frames, detector.rows, detector.cols) and detector.dtype; frame i of
scan s is frame (s mod scans in the file) * scan positions + i, so a file of one scan replays it for
every scan of the session. A .npy file is memory-mapped and an HDF5 dataset read per sector, so a
file larger than memory replays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detstream.services.model.schema import FieldError
from detstream.services.sources import GridSource, SourceError


class Replay(GridSource):
    """Frames from spec.source.path (and spec.source.dataset for HDF5); SourceError naming the field
    when the file is missing, unreadable, or its frames do not fit spec.detector and spec.scan."""

    summary = "frames from a .npy file or an HDF5 dataset"

    @classmethod
    def check(cls, spec):
        return [] if spec.source.path else [FieldError("spec.source.path", "is required when source.kind is replay")]

    def __init__(self, spec, replica):
        super().__init__(spec, replica)
        path = spec.source.path
        self.frames = open_frames(Path(path), spec.source.dataset)
        d = spec.detector
        want = (d.rows, d.cols)
        if self.frames.ndim != 3 or tuple(self.frames.shape[1:]) != want:
            raise SourceError(f"replay file {path}: frames of shape {tuple(self.frames.shape)}; the session's "
                              f"detector needs (frames, {d.rows}, {d.cols}) (spec.detector.rows/cols)")
        if self.frames.dtype != np.dtype(d.dtype):
            raise SourceError(f"replay file {path}: dtype {self.frames.dtype}, the session's detector is "
                              f"{d.dtype} (spec.detector.dtype)")
        self.per_scan = spec.scan.frames
        if self.frames.shape[0] < self.per_scan:
            raise SourceError(f"replay file {path}: {self.frames.shape[0]} frames, a {spec.scan.rows}x"
                              f"{spec.scan.cols} scan needs {self.per_scan}")
        self.width = d.cols // d.sectors
        self.scans_in_file = self.frames.shape[0] // self.per_scan

    def sector(self, scan, frame, sector):
        index = (scan % self.scans_in_file) * self.per_scan + frame
        return np.ascontiguousarray(self.frames[index, :, sector * self.width:(sector + 1) * self.width])


def open_frames(path: Path, dataset: str):
    """The frames array of a .npy file (memory-mapped) or of `dataset` in an HDF5 file; SourceError if neither."""
    if not path.is_file():
        raise SourceError(f"replay file {path} does not exist (spec.source.path)")
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r")
        except ValueError as exc:
            raise SourceError(f"replay file {path} is not a readable .npy file: {exc}") from None
    import h5py
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise SourceError(f"replay file {path} is neither .npy nor readable HDF5: {exc}") from None
    if not dataset or dataset not in f:
        raise SourceError(f"replay file {path}: no dataset {dataset!r} (spec.source.dataset); "
                          f"datasets at the top: {', '.join(f.keys())}")
    return f[dataset]
