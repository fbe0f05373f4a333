"""The writer's live results: its results, every FLUSH_S, into the session's `LiveStore` a `LiveServer` serves.

`live_feed` gives the writer the feed of its session's result kind: `LiveResults` here for 4D-STEM, or
slices.LiveSlices for tomography. The writer knows only what they share: `add` (a written result), `flush`,
`takes`/`take` (the live-only messages: PATTERN here, PREVIEW there), `settling`, `close_scan`, `account`, `stop`.

Per result the writer only notes it (`add`: the scan, position, payload buffers and whether the frame is
partial); at most every FLUSH_S (`flush`, after a turn) each scan's batch becomes one `ScanImages.add_events`
(counted data: one uint32 payload part of linear pixel indices per frame) or `add_reduced` (raw frames, e.g.
from the noop plugin: the record the worker reduced the frame to, reduction.py; the writer gets no pixels for
the live view). So the per-message cost is a few list appends, and the numpy work is per batch (at a noop
session's rate a turn holds a result or two: a flush per turn cost the writer more than the results themselves).

Raw frames' summed and maximum patterns come from each worker in PATTERN messages (`add_pattern`), after the
results of the frames they cover. One is merged only when the writer took every frame it lists from that worker
(none was a duplicate): a frame is never in the patterns twice, and the scan's `pattern_frames` says how many
are. A scan waits for the patterns of the frames it took (`settling`, at most PATTERN_WAIT_S: a worker that died
never sends its last one) before it closes, so its file's patterns are whole.

At a scan's close (`close_scan`) its lost positions are marked, its accounting attached, and its images
returned for the scan's file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from detstream.services.dataplane.accounting import COMPLETE, PARTIAL
from detstream.services.dataplane.bands import Bands
from detstream.services.dataplane.wire import FRAME_BITS, PATTERN, Geometry, Header
from detstream.services.model.session import SessionSpec
from detstream.services.results.geometry import live_geometry
from detstream.services.results.images import ScanImages
from detstream.services.results.reduction import PATTERN_S, record_size, sum_dtype
from detstream.services.results.slices import LiveSlices
from detstream.services.results.store import LiveStore
from detstream.services.results.web import LiveServer

__all__ = ["LiveResults", "PATTERN_WAIT_S", "live_feed"]

PATTERN_WAIT_S = 4 * PATTERN_S  # a scan whose frames are all here waits this long at most for their patterns
FLUSH_S = 0.05  # the results noted go into the images at most this long after they came (the view's ~1 s)


def live_feed(spec: SessionSpec, kind: str, bands: Bands, host: str, port: int,
              stage_table: Callable[[], list[dict]], prefix: str = "") -> LiveResults | LiveSlices | None:
    """The writer's live view of a session whose plugin returns `kind` results: LiveResults (4D-STEM: "events",
    "frames"), LiveSlices (tomography: "volume", routed by `bands`), or None for a kind without one. Served on
    http://host:port/ and under `prefix`; raises as those do."""
    if kind in ("events", "frames"):
        return LiveResults(spec, kind, host, port, stage_table, prefix)
    if kind == "volume" and spec.tomography is not None:
        return LiveSlices(spec, bands, host, port, stage_table, prefix)
    return None


class LiveResults:
    """Live results of a session whose plugin returns `kind` ("events" or "frames") results, served on
    http://host:port/ and under `prefix` (port 0: any free one; `url` says which). Raises GeometryError for a bad
    spec.liveView.geometry, OSError when the port cannot be bound. `stage_table()` gives the page's stage rows."""

    def __init__(self, spec: SessionSpec, kind: str, host: str, port: int,
                 stage_table: Callable[[], list[dict]], prefix: str = ""):
        if kind not in ("events", "frames"):
            raise ValueError(f"live results take events or frames, not {kind!r} results")
        self.kind = kind
        self.takes = frozenset({PATTERN}) if kind == "frames" else frozenset()  # the live-only messages it takes
        self.detector = Geometry.of(spec)  # what a raw frame result is
        self.frame_shape = (self.detector.rows, self.detector.cols)
        self.geometry = live_geometry(spec.live_view.geometry, self.frame_shape)
        self.keep_bytes = spec.live_view.keep_mib * 2**20
        self.store = LiveStore(stage_table)
        self.scans: dict[int, ScanImages] = {}
        self.pending: dict[int, tuple[tuple[int, int], list[int], list[Sequence[Any]], list[bool]]] = {}
        self.record_bytes = record_size(self.geometry)
        self.unpatterned: dict[str, set[int]] = {}  # worker -> keys of raw frames taken from it, not in a pattern
        self.unpatterned_scans: Counter[int] = Counter()  # scan -> how many of those are its frames
        self.settling_since: dict[int, float] = {}
        self.flushed = 0.0  # monotonic time of the last flush
        self.server = LiveServer(self.store, host, port, prefix=prefix)
        self.url = self.server.url

    def add(self, scan: int, scan_shape: tuple[int, int], position: int, parts: Sequence[Any], partial: bool,
            sender: str = "", key: int = 0) -> bool:
        """Note one written result (its buffers are kept until `flush`); for raw frames, `parts` is the record the
        worker `sender` made of frame key `key`. False, and nothing noted, for a record not of this geometry."""
        if self.kind == "frames":
            if len(parts) != 1 or memoryview(parts[0]).nbytes != self.record_bytes:
                return False
            self.unpatterned.setdefault(sender, set()).add(key)
            self.unpatterned_scans[scan] += 1
        batch = self.pending.get(scan)
        if batch is None:
            batch = self.pending[scan] = (scan_shape, [], [], [])
        batch[1].append(position)
        batch[2].append(parts)
        batch[3].append(partial)
        return True

    def flush(self, now: float | None = None) -> None:
        """Add the results noted since the last flush to their scans' images (one numpy call per scan); given the
        time `now` (monotonic), only if FLUSH_S has passed since the last flush."""
        if now is not None:
            if now - self.flushed < FLUSH_S:
                return
            self.flushed = now
        pending, self.pending = self.pending, {}
        for scan, (scan_shape, positions, parts, partial) in pending.items():
            images = self.images(scan, scan_shape)
            status = np.where(partial, PARTIAL, COMPLETE).astype(np.uint8)
            if self.kind == "events":
                counts = [memoryview(p[0]).nbytes // 4 for p in parts]
                events = np.frombuffer(b"".join(p[0] for p in parts), np.uint32)
                images.add_events(positions, counts, events, status)
            else:
                records = np.frombuffer(b"".join(p[0] for p in parts), np.float64).reshape(len(parts), -1)
                images.add_reduced(positions, records, status)

    def take(self, header: Header, parts: Sequence[Any]) -> str | None:
        """A live-only message of a kind in `takes` (a PATTERN): `add_pattern`."""
        return self.add_pattern(header.sender, header.scan, parts)

    def add_pattern(self, sender: str, scan: int, parts: Sequence[Any]) -> str | None:
        """A worker's PATTERN for `scan`: parts = [sum, max, frame keys] (reduction.py). Merged when every frame
        it lists is one taken from `sender` and not yet in a pattern; else left out (their frames are not in the
        scan's patterns). Returns a refusal reason ("size") for parts of the wrong sizes, else None."""
        pixels = self.frame_shape[0] * self.frame_shape[1]
        sizes = [memoryview(p).nbytes for p in parts]
        if self.kind != "frames" or sizes[0] != pixels * sum_dtype(self.detector.dtype).itemsize \
                or sizes[1] != pixels * np.dtype(self.detector.dtype).itemsize or sizes[2] % 8:
            return "size"
        keys = set(np.frombuffer(parts[2], np.uint64).tolist())
        taken = self.unpatterned.setdefault(sender, set())
        covered = keys & taken
        taken -= covered
        for key in covered:
            self.unpatterned_scans[key >> FRAME_BITS] -= 1
        self.flush()  # the records first: the scan's images open, and agree with its patterns
        images = self.scans.get(scan)
        if covered == keys and images is not None and all(key >> FRAME_BITS == scan for key in keys):
            images.add_patterns(np.frombuffer(parts[0], sum_dtype(self.detector.dtype)).reshape(self.frame_shape),
                                np.frombuffer(parts[1], self.detector.dtype).reshape(self.frame_shape), len(keys))
        return None

    def settling(self, scan: int, now: float) -> bool:
        """Whether `scan`, all of whose frames are here, should wait for patterns of frames taken (a raw-frame
        scan, at most PATTERN_WAIT_S from the first time asked)."""
        if self.unpatterned_scans[scan] <= 0:
            return False
        since = self.settling_since.setdefault(scan, now)
        return now - since < PATTERN_WAIT_S

    def images(self, scan: int, scan_shape: tuple[int, int]) -> ScanImages:
        """The live images of `scan`, opened in the store at its first result."""
        images = self.scans.get(scan)
        if images is None:
            images = self.scans[scan] = self.store.open_scan(scan, scan_shape, self.frame_shape, self.geometry,
                                                             self.keep_bytes)
        return images

    def close_scan(self, scan: int, lost: np.ndarray, accounting: dict) -> ScanImages | None:
        """Scan `scan` closed: `lost` (linear positions) never came; `accounting` (JSON-able) is shown with it.
        Returns its images (None when nothing of it came), which take no more data."""
        self.flush()
        self.settling_since.pop(scan, None)
        if self.unpatterned_scans.pop(scan, 0):  # those frames' patterns never came: they stay out of them
            for taken in self.unpatterned.values():
                taken -= {key for key in taken if key >> FRAME_BITS == scan}
        images = self.scans.pop(scan, None)
        if images is None:
            return None
        images.mark_lost(lost)
        self.account(scan, accounting)
        self.store.close_scan(scan)
        return images

    def account(self, scan: int, accounting: dict) -> None:
        """Show `accounting` (JSON-able) with the scan."""
        self.store.set_accounting(scan, accounting)

    def stop(self) -> None:
        self.server.stop()
