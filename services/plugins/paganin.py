"""Paganin single-material phase retrieval of a flat-corrected projection.

Paganin, Mayo, Gureyev, Miller & Wilkins, "Simultaneous phase and amplitude extraction from a single defocused
image of a homogeneous object", J. Microscopy 206 (2002) 33-40, eq. 10: the transmission I/I0 measured at a
distance z behind the sample is low-pass filtered in Fourier space by

    H(f) = 1 / (1 + pi * wavelength * z * (delta / beta) * |f|^2)      f in cycles per metre

after which -log gives mu * thickness (to be reconstructed). This is the filter tomopy's `retrieve_phase` and
TomoPy-derived codes apply (there written with w2 = (2 pi f)^2); no library with it installs from PyPI here
(tomopy is conda-only), hence these few lines. The projection is padded with its edge values to twice its
size, so the filter's wrap-around does not mix opposite edges.
"""

from __future__ import annotations

import math

import numpy as np

HC_KEV_M = 1.239841984e-9   # Planck constant x speed of light, keV * m (CODATA 2018)


def wavelength_m(energy_kev: float) -> float:
    """X-ray wavelength in metres for a photon energy in keV."""
    return HC_KEV_M / energy_kev


def paganin_filter(shape: tuple[int, int], pixel_size_m: float, distance_m: float, energy_kev: float,
                   delta_beta: float) -> np.ndarray:
    """H(f) on the FFT grid of an image of `shape` (rows, cols), float64, H(0) = 1."""
    fy = np.fft.fftfreq(shape[0], d=pixel_size_m)
    fx = np.fft.fftfreq(shape[1], d=pixel_size_m)
    f2 = fy[:, None] ** 2 + fx[None, :] ** 2
    return 1.0 / (1.0 + math.pi * wavelength_m(energy_kev) * distance_m * delta_beta * f2)


def paganin(transmission: np.ndarray, pixel_size_m: float, distance_m: float, energy_kev: float,
            delta_beta: float) -> np.ndarray:
    """The filtered transmission (rows, cols) float32 of a flat-corrected projection (rows, cols); take -log
    of it for the reconstruction. Rows near a cut edge are only right `halo_rows` rows in from it."""
    rows, cols = transmission.shape
    padded = np.pad(transmission.astype(np.float64), ((rows // 2, rows - rows // 2), (cols // 2, cols - cols // 2)),
                    mode="edge")
    h = paganin_filter(padded.shape, pixel_size_m, distance_m, energy_kev, delta_beta)
    out = np.fft.ifft2(np.fft.fft2(padded) * h).real
    return out[rows // 2:rows // 2 + rows, cols // 2:cols // 2 + cols].astype(np.float32)


def halo_rows(pixel_size_m: float, distance_m: float, energy_kev: float, delta_beta: float) -> int:
    """Rows of neighbours a band of rows needs on each side for the filter to be right to 1 % inside it: the
    filter's real-space kernel falls as exp(-r / l), l = sqrt(wavelength z (delta/beta) / (4 pi)), so 5 l."""
    length = math.sqrt(wavelength_m(energy_kev) * distance_m * delta_beta / (4 * math.pi))
    return math.ceil(5 * length / pixel_size_m)
