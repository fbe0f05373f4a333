"""Virtual detector geometry on the diffraction pattern: a bright-field disc and annular dark fields.

Conventions are stempy's (`stempy/mask.cpp`, `createAnnularMask`): a pixel at column x, row y is in
the detector with radii (inner, outer) around centre (cx, cy) when inner**2 <= d2 < outer**2, with
d2 = (x - cx)**2 + (y - cy)**2; so the bright-field disc is the annulus (0, radius). stempy takes
integer radii and centre; the same rule applies to non-integer ones here. The default centre is
stempy's, (round(cols / 2), round(rows / 2)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DetectorGeometry", "GeometryError", "find_centre"]


class GeometryError(ValueError):
    """A detector geometry that cannot be used; the message names the field and what is allowed."""


def _number(value: Any, name: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise GeometryError(f"{name}: must be a number of pixels; got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise GeometryError(f"{name}: must be a finite number >= {minimum:g} pixels; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DetectorGeometry:
    """Where the virtual detectors sit on a frame, in pixels.

    centre:       (x, y) = (column, row) of the direct beam; None: the frame centre as stempy takes it
                  (or, in a scan, the centre found by `find_centre` once a summed pattern exists).
    bright_field: radius of the bright-field disc.
    annuli:       (inner, outer) radii of each annular dark field, inner < outer; any number, also none.
    Raises GeometryError naming the field for a negative, non-finite or non-numeric value, inner >= outer,
    or a centre outside the frame (checked by `masks`, which knows the frame).
    """

    bright_field: float
    annuli: tuple[tuple[float, float], ...] = ()
    centre: tuple[float, float] | None = None

    def __post_init__(self):
        object.__setattr__(self, "bright_field", _number(self.bright_field, "bright_field", 0.0))
        if self.bright_field == 0:
            raise GeometryError("bright_field: the disc radius must be > 0 pixels; got 0")
        annuli = []
        for i, pair in enumerate(self.annuli):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise GeometryError(f"annuli[{i}]: must be a pair [inner, outer] of radii; got {pair!r}")
            inner = _number(pair[0], f"annuli[{i}].inner")
            outer = _number(pair[1], f"annuli[{i}].outer")
            if inner >= outer:
                raise GeometryError(f"annuli[{i}]: inner radius ({inner:g}) must be less than outer ({outer:g})")
            annuli.append((inner, outer))
        object.__setattr__(self, "annuli", tuple(annuli))
        if self.centre is not None:
            if not isinstance(self.centre, (tuple, list)) or len(self.centre) != 2:
                raise GeometryError(f"centre: must be [x, y] in pixels (column, row); got {self.centre!r}")
            object.__setattr__(self, "centre", (_number(self.centre[0], "centre.x", -math.inf),
                                                _number(self.centre[1], "centre.y", -math.inf)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DetectorGeometry:
        """From {"bright_field": r, "annuli": [[inner, outer], ...], "centre": [x, y] or null} (JSON/YAML);
        unknown keys are refused by name."""
        if not isinstance(d, Mapping):
            raise GeometryError(f"geometry: must be a mapping with bright_field, annuli, centre; got {d!r}")
        unknown = set(d) - {"bright_field", "annuli", "centre"}
        if unknown:
            raise GeometryError(f"{sorted(unknown)[0]}: unknown geometry field; allowed: bright_field, annuli, centre")
        if "bright_field" not in d:
            raise GeometryError("bright_field: missing; give the bright-field disc radius in pixels")
        return cls(d["bright_field"], tuple(d.get("annuli") or ()), d.get("centre"))

    def to_dict(self) -> dict:
        return {"bright_field": self.bright_field, "annuli": [list(a) for a in self.annuli],
                "centre": None if self.centre is None else list(self.centre)}

    @property
    def names(self) -> list[str]:
        """Image names, in the order of `radii` and `masks`: "bright_field", "annular_dark_field_0", ..."""
        return ["bright_field"] + [f"annular_dark_field_{i}" for i in range(len(self.annuli))]

    @property
    def radii(self) -> list[tuple[float, float]]:
        """(inner, outer) of every detector, the bright field first as (0, radius)."""
        return [(0.0, self.bright_field), *self.annuli]

    def centre_in(self, frame_shape: tuple[int, int]) -> tuple[float, float]:
        """The centre (x, y) used on frames of `frame_shape` = (rows, cols): the given one, else stempy's default."""
        rows, cols = frame_shape
        if self.centre is None:
            return (float(round(cols / 2.0)), float(round(rows / 2.0)))
        x, y = self.centre
        if not (0 <= x < cols and 0 <= y < rows):
            raise GeometryError(f"centre: ({x:g}, {y:g}) is outside the {cols}x{rows} (columns x rows) frame")
        return (x, y)

    def masks(self, frame_shape: tuple[int, int]) -> np.ndarray:
        """bool (detectors, rows * cols): mask[d, p] is True where pixel p = row * cols + col is in detector d."""
        rows, cols = frame_shape
        cx, cy = self.centre_in(frame_shape)
        y, x = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
        d2 = (x - cx) ** 2 + (y - cy) ** 2
        return np.stack([(d2 >= inner ** 2) & (d2 < outer ** 2) for inner, outer in self.radii])

    def with_centre(self, centre: tuple[float, float] | None) -> DetectorGeometry:
        return DetectorGeometry(self.bright_field, self.annuli, centre)


def find_centre(pattern: np.ndarray, fraction: float = 0.5) -> tuple[float, float] | None:
    """Centre (x, y) of the direct beam in a summed diffraction pattern (rows, cols): the intensity-weighted
    centroid of the pixels at or above `fraction` of the maximum (the bright-field disc, which dominates a
    summed 4D-STEM pattern; the usual first estimate, as py4DSTEM's `get_probe_size` thresholds it).
    None when the pattern is empty."""
    pattern = np.asarray(pattern, dtype=np.float64)
    peak = pattern.max(initial=0.0)
    if not peak > 0:
        return None
    weights = np.where(pattern >= fraction * peak, pattern, 0.0)
    rows, cols = np.indices(pattern.shape)
    total = weights.sum()
    return (float((weights * cols).sum() / total), float((weights * rows).sum() / total))
