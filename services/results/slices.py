"""The live view of a tomography session: chosen slices of each scan's volume forming as the projections arrive.

spec.liveView.slices chooses the slices (detector rows; default the middle one, `chosen_slices`). Routed by slice,
each worker owns a band of them (dataplane/bands.py): a worker whose band holds chosen slices sends the writer
those slices of its band so far every PREVIEW_S while the scan's frames come (PREVIEW: `SliceBand.volume` rows,
nothing reconstructed for it), and again from its band's final slices, the same array its VOLUME carries, so the
last view of a slice equals the file's. A band with none of them sends none. Cost: per chosen slice, cols x cols
float32 every PREVIEW_S (64 KiB at 128 x 128, 16 MiB at 2048 x 2048), and the writer keeps one such image per
chosen slice of the scans in its store.

`LiveSlices` is the writer's feed (the counterpart of feed.LiveResults for 4D-STEM): the frames' results
(`add`, `flush`: progress per frame), the previews (`take`) and the scan's accounting at its close, into a
`LiveStore` as `ScanSlices`, which the web app serves (arrays `slice_N`: float32 (cols, cols), NaN before the
first projection) and the page draws with a colour scale and contrast limits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from detstream.services.dataplane.accounting import COMPLETE, MISSING, PARTIAL
from detstream.services.dataplane.bands import Bands
from detstream.services.dataplane.wire import PREVIEW, Header, unpack_frames
from detstream.services.model.session import SessionSpec
from detstream.services.results.images import PENDING, RecomputeUnavailable
from detstream.services.results.store import LiveStore
from detstream.services.results.web import LiveServer

__all__ = ["ScanSlices", "LiveSlices", "chosen_slices", "band_previews", "PREVIEW_S"]

PREVIEW_S = 0.5  # a worker sends its chosen slices this often while a scan's frames come (the view's ~1-2 s)


def chosen_slices(spec: SessionSpec) -> list[int]:
    """The slices the live view shows, ascending: spec.liveView.slices, or the middle one (detector.rows // 2)."""
    return sorted(spec.live_view.slices) or [spec.detector.rows // 2]


def band_previews(spec: SessionSpec, first: int, count: int) -> list[int]:
    """The chosen slices in the band of slices [first, first + count), as indices into the band (ascending)."""
    return [s - first for s in chosen_slices(spec) if first <= s < first + count]


class ScanSlices:
    """The live slices of one tomography scan, thread-safe (the writer adds, the web app reads).

    `frames`: the scan's frames (darks, flats, projections, flats after); `projections`: the frame numbers
    [first, first + angles) that are projections; `slices`: the slice numbers shown, each a (cols, cols) image.
    `version` grows with every change; `array(name)` for name in `array_names` ("slice_N")."""

    view = "slices"

    def __init__(self, frames: int, projections: tuple[int, int], cols: int, slices: Sequence[int]):
        self.frames, self.projections, self.cols = frames, projections, cols
        self.status = np.full(frames, PENDING, np.uint8)
        self.images = {s: np.full((cols, cols), np.nan, np.float32) for s in slices}
        self.used = {s: 0 for s in slices}   # projections in each image
        self.version = 0
        self._lock = threading.Lock()

    def add_results(self, positions: Sequence[int], partial: Sequence[bool]) -> None:
        """Frames whose results came (a frame partial once stays partial: another band's strips were missing)."""
        at = np.asarray(positions, np.int64)
        with self._lock:
            first = self.status[at] == PENDING
            self.status[at[first]] = COMPLETE
            self.status[at[np.asarray(partial, bool)]] = PARTIAL
            self.version += 1

    def add_slices(self, slices: Sequence[int], images: np.ndarray, used: int) -> None:
        """The latest images (len(slices), cols, cols) of `slices`, made of `used` projections."""
        with self._lock:
            for s, image in zip(slices, images):
                self.images[s] = np.array(image, np.float32)
                self.used[s] = used
            self.version += 1

    def mark_lost(self, positions: np.ndarray) -> None:
        with self._lock:
            self.status[positions] = MISSING
            self.version += 1

    @property
    def array_names(self) -> list[str]:
        return [f"slice_{s}" for s in self.images]

    def array(self, name: str) -> np.ndarray:
        """A copy of slice N's image `slice_N`, float32 (cols, cols), rows y downwards as in the volume file;
        KeyError for an unknown name."""
        with self._lock:
            if name in self.array_names:
                return self.images[int(name.removeprefix("slice_"))].copy()
        raise KeyError(f"{name!r}: not a live array; known: {', '.join(self.array_names)}")

    def describe(self) -> dict:
        """What the page and the client read of the scan: the view, shapes, arrays, per slice the projections in
        its image, and progress (frames by state, projections arrived of those expected)."""
        with self._lock:
            counts = np.bincount(self.status, minlength=4)
            first, last = self.projections
            arrived = int(np.count_nonzero(np.isin(self.status[first:last], (COMPLETE, PARTIAL))))
            return {"view": self.view, "scan_shape": [1, self.frames], "frame_shape": [self.cols, self.cols],
                    "arrays": self.array_names,
                    "slices": [{"slice": s, "array": f"slice_{s}", "projections": self.used[s]} for s in self.images],
                    "progress": {"positions": self.frames, "complete": int(counts[COMPLETE]),
                                 "partial": int(counts[PARTIAL]), "lost": int(counts[MISSING]),
                                 "pending": int(counts[PENDING]), "version": self.version, "kind": "volume",
                                 "projections": last - first, "projections_arrived": arrived}}

    def set_geometry(self, geometry) -> None:
        raise RecomputeUnavailable("a tomography scan's live view shows slices: it has no detector geometry")

    def found_centre(self) -> None:
        return None

    def forget_events(self) -> None:
        """Nothing is kept but the images."""


class LiveSlices:
    """The live view of a tomography session (`spec.tomography`, routed by `bands`), served on
    http://host:port/ and under `prefix` (port 0: any free one; `url` says which). OSError when the port cannot be
    bound. `stage_table()` gives the page's stage rows."""

    takes = frozenset({PREVIEW})  # the live-only messages this feed takes (the writer hands them to `take`)

    def __init__(self, spec: SessionSpec, bands: Bands, host: str, port: int,
                 stage_table: Callable[[], list[dict]], prefix: str = ""):
        tomo = spec.tomography
        if tomo is None:
            raise ValueError("live slices need spec.tomography")
        self.tomo, self.bands, self.cols = tomo, bands, spec.detector.cols
        self.slices = chosen_slices(spec)
        self.band_slices = [[s for s in self.slices if lo <= s < lo + n] for lo, n in map(bands.slices,
                                                                                            range(bands.count))]
        self.store = LiveStore(stage_table)
        self.scans: dict[int, ScanSlices] = {}
        self.closed: set[int] = set()
        self.pending: dict[int, tuple[list[int], list[bool]]] = {}
        self.server = LiveServer(self.store, host, port, prefix=prefix)
        self.url = self.server.url

    def scan(self, scan: int) -> ScanSlices:
        """The live slices of `scan`, opened in the store at its first result or preview."""
        view = self.scans.get(scan)
        if view is None:
            first = self.tomo.first_projection
            view = self.scans[scan] = ScanSlices(self.tomo.frames, (first, first + self.tomo.angles), self.cols,
                                                 self.slices)
            self.store.add_scan(scan, view)
        return view

    def add(self, scan: int, scan_shape: tuple[int, int], position: int, parts: Sequence[Any], partial: bool,
            sender: str = "", key: int = 0) -> bool:
        """Note one written result (a band's result of frame `position`); shown at the next `flush`."""
        batch = self.pending.setdefault(scan, ([], []))
        batch[0].append(position)
        batch[1].append(partial)
        return True

    def flush(self, now: float | None = None) -> None:
        """The results noted since the last flush into their scans' progress."""
        pending, self.pending = self.pending, {}
        for scan, (positions, partial) in pending.items():
            if scan not in self.closed:
                self.scan(scan).add_results(positions, partial)

    def take(self, header: Header, parts: Sequence[Any]) -> str | None:
        """A PREVIEW: band `header.band`'s chosen slices of a scan and the bitmap of the projections in them.
        Returns why it is refused ("geometry": not that band's chosen slices; "late": its scan is closed), else
        None."""
        band = header.band
        if band >= self.bands.count or list(header.shape) != [len(self.band_slices[band]), self.cols, self.cols] \
                or memoryview(parts[1]).nbytes != (self.tomo.angles + 7) // 8:
            return "geometry"
        if header.scan in self.closed:
            return "late"
        images = np.frombuffer(parts[0], np.float32).reshape(tuple(header.shape))
        used = int(np.count_nonzero(unpack_frames(parts[1], self.tomo.angles)))
        self.scan(header.scan).add_slices(self.band_slices[band], images, used)
        return None

    def settling(self, scan: int, now: float) -> bool:
        """A scan waits for nothing of the live view (its slices are shown as they come)."""
        return False

    def close_scan(self, scan: int, lost: np.ndarray, accounting: dict) -> None:
        """Scan `scan` closed: `lost` (frame numbers) never came; `accounting` (JSON-able) is shown with it."""
        self.flush()
        self.closed.add(scan)
        view = self.scan(scan)
        view.mark_lost(lost)
        self.account(scan, accounting)
        self.store.close_scan(scan)
        del self.scans[scan]

    def account(self, scan: int, accounting: dict) -> None:
        """Show `accounting` (JSON-able) with the scan."""
        self.store.set_accounting(scan, accounting)

    def stop(self) -> None:
        self.server.stop()
