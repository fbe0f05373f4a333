"""The `dxchange` source kind: replay of a tomography scan from a DXchange HDF5 file.

DXchange (De Carlo et al., "Scientific data exchange: a schema for HDF5-based storage of raw and analyzed
data", J. Synchrotron Rad. 21 (2014) 1224; what tomopy's `dxchange.read_aps_32id` and algotom's loaders read)
keeps a scan as
    /exchange/data        projections (angles, rows, cols)
    /exchange/data_white  flat fields (flats, rows, cols): spec.tomography.flats before, then flatsAfter
    /exchange/data_dark   dark fields (darks, rows, cols)
    /exchange/theta       rotation angle of each projection, degrees
and this source sends them in spec.tomography's frame layout (darks, flats, projections, flats after), every
scan of the session the same file. The file must match the manifest (counts, detector shape and pixel type,
and angles i * arcDegrees / angles within 0.01 degrees); each mismatch is a SourceError naming the field and
the value to write. Frames are read one at a time, so a file larger than memory replays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detstream.services.model.schema import FieldError
from detstream.services.sources import GridSource, SourceError

DATASETS = {"data": "/exchange/data", "white": "/exchange/data_white", "dark": "/exchange/data_dark",
            "theta": "/exchange/theta"}
ANGLE_TOLERANCE_DEG = 0.01


class DXchange(GridSource):
    """Frames from the DXchange file at spec.source.path; SourceError naming what is missing or mismatched."""

    summary = "a tomography scan (spec.tomography) replayed from a DXchange HDF5 file (spec.source.path)"

    @classmethod
    def check(cls, spec):
        problems = []
        if not spec.source.path:
            problems.append(FieldError("spec.source.path", "is required when source.kind is dxchange (the "
                                       "DXchange HDF5 file)"))
        if spec.tomography is None:
            problems.append(FieldError("spec.tomography", "is required with source.kind dxchange (angles, "
                                       "arcDegrees, darks, flats, flatsAfter as in the file)"))
        return problems

    def __init__(self, spec, replica):
        super().__init__(spec, replica)
        self.file, sets = open_dxchange(Path(spec.source.path))
        self.tomo = spec.tomography
        self.data, self.white, self.dark = sets["data"], sets["white"], sets["dark"]
        self._check(spec, sets["theta"])
        self.width = spec.detector.cols // spec.detector.sectors
        self._cached: tuple = (None, None)

    def _check(self, spec, theta) -> None:
        path, tomo, d = spec.source.path, self.tomo, spec.detector
        for name, counts in (("data", [("angles", tomo.angles)]), ("white", [("flats", tomo.flats),
                             ("flatsAfter", tomo.flats_after)]), ("dark", [("darks", tomo.darks)])):
            ds = getattr(self, name)
            want = sum(n for _, n in counts)
            fields = " + ".join(f"spec.tomography.{f}" for f, _ in counts)
            if ds.ndim != 3 or ds.shape[0] != want:
                raise SourceError(f"dxchange file {path}: {DATASETS[name]} holds {ds.shape[0] if ds.ndim else 0} "
                                  f"frames of shape {ds.shape}; the manifest says {want} ({fields}): make them agree")
            if tuple(ds.shape[1:]) != (d.rows, d.cols):
                raise SourceError(f"dxchange file {path}: {DATASETS[name]} frames are {ds.shape[1]}x{ds.shape[2]}; "
                                  f"write spec.detector rows: {ds.shape[1]}, cols: {ds.shape[2]}")
            if ds.dtype != np.dtype(d.dtype):
                raise SourceError(f"dxchange file {path}: {DATASETS[name]} is {ds.dtype}; write spec.detector."
                                  f"dtype: {ds.dtype.name} (or convert the file)")
        theta = np.asarray(theta[()], dtype=np.float64).reshape(-1)
        if theta.size != tomo.angles:
            raise SourceError(f"dxchange file {path}: {DATASETS['theta']} has {theta.size} angles for "
                              f"{tomo.angles} projections")
        off = np.abs(theta - tomo.angles_deg()).max()
        if off > ANGLE_TOLERANCE_DEG:
            step = (theta[-1] - theta[0]) / max(theta.size - 1, 1)
            hint = (f"they are equally spaced by {step:.6g} from 0: write spec.tomography.arcDegrees: "
                    f"{step * theta.size:.6g}" if abs(theta[0]) <= ANGLE_TOLERANCE_DEG and
                    np.abs(np.diff(theta) - step).max() <= ANGLE_TOLERANCE_DEG
                    else "unequally spaced angles or a start other than 0 cannot be replayed yet")
            raise SourceError(f"dxchange file {path}: {DATASETS['theta']} differs from i * arcDegrees / angles "
                              f"by up to {off:.4g} degrees; {hint}")

    def _frame(self, frame: int) -> np.ndarray:
        if self._cached[0] != frame:
            role, index = self.tomo.role(frame)
            source = {"dark": self.dark, "flat": self.white, "projection": self.data,
                      "flat-after": self.white}[role]
            index += self.tomo.flats if role == "flat-after" else 0
            self._cached = (frame, np.asarray(source[index]))
        return self._cached[1]

    def sector(self, scan, frame, sector):
        return np.ascontiguousarray(self._frame(frame)[:, sector * self.width:(sector + 1) * self.width])


def open_dxchange(path: Path):
    """The open h5py.File and its four datasets by short name (data, white, dark, theta); SourceError naming
    the file and every dataset missing when it is not a readable DXchange file."""
    import h5py
    if not path.is_file():
        raise SourceError(f"dxchange file {path} does not exist (spec.source.path)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise SourceError(f"dxchange file {path} is not readable HDF5 (spec.source.path): {exc}") from None
    missing = [name for name in DATASETS.values() if not isinstance(f.get(name), h5py.Dataset)]
    if missing:
        f.close()
        raise SourceError(f"dxchange file {path} lacks {', '.join(missing)} (a DXchange scan has /exchange/data, "
                          f"data_white, data_dark and theta in degrees)")
    return f, {short: f[name] for short, name in DATASETS.items()}
