"""Result sinks: what the writer does with each kind of result a plugin returns, one module per sink.

A sink is a `ResultSink` subclass registered under the `detstream.sinks` entry point by the result kind
it takes (a plugin's `result`, e.g. "events"; see services/sinks/README.md, "Adding a result sink"):

    [project.entry-points."detstream.sinks"]
    events = "detstream.services.sinks.electron_events:ElectronEventsFile"

The writer opens one sink per scan (`open`, at the scan's first result), gives it every result once
(`write_result`) and, for a plugin that reduces whole scans per band (routing by slice), the workers' outputs
(`output_refusal`, `take_output`; the scan waits while `awaiting_outputs`), then at the scan's close its metadata
(`add_metadata`: the session's and the plugin's `calibration()`), what arrived where (`record_arrivals`), its live
images (`add_images`, with spec.liveView on) and `close` (the accounting line adds `record_fields()`); or `abort`
when the scan cannot be finished. A result kind with no sink ("frames", from the noop plugin) is counted and not kept,
unless spec.output.keepFrames: then raw_frames.py writes them (`session_sink`). Only then do the workers send
the writer the frames themselves (a frames result is otherwise a small record for the live view).

What every sink guarantees: it never writes over an existing file (the constructor refuses), and a file
at its path is complete (it writes elsewhere until `close`; `abort` leaves nothing behind).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from detstream.services.sinks.output import never_overwrite

if TYPE_CHECKING:
    from detstream.services.dataplane.bands import Bands
    from detstream.services.model.session import SessionSpec
    from detstream.services.results.images import ScanImages

ENTRY_POINT_GROUP = "detstream.sinks"


class ResultSink:
    """Base class of result sinks: one scan's results in one file at `path`.

    `scan_shape` (rows, cols) of scan positions, `frame_shape` (rows, cols) of detector pixels; `metadata`
    nested dicts of plain values the file records. Raises FileExistsError (saying why, and the fix) when
    `path` exists, OSError when it cannot be written. A subclass calls this constructor first.
    """

    #: The result kind (a plugin's `result`) this sink writes.
    result: ClassVar[str] = ""

    def __init__(self, path: Path, scan_shape: tuple[int, int], frame_shape: tuple[int, int],
                 metadata: dict | None = None):
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(never_overwrite(self.path))

    @classmethod
    def open(cls, path: Path, spec: SessionSpec, scan_shape: tuple[int, int], metadata: dict) -> ResultSink:
        """The writer's way in: the sink of one scan of `scan_shape` positions of a session of `spec`
        (a sink that needs more of the spec than the frame's shape, e.g. the pixel type, overrides this)."""
        return cls(path, scan_shape, (spec.detector.rows, spec.detector.cols), metadata)

    @classmethod
    def refusal(cls, parts: Sequence[Any], spec: SessionSpec) -> str | None:
        """Why a result's payload parts (buffers) cannot be written: a reason counted by the writer's
        refused-message metric ("size", "range"), or None when they can."""
        return None

    def write_result(self, position: int, parts: Sequence[Any]) -> None:
        """The result of the frame at linear scan position `position` (payload parts, as `refusal` accepted)."""
        raise NotImplementedError

    @classmethod
    def output_refusal(cls, spec: SessionSpec, slices: tuple[int, int], shape: tuple[int, ...],
                       parts: Sequence[Any]) -> str | None:
        """Why a worker's output of a scan (VOLUME: a plugin's `scan_output`, routing by slice) cannot be taken:
        of the band of slices (first, count), its `shape` and payload parts. A reason the writer counts ("kind":
        this sink takes no outputs), or None when `take_output` takes it."""
        return "kind"

    def take_output(self, slices: tuple[int, int], parts: Sequence[Any]) -> None:
        """A worker's output of the scan for the band of slices (first, count), as `output_refusal` accepted:
        the latest of each band stands."""
        raise NotImplementedError

    def awaiting_outputs(self, arrived: np.ndarray, bands: Bands) -> bool:
        """Whether the scan should wait for outputs to come (`take_output`) before it closes: `arrived` uint64 per
        frame, bit b set where band b of `bands` had its result whole."""
        return False

    def add_metadata(self, metadata: dict) -> None:
        """More metadata (nested dicts of plain values), before close."""
        raise NotImplementedError

    def record_arrivals(self, written: np.ndarray, sectors_arrived: np.ndarray, sectors: int, totals: dict) -> None:
        """What arrived per scan position, linear order: `written` (bool), `sectors_arrived` (uint64 bit masks
        of the `sectors` of a frame), and the scan's `totals` (name -> int: expected, written, lost ...)."""
        raise NotImplementedError

    def record_fields(self) -> dict:
        """What the scan's line of the accounting file adds (JSON-able), after `record_arrivals`: e.g. a volume's
        projections used and lost."""
        return {}

    def add_images(self, images: ScanImages) -> None:
        """The scan's live images (virtual images, centre of mass, patterns, position status), before close: a
        sink writes them where the field's tools read them; one that has no place for them keeps none."""

    def close(self) -> Path:
        """Finish the file and put it at `path`; returns `path`."""
        raise NotImplementedError

    def abort(self) -> None:
        """Give the scan up: no file is left at `path`, nor anything half-written."""
        raise NotImplementedError


def sink_class(result: str) -> type[ResultSink] | None:
    """The sink of a result kind, or None when results of that kind are not kept."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return found[result].load() if result in found else None


def session_sink(spec: SessionSpec, result: str) -> type[ResultSink] | None:
    """The sink a session's writer keeps results of kind `result` with: the registered one; for "frames",
    which are not kept by default (the noop plugin measures the framework), the raw frames file when
    spec.output.keepFrames asks for it; None: counted, not kept."""
    sink = sink_class(result)
    if sink is None and result == "frames" and spec.output.keep_frames:
        from detstream.services.sinks.raw_frames import RawFramesFile
        return RawFramesFile
    return sink
