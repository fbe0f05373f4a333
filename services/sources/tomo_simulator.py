"""The `tomo-simulator` source kind: a parallel-beam tomography scan of a 3D phantom, with flats and darks.

Frames follow `spec.tomography`'s layout (services/model/session.py, `Tomography`): frame numbers 0 .. darks-1
are dark fields, then the flats, then one projection per angle i * arcDegrees / angles, then the flats after.
Flats and darks travel as ordinary frames at their own scan positions, so every stage, the accounting and
the files treat them as any frame, and a consumer knows what a frame is from its number alone.

Each frame is a pure function of (seed, scan, frame), so every source replica makes just its sectors and the
ground truth can be recomputed anywhere (`ground_truth`):

    dark        Poisson(darkLevel)
    flat        Poisson(photons * beam) + Poisson(darkLevel)
    projection  Poisson(photons * beam * exp(-k * L(theta))) + Poisson(darkLevel)

with `beam` a smooth vertical profile times a fixed per-pixel gain (1 +- 2 %, which rings an uncorrected
reconstruction), L the phantom's exact line integrals (services/sources/phantom.py) with the rotation axis
at column (cols-1)/2 + centreOffset, and k the factor that makes the largest line integral maxAbsorption.
The ground truth is then k times the phantom: the attenuation per pixel that -log(flat-corrected) FBP gives.
"""

from __future__ import annotations

import numpy as np

from detstream.services.model.schema import FieldError
from detstream.services.model.session import SessionSpec, TomoSimulator
from detstream.services.sources import GridSource
from detstream.services.sources.phantom import Phantom


class TomoScan:
    """The frames of the simulated scan: `spec` a session spec with `spec.tomography`."""

    def __init__(self, spec: SessionSpec):
        assert spec.tomography is not None  # TomoSimulatorSource.check refuses a spec without it
        self.tomo = spec.tomography
        self.sim = spec.source.tomo_simulator or TomoSimulator()
        self.rows, self.cols = spec.detector.rows, spec.detector.cols
        self.dtype = np.dtype(spec.detector.dtype)
        self.phantom = Phantom(self.rows, self.cols, self.sim.seed)
        self.theta = np.radians(self.tomo.angles_deg())
        self.k = self.phantom.scale(self.sim.max_absorption, self.theta, self.sim.centre_offset)
        rng = np.random.default_rng([self.sim.seed, 0xBEA4])
        v = (np.arange(self.rows) - (self.rows - 1) / 2) / max(self.rows / 2, 1)
        profile = 0.8 + 0.2 * np.exp(-v ** 2)
        gain = 1 + 0.02 * rng.standard_normal((self.rows, self.cols))
        self.beam = self.sim.photons * profile[:, None] * gain
        self._cached: tuple = (None, None)

    def frame(self, scan: int, frame: int) -> np.ndarray:
        """Frame `frame` of scan `scan`: (rows, cols) of detector.dtype (integer types rounded and clipped)."""
        if self._cached[0] == (scan, frame):
            return self._cached[1]
        role, index = self.tomo.role(frame)
        rng = np.random.default_rng([self.sim.seed, scan, frame])
        if role == "dark":
            mean = np.zeros((self.rows, self.cols))
        elif role == "projection":
            mean = self.beam * np.exp(-self.k * self.phantom.projection(self.theta[index], self.sim.centre_offset))
        else:
            mean = self.beam
        counts = rng.poisson(mean) + rng.poisson(self.sim.dark_level, mean.shape)
        if self.dtype.kind in "ui":
            counts = np.clip(counts, 0, np.iinfo(self.dtype).max)
        out = np.ascontiguousarray(counts.astype(self.dtype))
        self._cached = ((scan, frame), out)
        return out


def ground_truth(spec: SessionSpec, slices: slice = slice(None)) -> np.ndarray:
    """The simulated sample's attenuation per pixel, float32 (slices, cols, cols), oriented as astra
    reconstructs the slices: what a flat-corrected -log FBP of the scan approaches."""
    scan = TomoScan(spec)
    return scan.phantom.volume(slices) * np.float32(scan.k)


class TomoSimulatorSource(GridSource):
    """The `tomo-simulator` source kind: frames from `TomoScan` (settings in spec.source.tomoSimulator)."""

    summary = "a simulated parallel-beam tomography scan (spec.tomography) of a 3D phantom with flats and darks"

    @classmethod
    def check(cls, spec):
        problems = []
        if spec.tomography is None:
            problems.append(FieldError("spec.tomography", "is required with source.kind tomo-simulator (angles, "
                                       "arcDegrees, darks, flats)"))
        sim = spec.source.tomo_simulator or TomoSimulator()
        dtype = np.dtype(spec.detector.dtype)
        if dtype.kind == "u":
            # photons * beam (up to 1.06) + dark, with room for 6 sigma of noise
            top = sim.photons * 1.06 + sim.dark_level
            top += 6 * np.sqrt(top)
            if top > np.iinfo(dtype).max:
                problems.append(FieldError("spec.source.tomoSimulator.photons", f"flats would reach {top:.0f} "
                                           f"counts, past {dtype.name}'s {np.iinfo(dtype).max}: lower photons or "
                                           f"darkLevel, or use a wider spec.detector.dtype"))
        return problems

    def __init__(self, spec, replica):
        super().__init__(spec, replica)
        self.scan = TomoScan(spec)
        self.width = spec.detector.cols // spec.detector.sectors

    def sector(self, scan, frame, sector):
        pixels = self.scan.frame(scan, frame)
        return np.ascontiguousarray(pixels[:, sector * self.width:(sector + 1) * self.width])
