"""Filtered back-projection of a band of slices while the projections arrive (parallel beam, astra-toolbox on the CPU).

Reconstruction works on sinograms (one detector row over all angles) but a scan delivers one angle at a time.
FBP is a sum over angles, so a band of slices can take each projection's share as it comes, as RECAST3D and
SliceRecon do (Buurlage et al., "Real-time reconstruction and visualisation towards dynamic feedback control
during time-resolved tomography experiments at TOMCAT", Sci. Rep. 9 (2019) 18379). `SliceBand` owns detector rows
[first, first + count), i.e. those slices of the volume, and for each projection

    flat/dark correct -> (Paganin) -> -log -> shift the rotation axis to the detector centre
    -> astra FBP of that angle alone (filter the rows, back-project) -> add, weighted 1 / angles

Astra's CPU FBP (`FBP` with a `linear` parallel projector) filters each row on its own and weights every angle
alike, so these sums equal its FBP of the whole sinogram (relative RMS ~4e-7, tests/test_tomography.py): the
slices are complete a batch of projections after the last one arrives. `batch` projections are back-projected
per astra call (the same sum, fewer calls). Steps that need the whole sinogram, ring removal (Vo et al., Opt.
Express 26 (2018) 28396, algotom's `remove_stripe_based_sorting`) and the estimated rotation centre (Vo et al.,
Opt. Express 22 (2014) 19078, algotom's `find_center_vo`), keep the band's corrected sinograms and reconstruct
it at `finish`, with the same astra call.

A projection missing at the end leaves its angle out: the volume is then astra's FBP of the angles received
(the sum so far times angles / received), and `accounting()` says which ones are missing.

`TomoFBP` is the plugin `tomo-fbp`: routed by slice (dataplane/bands.py), worker k gets band k's rows of every
frame and holds a `SliceBand` per scan; each frame's result is a receipt (no pixels), and the band's slices go to
the writer (VOLUME) once the band has every frame of the scan, and meanwhile whenever the worker's input pauses.

Darks and flats (spec.tomography's frame layout) correct the projections: a projection that comes before all
the darks and flats before it (another lane was faster) waits, at most `maxPending` of them, after which the
band goes on with the darks and flats it has (and says so). The darks and flats before the projections are the
plugin's `references`: a band's worker restarted mid-scan gets them again from the sources, so it corrects the
band's remaining projections (only those the dead process had summed are lost). Each dark and flat counts once,
however often it comes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from detstream.services.dataplane.scans import ClosedScans
from detstream.services.model.session import Tomography
from detstream.services.plugins import Plugin, PluginContext
from detstream.services.plugins.flatfield import FlatDark, minus_log
from detstream.services.plugins.paganin import halo_rows, paganin

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann", "none")
RING_REMOVAL = ("none", "sorting")
PAGANIN_KEYS = {"energyKeV": "photon energy, keV", "distanceM": "sample-detector distance, m",
                "pixelSizeM": "detector pixel size, m", "deltaBeta": "delta / beta of the material"}


@dataclass(frozen=True)
class ReconParams:
    """The reconstruction's parameters (spec.plugin.params, camelCase there): `filter` one of FILTERS, `centre`
    the rotation axis as a detector column (None: the detector's centre, (cols-1)/2; "auto": estimated),
    `paganin` PAGANIN_KEYS to numbers or None, `ring_removal` one of RING_REMOVAL, `batch` projections per
    back-projection call, `max_pending` projections held while darks or flats are missing."""
    filter: str = "ram-lak"
    centre: float | str | None = None
    paganin: dict | None = None
    ring_removal: str = "none"
    batch: int = 8
    max_pending: int = 64

    @classmethod
    def from_params(cls, params: dict) -> ReconParams:
        """From checked parameters (`check_params` found nothing)."""
        return cls(filter=params.get("filter", "ram-lak"), centre=params.get("centre"),
                   paganin=params.get("paganin"), ring_removal=params.get("ringRemoval", "none"),
                   batch=params.get("batch", 8), max_pending=params.get("maxPending", 64))

    @property
    def at_end(self) -> bool:
        """Whether the band needs its whole sinograms (so it reconstructs at `finish`)."""
        return self.centre == "auto" or self.ring_removal != "none"

    def recorded(self) -> dict:
        """The parameters as a volume file records them (plain values)."""
        out: dict[str, Any] = {"filter": self.filter, "ring_removal": self.ring_removal, "batch": self.batch,
                               "centre": "detector centre" if self.centre is None else self.centre,
                               "library": "astra-toolbox FBP (CPU, linear parallel projector)"}
        if self.paganin:
            out["paganin"] = dict(self.paganin)
        return out


def check_params(params: dict) -> list[tuple[str, str]]:
    """Problems with reconstruction parameters as (parameter, what is allowed); empty when valid."""
    problems = []
    allowed = {"filter", "centre", "paganin", "ringRemoval", "batch", "maxPending"}
    problems += [(k, f"unknown parameter; allowed: {', '.join(sorted(allowed))}") for k in params if k not in allowed]
    if params.get("filter", "ram-lak") not in FILTERS:
        problems.append(("filter", f"must be one of {', '.join(FILTERS)}; got {params['filter']!r}"))
    if params.get("ringRemoval", "none") not in RING_REMOVAL:
        problems.append(("ringRemoval", f"must be one of {', '.join(RING_REMOVAL)}; got {params['ringRemoval']!r}"))
    centre = params.get("centre")
    if centre is not None and centre != "auto" and (isinstance(centre, bool) or not isinstance(centre, (int, float))):
        problems.append(("centre", f"must be the rotation axis' detector column (a number) or auto; got {centre!r}"))
    for key in ("batch", "maxPending"):
        value = params.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append((key, f"must be an integer >= 1; got {value!r}"))
    pag = params.get("paganin")
    if pag is not None:
        if not isinstance(pag, dict) or set(pag) != set(PAGANIN_KEYS):
            problems.append(("paganin", "must give " + ", ".join(f"{k} ({v})" for k, v in PAGANIN_KEYS.items())))
        else:
            problems += [(f"paganin.{k}", f"must be a number > 0; got {v!r}") for k, v in pag.items()
                         if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0]
    return problems


def astra_fbp(sinogram: np.ndarray, theta: np.ndarray, filter_type: str = "ram-lak") -> np.ndarray:
    """astra-toolbox's CPU FBP of one slice: `sinogram` (angles, cols) line integrals per pixel, `theta` radians
    (angles,); returns (cols, cols) float32 attenuation per pixel, rows y downwards, the axis at (cols-1)/2."""
    import astra

    cols = sinogram.shape[1]
    vol_geom = astra.create_vol_geom(cols, cols)
    proj_geom = astra.create_proj_geom("parallel", 1.0, cols, np.asarray(theta, dtype=np.float64))
    projector = astra.create_projector("linear", proj_geom, vol_geom)
    sino_id = astra.data2d.create("-sino", proj_geom, np.ascontiguousarray(sinogram, dtype=np.float32))
    rec_id = astra.data2d.create("-vol", vol_geom, 0)
    cfg = astra.astra_dict("FBP")
    cfg.update(ReconstructionDataId=rec_id, ProjectionDataId=sino_id, ProjectorId=projector, FilterType=filter_type)
    alg = astra.algorithm.create(cfg)
    try:
        astra.algorithm.run(alg)
        return astra.data2d.get(rec_id)
    finally:
        astra.algorithm.delete(alg)
        astra.data2d.delete([sino_id, rec_id])
        astra.projector.delete(projector)


def to_centre(rows: np.ndarray, centre: float | None) -> np.ndarray:
    """Rows (.., cols) shifted so that detector column `centre` lands on (cols-1)/2, where astra's parallel
    geometry puts the rotation axis (cubic spline, edges extended); unchanged for None."""
    if centre is None:
        return rows
    from scipy import ndimage
    shift = (rows.shape[-1] - 1) / 2 - float(centre)
    return ndimage.shift(rows, (0,) * (rows.ndim - 1) + (shift,), order=3, mode="nearest").astype(np.float32)


def estimate_centre(sinogram: np.ndarray) -> float:
    """The rotation axis' detector column from a 180-degree sinogram (angles, cols): algotom's `find_center_vo`."""
    from algotom.prep.calculation import find_center_vo
    return float(find_center_vo(sinogram))


class SliceBand:
    """Reconstructs slices [first, first + count) of every scan frame of `tomo`'s layout, as they arrive.

    `add(frame, rows)` takes frame number `frame` of the scan as its detector rows [first - halo, first + count
    + halo) clipped to the detector (`rows_needed()`), (n, cols) of any numeric type. `volume()` is the band so
    far, `finish()` completes it. Raises ValueError for a frame outside the scan or rows of the wrong shape.
    """

    def __init__(self, tomo: Tomography, detector_rows: int, cols: int, first: int, count: int,
                 params: ReconParams):
        self.tomo, self.cols, self.first, self.count, self.params = tomo, cols, first, count, params
        pag = params.paganin
        halo = halo_rows(pag["pixelSizeM"], pag["distanceM"], pag["energyKeV"], pag["deltaBeta"]) if pag else 0
        self.lo, self.hi = max(0, first - halo), min(detector_rows, first + count + halo)
        self.field = FlatDark((self.hi - self.lo, cols))
        self.after = FlatDark((self.hi - self.lo, cols))
        self.theta = np.radians(tomo.angles_deg())
        self.received = np.zeros(tomo.angles, bool)
        self.fields: set[int] = set()   # the frame numbers of the darks and flats taken (each counts once)
        self.pending: dict[int, np.ndarray] = {}
        self.batch: list[tuple[int, np.ndarray]] = []
        self.sum = np.zeros((count, cols, cols), np.float32)
        self.sinograms = np.zeros((count, tomo.angles, cols), np.float32) if params.at_end else None
        self.centre_used: float | None = None if params.centre in (None, "auto") else float(params.centre)
        self.finished = False

    def rows_needed(self) -> tuple[int, int]:
        """The detector rows [lo, hi) this band takes of every frame (its slices plus Paganin's halo)."""
        return self.lo, self.hi

    def add(self, frame: int, rows: np.ndarray) -> None:
        role, index = self.tomo.role(frame)
        if rows.shape != (self.hi - self.lo, self.cols):
            raise ValueError(f"frame {frame}: rows of shape {rows.shape}, the band takes "
                             f"{(self.hi - self.lo, self.cols)}")
        if role != "projection":
            if frame in self.fields:
                return   # a dark or flat again: sent again after its worker died, or to a restarted band's worker
            self.fields.add(frame)
        if role == "dark":
            self.field.add_dark(rows)
        elif role == "flat":
            self.field.add_flat(rows)
        elif role == "flat-after":
            self.after.add_flat(rows)
        elif self.received[index] or index in self.pending:
            return  # a duplicate (a frame sent again after its worker was declared dead)
        elif self._ready():
            self._project(index, rows)
        else:
            self.pending[index] = np.array(rows, copy=True)
            if len(self.pending) > self.params.max_pending:
                self._flush_pending()
            return
        if self.pending and self._ready():
            self._flush_pending()

    def _ready(self) -> bool:
        return self.field.darks == self.tomo.darks and self.field.flats == self.tomo.flats

    def _flush_pending(self) -> None:
        if not self.field.flats:
            return  # nothing to correct with yet: keep waiting (finish() reports them lost)
        for index in sorted(self.pending):
            self._project(index, self.pending.pop(index))

    def _project(self, index: int, rows: np.ndarray) -> None:
        """Correct one projection and add it (or keep it for the end)."""
        transmission = self.field.transmission(rows)
        pag = self.params.paganin
        if pag:
            transmission = paganin(transmission, pag["pixelSizeM"], pag["distanceM"], pag["energyKeV"],
                                   pag["deltaBeta"])
        line = minus_log(transmission)[self.first - self.lo:self.first - self.lo + self.count]
        self.received[index] = True
        if self.sinograms is not None:
            self.sinograms[:, index] = line
            return
        self.batch.append((index, to_centre(line, self.centre_used)))
        if len(self.batch) >= self.params.batch:
            self._back_project()

    def _back_project(self) -> None:
        if not self.batch:
            return
        indices = [i for i, _ in self.batch]
        lines = np.stack([line for _, line in self.batch], axis=1)   # (count, batch, cols)
        weight = np.float32(len(indices) / self.tomo.angles)
        for s in range(self.count):
            self.sum[s] += astra_fbp(lines[s], self.theta[indices], self.params.filter) * weight
        self.batch.clear()

    def volume(self, slices: list[int] | None = None) -> np.ndarray:
        """The band's slices so far (count, cols, cols) float32, or only `slices` (indices into the band) as
        (len(slices), cols, cols): astra's FBP of the angles received and back-projected (`used()`); NaN before
        the first (and, for an at-end band, until `finish`)."""
        done = int(self.used().sum())
        shape = self.sum.shape if slices is None else (len(slices),) + self.sum.shape[1:]
        if done <= 0 or (self.sinograms is not None and not self.finished):
            return np.full(shape, np.nan, np.float32)
        return (self.sum if slices is None else self.sum[slices]) * np.float32(self.tomo.angles / done)

    def used(self) -> np.ndarray:
        """The angles `volume()` holds, bool (angles,): those received, less the batch not back-projected yet."""
        used = self.received.copy()
        used[[i for i, _ in self.batch]] = False
        return used

    def finish(self) -> np.ndarray:
        """Reconstruct what remains (the last batch; an at-end band's sinograms) and return `volume()`. Frames
        may still come after (a band sent before its scan is complete): `finish` again takes them in."""
        self._flush_pending()
        self._back_project()
        if self.sinograms is not None:
            self._reconstruct_at_end()
        self.finished = True
        return self.volume()

    @property
    def complete(self) -> bool:
        """Whether every frame of the scan's layout (darks, flats, projections, flats after) came."""
        return bool(self.received.all()) and (self.field.darks, self.field.flats, self.after.flats) == (
            self.tomo.darks, self.tomo.flats, self.tomo.flats_after)

    def _reconstruct_at_end(self) -> None:
        got = np.flatnonzero(self.received)
        if not got.size or self.sinograms is None:
            return
        sinos = self.sinograms[:, got]
        if self.params.ring_removal == "sorting":
            from algotom.prep.removal import remove_stripe_based_sorting
            sinos = np.stack([remove_stripe_based_sorting(s) for s in sinos]).astype(np.float32)
        if self.params.centre == "auto":
            self.centre_used = estimate_centre(sinos[self.count // 2])
        weight = np.float32(got.size / self.tomo.angles)
        for s in range(self.count):
            self.sum[s] = astra_fbp(to_centre(sinos[s], self.centre_used), self.theta[got], self.params.filter) * weight

    def accounting(self) -> dict:
        """What the band used: projections expected/used/lost (their indices), darks and flats used, the centre
        and, with flats after, the beam's drift (mean flat after / mean flat before - 1)."""
        lost = np.flatnonzero(~self.received)
        out: dict[str, Any] = {"projections_expected": self.tomo.angles, "projections_used": int(self.received.sum()),
                               "projections_lost": int(lost.size), "lost_angles_index": lost.astype(np.int64),
                               "darks_used": self.field.darks, "darks_expected": self.tomo.darks,
                               "flats_used": self.field.flats, "flats_expected": self.tomo.flats,
                               "complete": bool(not lost.size),
                               "centre": (self.cols - 1) / 2 if self.centre_used is None else self.centre_used}
        if self.after.flats and self.field.flats:
            out["beam_drift"] = float(self.after.flat_sum.mean() / self.after.flats /
                                      (self.field.flat_sum.mean() / self.field.flats) - 1)
        return out


class TomoFBP(Plugin):
    """The plugin `tomo-fbp`: a worker's band of slices, reconstructed while the projections arrive (`SliceBand`,
    one per scan). Needs spec.tomography. Each frame's result is an empty receipt; `scan_output` is the band's
    slices (count, cols, cols) float32 and the projections used (bool per angle, packed bits)."""

    result = "volume"
    by_slice = True

    @classmethod
    def check_params(cls, params: dict) -> list[tuple[str, str]]:
        return check_params(params)

    @classmethod
    def references(cls, spec) -> range:
        """The darks and flats before the projections (what corrects them)."""
        return range(spec.tomography.first_projection)

    @classmethod
    def halo_rows(cls, params: dict) -> int:
        pag = params.get("paganin")
        return halo_rows(pag["pixelSizeM"], pag["distanceM"], pag["energyKeV"], pag["deltaBeta"]) if pag else 0

    def __init__(self, params: dict, context: PluginContext):
        self.bands: dict[int, SliceBand] = {}
        self.finished = ClosedScans()   # scans whose final output went: a frame of one again starts no band
        super().__init__(params, context)

    def configure(self, params: dict) -> None:
        super().configure(params)
        self.recon = ReconParams.from_params(params)

    def band(self, scan: int) -> SliceBand:
        band = self.bands.get(scan)
        if band is None:
            spec, (first, count) = self.context.spec, self.context.slices
            band = self.bands[scan] = SliceBand(spec.tomography, spec.detector.rows, spec.detector.cols, first, count,
                                                self.recon)
        return band

    def process(self, sectors, parts):
        raise TypeError("tomo-fbp needs each frame's number: call process_frame")

    def process_frame(self, scan, frame, sectors, parts):
        """Adds the frame to the scan's band. A frame of a scan whose final output went (a re-send, a dark or flat
        sent again) is left out: a band of it alone would later be sent as the scan's slices, in place of the
        whole band's."""
        if scan not in self.finished:
            self.band(scan).add(frame, sectors[0] if len(sectors) == 1 else np.hstack(sectors))
        return [b""]

    def scan_complete(self, scan: int) -> bool:
        return scan in self.bands and self.bands[scan].complete

    def scan_output(self, scan: int, final: bool) -> list[np.ndarray] | None:
        band = self.bands.pop(scan) if final else self.bands.get(scan)
        if final:
            self.finished.add(scan)
        if band is None:
            return None
        return [band.finish(), np.packbits(band.received)]

    def scan_preview(self, scan: int, slices: list[int]) -> list[np.ndarray] | None:
        """Slices `slices` of the band so far (`SliceBand.volume`: nothing is reconstructed for it; an at-end band
        is NaN until its end) and the projections in them (bool per angle, packed bits)."""
        band = self.bands.get(scan)
        if band is None:
            return None
        return [band.volume(slices), np.packbits(band.used())]

    def calibration(self) -> dict:
        """The reconstruction's parameters (`ReconParams.recorded`), for the volume file's /process/reconstruction."""
        recorded = self.recon.recorded()
        paganin = recorded.pop("paganin", None)
        return {"reconstruction": recorded, **({"paganin": paganin} if paganin else {})}
