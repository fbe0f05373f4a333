"""A 3D phantom made of ellipsoids, with exact parallel-beam projections and its voxelised ground truth.

The head is the 3D Shepp-Logan phantom in the form of Kak & Slaney, "Principles of Computerized Tomographic
Imaging" (IEEE Press 1988, ch. 3, the 3D head of ellipsoids), with the contrast-raising intensities of Toft's
"modified" Shepp-Logan (as tomopy's `shepp3d` and scikit-image's `shepp_logan_phantom` in 2D use them). Fine
features test the resolution: a row of spheres of radius 1, 1.5, 2 and 3 pixels, thin rods along the rotation
axis and across it, and small spheres at random places drawn from the seed.

Coordinates follow astra-toolbox's 2D parallel geometry, so astra reconstructs the slices upright: voxel
(slice k, row i, col j) sits at x = j - (n-1)/2, y = (n-1)/2 - i (pixels, n = detector cols), z = k - (rows-1)/2;
the projection at angle theta puts x cos(theta) + y sin(theta) at detector column (n-1)/2 + centre_offset.
Projections are exact line integrals through the ellipsoids (closed form), not re-projections of the voxels,
so a reconstruction is not compared with its own forward model (no "inverse crime").
"""

from __future__ import annotations

import numpy as np

# (x0, y0, z0, a, b, c, phi degrees about the rotation axis, value) in units of half the slice width.
SHEPP_LOGAN_3D = np.array([
    (0.00, 0.0000, 0.00, 0.6900, 0.920, 0.900, 0.0, 1.0),
    (0.00, -0.0184, 0.00, 0.6624, 0.874, 0.880, 0.0, -0.8),
    (0.22, 0.0000, -0.25, 0.4100, 0.160, 0.210, 108.0, -0.2),
    (-0.22, 0.0000, -0.25, 0.3100, 0.110, 0.220, 72.0, -0.2),
    (0.00, 0.3500, -0.25, 0.2100, 0.250, 0.350, 0.0, 0.1),
    (0.00, 0.1000, -0.25, 0.0460, 0.046, 0.046, 0.0, 0.1),
    (-0.08, -0.6050, -0.25, 0.0460, 0.023, 0.020, 0.0, 0.1),
    (0.06, -0.6050, -0.25, 0.0460, 0.023, 0.020, 90.0, 0.1),
    (0.06, -0.1050, 0.625, 0.0560, 0.040, 0.100, 90.0, 0.1),
    (0.00, 0.1000, 0.625, 0.0560, 0.056, 0.100, 0.0, -0.1),
])
FINE_VALUE = 0.3       # the fine features, over the head's 0.2 inside
RANDOM_SPHERES = 12


class Phantom:
    """Ellipsoids in a volume of `rows` slices of `cols` x `cols` voxels (1 voxel = 1 detector pixel).

    `ellipsoids` is (N, 8) float64 in pixels: x0, y0, z0, semi-axes a, b, c, phi (radians), value.
    """

    def __init__(self, rows: int, cols: int, seed: int = 0):
        self.rows, self.cols = rows, cols
        half = cols / 2
        head = SHEPP_LOGAN_3D.copy()
        head[:, :6] *= half
        head[:, 6] = np.radians(head[:, 6])
        self.ellipsoids = np.vstack([head, self._fine(half, rows, seed)])

    @staticmethod
    def _fine(half: float, rows: int, seed: int) -> np.ndarray:
        """Spheres of 1 to 3 px radius in a row, rods along and across the axis, random small spheres."""
        z_top = min(0.35 * half, rows / 2 - 4)
        row = [(x * half, 0.55 * half, z_top * 0.5, r, r, r, 0.0, FINE_VALUE)
               for x, r in ((-0.30, 1.0), (-0.15, 1.5), (0.0, 2.0), (0.18, 3.0))]
        rods = [(0.35 * half, -0.3 * half, 0.0, 0.75, 0.75, 0.6 * min(half, rows / 2), 0.0, FINE_VALUE),
                (0.0, -0.3 * half, -z_top * 0.5, 0.25 * half, 0.75, 0.75, 0.0, FINE_VALUE)]
        rng = np.random.default_rng([seed, 0x70F0])
        n = RANDOM_SPHERES
        radius = rng.uniform(0.7, 2.5, n)
        angle, dist = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 0.5, n) * half
        z = rng.uniform(-0.4, 0.4, n) * min(half, rows / 2)
        spots = np.column_stack([dist * np.cos(angle), dist * np.sin(angle), z, radius, radius, radius,
                                 np.zeros(n), np.full(n, FINE_VALUE)])
        return np.vstack([np.array(row + rods), spots])

    def projection(self, theta: float, centre_offset: float = 0.0) -> np.ndarray:
        """Line integrals (rows, cols) float64 at rotation angle `theta` (radians): pixel (v, j) is the ray
        parallel to (-sin theta, cos theta, 0) at u = j - (cols-1)/2 - centre_offset, z = v - (rows-1)/2."""
        u = np.arange(self.cols) - (self.cols - 1) / 2 - centre_offset
        z = np.arange(self.rows) - (self.rows - 1) / 2
        direction = np.array([-np.sin(theta), np.cos(theta), 0.0])
        out = np.zeros((self.rows, self.cols))
        for x0, y0, z0, a, b, c, phi, value in self.ellipsoids:
            axes = np.array([a, b, c])
            rot = np.array([[np.cos(phi), np.sin(phi), 0], [-np.sin(phi), np.cos(phi), 0], [0, 0, 1]])
            # The ray point at the detector plane through the axis, relative to the centre, in the unit-sphere frame.
            px = u * np.cos(theta) - x0
            py = u * np.sin(theta) - y0
            qx, qy = (rot[0, 0] * px + rot[0, 1] * py) / a, (rot[1, 0] * px + rot[1, 1] * py) / b
            qz = (z - z0) / c
            e = rot @ direction / axes
            ee = e @ e
            qe = qx[None, :] * e[0] + qy[None, :] * e[1]
            qq = qx[None, :] ** 2 + qy[None, :] ** 2 + qz[:, None] ** 2
            disc = qe ** 2 - ee * (qq - 1)
            out += value * 2 * np.sqrt(np.clip(disc, 0, None)) / ee
        return out

    def volume(self, slices: slice = slice(None)) -> np.ndarray:
        """The ground truth sampled at voxel centres: float32 (slices, cols, cols), rows i = y downwards."""
        ks = np.arange(self.rows)[slices]
        z = ks - (self.rows - 1) / 2
        c = (self.cols - 1) / 2
        x = np.arange(self.cols) - c
        y = c - np.arange(self.cols)
        out = np.zeros((ks.size, self.cols, self.cols), np.float32)
        for x0, y0, z0, a, b, cz, phi, value in self.ellipsoids:
            dx, dy = x[None, :] - x0, y[:, None] - y0
            xr = (np.cos(phi) * dx + np.sin(phi) * dy) / a
            yr = (-np.sin(phi) * dx + np.cos(phi) * dy) / b
            inside = (xr ** 2 + yr ** 2)[None] + ((z - z0) / cz)[:, None, None] ** 2 <= 1
            out += np.float32(value) * inside
        return out

    def scale(self, max_absorption: float, angles: np.ndarray, centre_offset: float = 0.0) -> float:
        """The factor that makes the largest line integral over the projections at `angles` (radians)
        `max_absorption` (so the least transmission is exp(-max_absorption))."""
        peak = max(self.projection(float(t), centre_offset).max() for t in angles[:: max(1, len(angles) // 16)])
        return max_absorption / peak if peak > 0 else 1.0
