"""Processing plugins: what a worker does to each frame.

A plugin is a class registered under the `detstream.plugins` entry point, so a facility ships
its own in its own package (see README, "Writing a plugin"). The worker builds one instance,
calls `process` for every frame and `configure` when parameters change on a running session.
A plugin that reduces a whole scan in each worker (tomo-fbp: a band of slices) sets `by_slice`: each worker
then gets its band of rows of every frame (routing by slice, `session_bands`); it takes `process_frame` (the
frame's number too) and hands the writer `scan_output` when the worker has the scan, and the live view
`scan_preview` (the slices spec.liveView.slices chose) while the scan comes; it names the frames every band needs
first (`references`: tomo-fbp's darks and flats), which a band's worker restarted mid-scan gets again.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any, ClassVar

import numpy as np

from detstream.services.dataplane.bands import Bands
from detstream.services.model.schema import did_you_mean

ENTRY_POINT_GROUP = "detstream.plugins"


class Plugin:
    """Base class of processing plugins."""

    #: What `process` returns, and so what the writer does with it: "events" (uint32 pixel indices,
    #: written to the stempy HDF5 layout), "frames" (the frame itself, counted and discarded) or "volume"
    #: (a receipt per frame; the worker's band of slices at the end, `scan_output`).
    result: ClassVar[str] = "events"
    #: The pixel types (spec.detector.dtype) the plugin handles right; others are refused by validation.
    dtypes: ClassVar[tuple[str, ...]] = ("uint8", "uint16", "uint32", "float32")
    #: Whether the plugin reduces each scan per band of detector rows (the slices of a volume): then worker k
    #: gets band k's rows of every frame (routing by slice, dataplane/bands.py), and the session needs
    #: spec.tomography.
    by_slice: ClassVar[bool] = False
    #: While > 0 the plugin is not calibrated yet: the worker holds frames and calls `calibrate` first.
    samples_wanted: int = 0

    @classmethod
    def check_params(cls, params: dict) -> list[tuple[str, str]]:
        """Problems with `params` as (parameter name, what is allowed); empty when valid."""
        return []

    @classmethod
    def files(cls, params: dict) -> dict[str, str]:
        """The files these parameters make the plugin read in every worker, as {parameter name: path}. On
        Kubernetes the operator mounts the output volume claim read-only in the workers for them."""
        return {}

    @classmethod
    def halo_rows(cls, params: dict) -> int:
        """Routed by slice: how many neighbour rows each side of its band a worker needs too (a filter across
        the cut, e.g. Paganin's)."""
        return 0

    @classmethod
    def references(cls, spec) -> range:
        """Routed by slice: the frame numbers of each scan the plugin needs before the others in every band (tomo-fbp:
        the darks and flats). The sources keep them and send them again to a band's worker restarted mid-scan
        (REFERENCE, dataplane/references.py), which hands them to `process_frame` outside the accounting: the
        plugin must take a frame it already has as a no-op. Empty: none."""
        return range(0)

    @classmethod
    def samples(cls, params: dict) -> int:
        """How many of a scan's first frames (frame numbers 0, 1, ...) every worker calibrates on; 0 for none.
        The distributors send every worker a copy of the same frames, so all workers calibrate alike."""
        return 0

    def __init__(self, params: dict, context: PluginContext):
        self.context = context
        self.configure(params)

    def configure(self, params: dict) -> None:
        """Take new parameters (already checked by `check_params`), also while running."""
        self.params = dict(params)

    def calibrate(self, samples: list[list[np.ndarray]]) -> None:
        """Called once with the sample frames (each as its sectors), in frame-number order: all `samples(params)`
        of them, or fewer if some never arrived."""

    def calibration(self) -> dict:
        """What the scan's file must record of how frames were processed, as nested dicts of numbers, strings
        and booleans (written under the file's `metadata/` group); {} for nothing."""
        return {}

    def process(self, sectors: list[np.ndarray], parts: Sequence[Any]) -> Sequence[Any]:
        """Handle one frame, given as its sector strips (numpy views) and their raw buffers;
        return the result's payload parts."""
        raise NotImplementedError

    def process_frame(self, scan: int, frame: int, sectors: list[np.ndarray], parts: Sequence[Any]) -> Sequence[Any]:
        """`process` of frame number `frame` of scan `scan` (what the worker calls); a plugin that needs the
        frame's number overrides this one."""
        return self.process(sectors, parts)

    def scan_complete(self, scan: int) -> bool:
        """Whether this worker has every frame of `scan` the plugin needs (its `scan_output` is final then)."""
        return False

    def scan_output(self, scan: int, final: bool) -> list[np.ndarray] | None:
        """What the plugin made of `scan` so far, for the writer (a plugin that reduces whole scans: the
        worker's band of the volume and the projections it used), or None; `final`: the plugin may forget it."""
        return None

    def scan_preview(self, scan: int, slices: list[int]) -> list[np.ndarray] | None:
        """For the live view, while `scan` comes: rows `slices` (indices into the first axis) of what
        `scan_output` would give now, without changing or forgetting anything (cheap: the worker asks every
        PREVIEW_S), as [those rows float32, the bitmap of what they hold (tomo-fbp: the projections, per
        angle)]; None when there is nothing."""
        return None


class PluginContext:
    """What a plugin may know about the session: its spec (detector, scan, source), and, routed by slice
    (spec.tomography), the worker's band: its number `band`, the detector rows [lo, hi) its frames hold
    (`rows`: slices and halo) and its own slices (`slices`: first, count). Whole frames: band 0, every row."""

    def __init__(self, spec, band: int = 0, rows: tuple[int, int] | None = None,
                 slices: tuple[int, int] | None = None):
        self.spec = spec
        self.frame_shape = (spec.detector.rows, spec.detector.cols)
        self.band = band
        self.rows = rows or (0, spec.detector.rows)
        self.slices = slices or (0, spec.detector.rows)


def plugin_class(name: str) -> type[Plugin]:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        raise LookupError(f"unknown plugin {name!r}{did_you_mean(name, found)}; installed: "
                          f"{', '.join(sorted(found)) or 'none'} "
                          f"(plugins register under the {ENTRY_POINT_GROUP!r} entry point)")
    return found[name].load()


def session_bands(spec) -> Bands:
    """A session's bands of detector rows: one per worker replica (with the plugin's halo) when its plugin works
    `by_slice` on a tomography scan; else one band of every row (whole frames, routed by block)."""
    cls = plugin_class(spec.plugin.name)
    if not cls.by_slice or spec.tomography is None:
        return Bands(spec.detector.rows)
    return Bands(spec.detector.rows, min(max(spec.workers.replicas, 1), spec.detector.rows),
                 cls.halo_rows(spec.plugin.params))


def check_number(params: dict, key: str, minimum: float, problems: list, integer: bool = False) -> None:
    """Append a problem unless params[key] (if present) is a number >= minimum."""
    if key not in params:
        return
    value = params[key]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        what = "an integer" if integer else "a number"
        problems.append((key, f"must be {what} >= {minimum:g}; got {value!r}"))
