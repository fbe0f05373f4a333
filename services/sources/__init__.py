"""Source kinds: where a session's frames come from (`spec.source.kind`), one module per kind.

A kind is a `Source` subclass registered under the `detstream.sources` entry point, by the name the
manifest uses (see services/sources/README.md, "Adding a source kind"):

    [project.entry-points."detstream.sources"]
    simulator = "detstream.services.sources.simulator:SimulatorSource"

The manifest's `spec.source.kind` is checked against these names, and the CRD lists them (`make crd`).
A source stage builds one instance of its session's kind and sends whatever the instance yields:

    Frame(scan, frame, sectors)   a frame's pixels, as (sector number, rows x cols/sectors array) pairs
    ScanEnd(scan, frames, final)  the end of a scan this source knows of (`frames`: the scan's positions;
                                  `final`: the detector's own end, which only this replica heard of)
    Refused(reason, detail)       a message from the detector refused: the stage counts it by reason
    None                          nothing now (a push source waiting for its detector): the stage looks
                                  for Stop and drain, then asks again

so a kind may generate frames on demand in scan order (`GridSource`: the simulator, replay) or pass on
what a detector pushes, in the detector's order, where several source replicas each get some of the
frames and only one of them hears of a scan's start and end (as a DECTRIS DCU sends them).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np
import zmq

from detstream.services.model.schema import FieldError, did_you_mean

if TYPE_CHECKING:
    from detstream.services.model.session import SessionSpec

ENTRY_POINT_GROUP = "detstream.sources"
SHIPPED = ("simulator", "replay", "external", "dectris", "tomo-simulator", "dxchange")  # listed first, in this order


class Frame(NamedTuple):
    """One frame, or the part of it this source replica sends: (sector number, pixels) pairs, each
    pixels a C-contiguous (detector.rows, detector.cols / detector.sectors) array of detector.dtype, or a
    zmq.Frame of those bytes (a buffer the kind sends again and again: simulator.py)."""
    scan: int
    frame: int                 # the frame number, which is its scan position (row-major)
    sectors: Sequence[tuple[int, np.ndarray | zmq.Frame]]


class ScanEnd(NamedTuple):
    """This source has sent all it will of `scan`, a scan of `frames` positions. `final`: the detector
    ended the scan, which has `frames` frames (positions 0 .. frames-1); with several replicas on one
    detector only one hears of it (sent as DETECTOR_END: the lanes then close the scan once
    those frames are in, without waiting for the other replicas' ends)."""
    scan: int
    frames: int
    final: bool = False


class Refused(NamedTuple):
    """A message from the detector that this source refused: `reason` labels the source stage's
    detstream_rejected_messages_total (one of wire.REJECT_REASONS), `detail` says what was wrong."""
    reason: str
    detail: str


Item = Frame | ScanEnd | Refused | None


class SourceError(RuntimeError):
    """A source that cannot start: the message names the manifest field (e.g. spec.source.path) and the fix."""


class Source:
    """Base class of source kinds.

    `check` runs when a manifest is validated (`detstream validate`/`run`, the operator): problems it
    can see in the spec alone. The constructor runs in each source replica before anything is sent: it
    opens what the kind reads (a file, a detector's address) and raises SourceError if it cannot.
    Iterating yields `Item`s until the source has nothing more to send.
    """

    #: What `spec.source.kind`'s documentation (the CRD, the README's table) says of the kind.
    summary: ClassVar[str] = ""
    #: The kind passes on a detector's series (a DECTRIS DCU): each replica sends whole frames of the images
    #: it gets, and a scan starts when the detector starts it, however long after the previous one
    #: (dataplane/reassembly.py); otherwise replicas split every frame's sectors and scans follow each other.
    series: ClassVar[bool] = False

    @classmethod
    def check(cls, spec: SessionSpec) -> list[FieldError]:
        """Problems with the session's spec for this kind; empty when it can run."""
        return []

    def __init__(self, spec: SessionSpec, replica: int):
        self.spec = spec
        self.replica = replica  # 0 .. spec.source.replicas - 1

    def __iter__(self) -> Iterator[Item]:
        raise NotImplementedError


class GridSource(Source):
    """A source that can make any frame on demand: it sends the manifest's scans (spec.scan) in order,
    frame by frame, paced by spec.source.rate. Replica r of R sends the sectors r, r+R, r+2R ... of
    every frame, as the 4D Camera's receivers split them."""

    def __init__(self, spec: SessionSpec, replica: int):
        super().__init__(spec, replica)
        self.sectors = list(range(replica, spec.detector.sectors, spec.source.replicas))

    def sector(self, scan: int, frame: int, sector: int) -> np.ndarray | zmq.Frame:
        """Pixels of one sector of a frame: C-contiguous (detector.rows, detector.cols / sectors), or a zmq.Frame
        of them."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Item]:
        spec = self.spec
        wait = schedule(spec.source.rate)
        for scan in range(spec.scan.count):
            for frame in range(spec.scan.frames):
                wait(scan * spec.scan.frames + frame)
                yield Frame(scan, frame, [(s, self.sector(scan, frame, s)) for s in self.sectors])
            yield ScanEnd(scan, spec.scan.frames)


def schedule(rate: float):
    """A wait(n) that sleeps until frame n of the session is due at `rate` frames/s (0: never sleeps).
    One schedule for the whole session, not one per scan: a source held up for a moment (a busy core)
    catches up afterwards instead of staying behind the other sources for good, which would leave the
    workers holding half frames (up to frameTimeoutS) for the rest of the run."""
    t0 = time.monotonic()

    def wait(n: int) -> None:
        if rate:
            delay = t0 + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return wait


def _registered() -> dict:
    """The entry points of every installed source kind, by name: SHIPPED first, then the others by name."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {name: found[name] for name in sorted(found, key=lambda n: (SHIPPED.index(n) if n in SHIPPED else
                                                                       len(SHIPPED), n))}


def source_kinds() -> tuple[str, ...]:
    """The names `spec.source.kind` takes: every installed kind."""
    return tuple(_registered())


def source_class(kind: str) -> type[Source]:
    """The class of a source kind; LookupError naming the installed kinds when there is none."""
    found = _registered()
    if kind not in found:
        raise LookupError(f"unknown source kind {kind!r}{did_you_mean(kind, found)}; installed: "
                          f"{', '.join(found) or 'none'} (source kinds register under the "
                          f"{ENTRY_POINT_GROUP!r} entry point)")
    return found[kind].load()


def kinds_doc() -> str:
    """`spec.source.kind`'s documentation: each installed kind with its summary."""
    return "; ".join(f"{kind}: {source_class(kind).summary}" for kind in source_kinds()) + "."
