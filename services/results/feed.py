"""The writer's live results: each turn's results into the session's `LiveStore`, served by a `LiveServer`.

Per result the writer only notes it (`add`: the scan, position, payload buffers and whether the frame is
partial); once per turn (`flush`) each scan's batch becomes one `ScanImages.add_events` (counted data: one
uint32 payload part of linear pixel indices per frame) or `add_frames` (raw frames, e.g. from the noop plugin:
the frame's sector strips, joined into (rows, cols)). So the per-message cost is a few list appends, and the
numpy work is per batch (of up to the writer's TURN messages). At a scan's close (`close_scan`) its lost
positions are marked, its accounting attached, and its images returned for the scan's file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from detstream.services.dataplane.accounting import COMPLETE, PARTIAL
from detstream.services.dataplane.wire import Geometry
from detstream.services.model.session import SessionSpec
from detstream.services.results.geometry import live_geometry
from detstream.services.results.images import ScanImages
from detstream.services.results.store import LiveStore
from detstream.services.results.web import LiveServer

__all__ = ["LiveResults"]


class LiveResults:
    """Live results of a session whose plugin returns `kind` ("events" or "frames") results, served on
    http://host:port/ and under `prefix` (port 0: any free one; `url` says which). Raises GeometryError for a bad
    spec.liveView.geometry, OSError when the port cannot be bound. `stage_table()` gives the page's stage rows."""

    def __init__(self, spec: SessionSpec, kind: str, host: str, port: int,
                 stage_table: Callable[[], list[dict]], prefix: str = ""):
        if kind not in ("events", "frames"):
            raise ValueError(f"live results take events or frames, not {kind!r} results")
        self.kind = kind
        self.detector = Geometry.of(spec)  # what a raw frame result is
        self.frame_shape = (self.detector.rows, self.detector.cols)
        self.geometry = live_geometry(spec.live_view.geometry, self.frame_shape)
        self.keep_bytes = spec.live_view.keep_mib * 2**20
        self.store = LiveStore(stage_table)
        self.scans: dict[int, ScanImages] = {}
        self.pending: dict[int, tuple[tuple[int, int], list[int], list[Sequence[Any]], list[bool]]] = {}
        self.server = LiveServer(self.store, host, port, prefix=prefix)
        self.url = self.server.url

    def add(self, scan: int, scan_shape: tuple[int, int], position: int, parts: Sequence[Any], partial: bool) -> bool:
        """Note one written result (its buffers are kept until `flush`). False, and nothing noted, for raw frames
        that are not this session's `sectors` strips of the detector's shape (they are written, not shown)."""
        if self.kind == "frames" and not self.detector.is_frame(parts):
            return False
        batch = self.pending.get(scan)
        if batch is None:
            batch = self.pending[scan] = (scan_shape, [], [], [])
        batch[1].append(position)
        batch[2].append(parts)
        batch[3].append(partial)
        return True

    def flush(self) -> None:
        """Add the results noted since the last flush to their scans' images (one numpy call per scan)."""
        pending, self.pending = self.pending, {}
        for scan, (scan_shape, positions, parts, partial) in pending.items():
            images = self.images(scan, scan_shape)
            status = np.where(partial, PARTIAL, COMPLETE).astype(np.uint8)
            if self.kind == "events":
                counts = [memoryview(p[0]).nbytes // 4 for p in parts]
                events = np.frombuffer(b"".join(p[0] for p in parts), np.uint32)
                images.add_events(positions, counts, events, status)
            else:
                images.add_frames(positions, np.stack([self.detector.frame(p) for p in parts]), status)

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
        images = self.scans.pop(scan, None)
        if images is None:
            return None
        images.mark_lost(lost)
        self.store.set_accounting(scan, accounting)
        self.store.close_scan(scan)
        return images

    def stop(self) -> None:
        self.server.stop()
