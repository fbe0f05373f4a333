"""The live store: what a session's live view serves, in the session's own process.

The writer's live feed opens a scan here (`open_scan`) and feeds the returned `ScanImages` (`add_events`, or
`add_reduced` + `add_patterns` for raw frames the workers reduced; `mark_lost`), or adds a tomography scan's
slices (`add_scan`, results/slices.py); it may attach the scan's accounting (`set_accounting`). The web app
(`detstream.services.results.web`) only reads, except for a scan's detector geometry, which changes what the
images show and nothing of the session.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from detstream.services.results.geometry import DetectorGeometry
from detstream.services.results.images import DEFAULT_KEEP_BYTES, ScanImages

__all__ = ["LiveStore", "MAX_SCANS", "ScanView"]

MAX_SCANS = 8  # scans a long session's store holds (each ~5 MB of 576x576 patterns and its images)


class ScanView(Protocol):
    """What the store serves of a scan: ScanImages (4D-STEM) or results.slices.ScanSlices (tomography)."""

    version: int

    @property
    def array_names(self) -> list[str]: ...

    def array(self, name: str) -> np.ndarray: ...

    def describe(self) -> dict: ...

    def found_centre(self) -> tuple[float, float] | None: ...

    def set_geometry(self, geometry: DetectorGeometry) -> None: ...

    def forget_events(self) -> None: ...


class LiveStore:
    """The scans of a session (in the order opened) with their live images and accounting, and the stage table.

    stage_table: a callable returning the session's stages as a list of JSON-able dicts (one row each); it is
    called by the web app's threads, so it must be thread-safe and quick.
    """

    def __init__(self, stage_table: Callable[[], list[dict]] = list, max_scans: int = MAX_SCANS):
        self._stage_table = stage_table
        self._scans: dict[str, ScanView] = {}
        self._accounting: dict[str, dict] = {}
        self._closed: list[str] = []  # in the order closed
        self.max_scans = max_scans
        self._lock = threading.Lock()

    def open_scan(self, scan: str | int, scan_shape: tuple[int, int], frame_shape: tuple[int, int],
                  geometry: DetectorGeometry, keep_bytes: int = DEFAULT_KEEP_BYTES) -> ScanImages:
        """Start the live images of scan `scan` (its id, shown on the page); ValueError if it is already open."""
        images = ScanImages(scan_shape, frame_shape, geometry, keep_bytes)
        self.add_scan(scan, images)
        return images

    def add_scan(self, scan: str | int, view: ScanView) -> None:
        """Serve `view` as scan `scan` (its id, shown on the page); ValueError if it is already open."""
        key = str(scan)
        with self._lock:
            if key in self._scans:
                raise ValueError(f"scan {key}: already open in the live store")
            self._scans[key] = view

    def close_scan(self, scan: str | int) -> None:
        """Scan `scan` takes no more data. What a long session holds stays bounded: the scans closed before it
        free their kept events (the open scans and the latest closed one still recompute for a new geometry),
        and the oldest closed scans leave the store past `max_scans`."""
        key = str(scan)
        with self._lock:
            for older in self._closed:
                self._scans[older].forget_events()
            self._closed.append(key)
            while len(self._scans) > self.max_scans and len(self._closed) > 1:
                gone = self._closed.pop(0)
                del self._scans[gone]
                self._accounting.pop(gone, None)

    def set_accounting(self, scan: str | int, accounting: dict[str, Any]) -> None:
        """Attach the scan's accounting (JSON-able: e.g. expected, written, partial, lost), shown as given."""
        with self._lock:
            self._accounting[str(scan)] = dict(accounting)

    def scan(self, scan: str | int) -> ScanView:
        """The live view of a scan; KeyError naming the known scans."""
        with self._lock:
            try:
                return self._scans[str(scan)]
            except KeyError:
                raise KeyError(f"scan {scan}: not in this session; known: {', '.join(self._scans) or 'none yet'}") \
                    from None

    def summary(self) -> list[dict]:
        """Per scan: id, its view's `describe()` (ScanImages: view "stem", scan_shape, frame_shape, geometry,
        centre, array names, progress; ScanSlices: view "slices" ...) and accounting."""
        with self._lock:
            scans, accounting = dict(self._scans), dict(self._accounting)
        return [{"id": key, **s.describe(), "accounting": accounting.get(key, {})} for key, s in scans.items()]

    def stage_table(self) -> list[dict]:
        return self._stage_table()
