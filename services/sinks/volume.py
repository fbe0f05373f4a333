"""A reconstructed tomography volume in HDF5 (and optionally a TIFF stack), with its scan's accounting.

Layout (the volume where DXchange's `dxchange.write_hdf5` puts a reconstruction, so silx, ImageJ's HDF5 reader
and tomopy-based tools find it):
  /exchange/data            float32 (slices, rows, cols), chunked one slice per chunk; attrs voxel_size,
                            units ("m" or "pixel"), axes "z,y,x"; y downwards, as astra reconstructs
  /exchange/theta           float64 the scan's projection angles, degrees (attr units "degrees")
  /process/reconstruction   attrs: the reconstruction's parameters (filter, centre, Paganin ...)
  /accounting               attrs: projections_expected = projections_used + projections_lost, complete
                            (False when angles are missing: the volume is then the FBP of the angles received);
                            datasets projection_status uint8 per angle (0 used, 1 used by some slices only,
                            2 missing: the codes of the scan files' position_status), slice_status uint8 per
                            slice (0 reconstructed, 2 missing: a band nobody reconstructed),
                            slice_angles_missing uint32 per slice (angles a reconstructed slice lacks) and,
                            from a session (`VolumeSink`), frame_status uint8 per frame of the scan (0 every
                            band's result came, 1 some bands', 2 none: lost) and frame_bands (uint64 bit masks);
                            each status dataset names its codes in attributes COMPLETE, PARTIAL, MISSING (as
                            position_status does) and says what they mean in `meaning`
The file is written as `path + '.partial'` and renamed on close; an existing file is never overwritten.
With `tiff=True`, close also writes `path` without .h5 + `_tiff/slice_NNNNN.tif` (float32, tifffile), one a slice.

`VolumeSink` is the writer's sink of the `volume` result kind (tomo-fbp, routed by slice): it writes the bands of
slices the workers send (VOLUME), each with the projections it used, and the scan's frame accounting.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from detstream.services.dataplane.accounting import CODES, COMPLETE, MISSING, PARTIAL
from detstream.services.dataplane.bands import Bands
from detstream.services.dataplane.wire import unpack_frames
from detstream.services.sinks import ResultSink
from detstream.services.sinks.output import never_overwrite


def status_dataset(group: h5py.Group, name: str, status: np.ndarray, meaning: str) -> None:
    """A uint8 status dataset whose attributes name its codes (COMPLETE, PARTIAL, MISSING) and say what they mean."""
    dataset = group.create_dataset(name, data=status)
    dataset.attrs.update({**CODES, "meaning": meaning})


class VolumeFile:
    """One scan's volume of `shape` (slices, rows, cols) at `path`; FileExistsError (saying why) when `path` or
    its TIFF folder exists. `angles_deg` the scan's angles; `voxel_size` in metres, or None for pixels."""

    def __init__(self, path: Path, shape: tuple[int, int, int], angles_deg: np.ndarray,
                 voxel_size: float | None = None, tiff: bool = False):
        self.path = Path(path)
        self.tiff_dir = self.path.with_name(self.path.stem + "_tiff") if tiff else None
        for target in (self.path, self.tiff_dir):
            if target is not None and target.exists():
                raise FileExistsError(never_overwrite(target))
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.shape = tuple(int(n) for n in shape)
        self.file = h5py.File(self.partial, "w")
        self.data = self.file.create_dataset("exchange/data", shape=self.shape, dtype=np.float32,
                                             chunks=(1,) + self.shape[1:], fillvalue=np.nan)
        self.data.attrs.update(voxel_size=voxel_size if voxel_size else 1.0, units="m" if voxel_size else "pixel",
                               axes="z,y,x")
        theta = self.file.create_dataset("exchange/theta", data=np.asarray(angles_deg, np.float64))
        theta.attrs["units"] = "degrees"
        self.slice_status = np.full(self.shape[0], MISSING, np.uint8)

    def write_band(self, first: int, slices: np.ndarray) -> None:
        """Slices [first, first + len(slices)) of the volume, (n, rows, cols) float32."""
        if slices.shape[1:] != self.shape[1:] or not 0 <= first <= self.shape[0] - slices.shape[0]:
            raise ValueError(f"a band of {slices.shape} at slice {first} does not fit a volume of {self.shape}")
        self.data[first:first + slices.shape[0]] = slices.astype(np.float32, copy=False)
        self.slice_status[first:first + slices.shape[0]] = COMPLETE

    def record(self, parameters: dict, used: np.ndarray) -> dict:
        """The reconstruction's `parameters` (plain values) and which angles were `used`: bool per angle, or per
        slice and angle (slices, angles); returns the totals recorded (projections_expected/used/lost: an angle
        some reconstructed slice lacks is lost, slices_missing, complete)."""
        per_slice = np.broadcast_to(used, (self.shape[0], used.shape[-1]))
        reconstructed = per_slice[self.slice_status == COMPLETE]
        used = reconstructed.all(axis=0)
        some = reconstructed.any(axis=0)
        proc = self.file.require_group("process/reconstruction")
        for key, value in parameters.items():
            if isinstance(value, dict):
                proc.require_group(key).attrs.update(value)
            else:
                proc.attrs[key] = value
        acc = self.file.require_group("accounting")
        status = np.where(used, COMPLETE, np.where(some, PARTIAL, MISSING)).astype(np.uint8)
        status_dataset(acc, "projection_status", status, "per angle: 0 used by every reconstructed slice, 1 by "
                       "some only, 2 by none (lost)")
        status_dataset(acc, "slice_status", self.slice_status, "per slice: 0 reconstructed, 2 missing (a band "
                       "nobody reconstructed)")
        lacking = np.where(self.slice_status == COMPLETE, (~per_slice).sum(axis=1), 0).astype(np.uint32)
        acc.create_dataset("slice_angles_missing", data=lacking)
        totals = {"projections_expected": int(used.size), "projections_used": int(used.sum()),
                  "projections_lost": int((~used).sum()), "slices_missing": int((self.slice_status != COMPLETE).sum())}
        totals["complete"] = totals["projections_lost"] == 0 and totals["slices_missing"] == 0
        acc.attrs.update(totals)
        return totals

    def close(self) -> Path:
        """Finish the file (and the TIFF stack) and put it at `path`."""
        self.file.close()
        if self.tiff_dir is not None:
            import tifffile
            partial_dir = self.tiff_dir.with_name(self.tiff_dir.name + ".partial")
            partial_dir.mkdir()
            with h5py.File(self.partial, "r") as f:
                for k in range(self.shape[0]):
                    tifffile.imwrite(partial_dir / f"slice_{k:05d}.tif", f["exchange/data"][k])
            os.rename(partial_dir, self.tiff_dir)
        os.rename(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        """Leave nothing behind."""
        try:
            self.file.close()
        except Exception:
            pass
        self.partial.unlink(missing_ok=True)
        if self.tiff_dir is not None:
            shutil.rmtree(self.tiff_dir.with_name(self.tiff_dir.name + ".partial"), ignore_errors=True)


class VolumeSink(ResultSink):
    """The writer's sink of `volume` results: one scan's VolumeFile of (detector rows, cols, cols) slices at
    `path`, angles from spec.tomography, voxels in pixels. Per frame results are receipts (nothing written);
    `take_output` writes each band's slices (VOLUME: the latest of a band overwrites its earlier ones) and keeps
    the projections it used; the scan waits (`awaiting_outputs`) for every band with projections here to send
    slices made of at least as many; `record_arrivals` records the accounting, under `/process/reconstruction`
    the session's metadata and the plugin's calibration (its group `reconstruction` as attributes there, other
    groups as subgroups: tomo-fbp's `paganin`)."""

    result = "volume"

    def __init__(self, path: Path, spec, metadata: dict | None = None):
        super().__init__(path, (spec.scan.rows, spec.scan.cols), (spec.detector.rows, spec.detector.cols), metadata)
        rows, cols = spec.detector.rows, spec.detector.cols
        self.tomo = spec.tomography
        self.angles = spec.tomography.angles
        self.volume = VolumeFile(path, (rows, cols, cols), spec.tomography.angles_deg())
        self.used = np.zeros((rows, self.angles), bool)
        self.bands_taken: set[int] = set()   # first slices of the bands whose slices came
        self.metadata = dict(metadata or {})
        self.totals: dict = {}

    @classmethod
    def open(cls, path: Path, spec, scan_shape: tuple[int, int], metadata: dict) -> VolumeSink:
        return cls(path, spec, metadata)

    def write_result(self, position: int, parts) -> None:
        """A frame's result is a receipt: its pixels are in its band's slices."""

    @classmethod
    def output_refusal(cls, spec, slices: tuple[int, int], shape: tuple[int, ...], parts) -> str | None:
        """A VOLUME of band (first, count) holds `count` slices of cols x cols and the bitmap of its angles."""
        count, cols, angles = slices[1], spec.detector.cols, spec.tomography.angles
        if shape != (count, cols, cols) or memoryview(parts[1]).nbytes != (angles + 7) // 8:
            return "geometry"
        return None

    def take_output(self, slices: tuple[int, int], parts) -> None:
        """Band (first, count)'s slices (count, cols, cols) float32 and the projections in them (packed bits per
        angle), into the file."""
        first, count = slices
        cols = self.volume.shape[1]
        self.volume.write_band(first, np.frombuffer(parts[0], np.float32).reshape(count, cols, cols))
        self.used[first:first + count] = unpack_frames(parts[1], self.angles)
        self.bands_taken.add(first)

    def awaiting_outputs(self, arrived: np.ndarray, bands: Bands) -> bool:
        """A band with projections' results here whose slices came made of fewer (or not yet)."""
        projections = arrived[self.tomo.first_projection:self.tomo.first_projection + self.angles]
        for band in range(bands.count):
            got = int(np.count_nonzero(projections & np.uint64(1 << band)))
            first = bands.slices(band)[0]
            if got and (first not in self.bands_taken or int(self.used[first].sum()) < got):
                return True
        return False

    def add_metadata(self, metadata: dict) -> None:
        self.metadata.update(metadata)

    def record_arrivals(self, written: np.ndarray, sectors_arrived: np.ndarray, sectors: int, totals: dict) -> None:
        """Per frame: `sectors_arrived` holds the bands whose result came (bit per band of `sectors` bands)."""
        every = np.uint64((1 << sectors) - 1)
        status = np.where(~written, MISSING, np.where(sectors_arrived == every, COMPLETE, PARTIAL)).astype(np.uint8)
        acc = self.volume.file.require_group("accounting")
        status_dataset(acc, "frame_status", status, "per frame of the scan: 0 every band's result came, 1 some "
                       "bands', 2 none (lost)")
        acc.create_dataset("frame_bands", data=np.where(written, sectors_arrived, 0).astype(np.uint64))
        acc.attrs.update({f"frames_{k}": v for k, v in totals.items()})
        parameters = {**{k: v for k, v in self.metadata.items() if k != "reconstruction"},
                      **self.metadata.get("reconstruction", {})}
        self.totals = self.volume.record({k: v if isinstance(v, (dict, int, float, bool)) else str(v)
                                          for k, v in parameters.items()}, self.used)

    def record_fields(self) -> dict:
        """The accounting line's `volume`: projections expected, used, lost, slices missing, complete."""
        return {"volume": self.totals}

    def close(self) -> Path:
        return self.volume.close()

    def abort(self) -> None:
        self.volume.abort()
