"""Python client of a session's live view: the live arrays as numpy, for notebooks.

    from detstream.services.results.client import LiveClient
    live = LiveClient("http://127.0.0.1:8765/")      # the URL `detstream run` prints
    live.scans()                                     # ids, shapes, geometry, progress, accounting
    bf = live.array("bright_field")                  # float32 (scan rows, scan cols), NaN not arrived yet
    images = live.arrays()                           # every live array of the latest scan, by name
    live.set_geometry(bright_field=20, annuli=[(40, 90)], centre="auto")

Plain HTTP with the standard library; arrays come as .npy (see detstream.services.results.web).
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

__all__ = ["LiveClient", "LiveViewError"]


class LiveViewError(RuntimeError):
    """The live view refused a request (unknown scan or array, bad geometry ...); the message is the server's."""


class LiveClient:
    """Read a live view at `url` (the page's address). `timeout`: seconds per request."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url if url.endswith("/") else url + "/"
        self.timeout = timeout

    def _request(self, path: str, data: bytes | None = None, method: str = "GET") -> bytes:
        request = urllib.request.Request(urllib.parse.urljoin(self.url, path), data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            raise LiveViewError(json.loads(e.read()).get("error", str(e))) from None

    def scans(self) -> list[dict]:
        """Per scan: id, scan_shape, frame_shape, geometry, centre, arrays (names), progress, accounting."""
        return json.loads(self._request("api/scans"))

    def _scan_id(self, scan) -> str:
        if scan is not None:
            return urllib.parse.quote(str(scan), safe="")
        scans = self.scans()
        if not scans:
            raise LiveViewError("no scan has started in this session yet")
        return urllib.parse.quote(scans[-1]["id"], safe="")

    def array(self, name: str, scan: str | int | None = None) -> np.ndarray:
        """One live array of `scan` (default: the latest): virtual images, com_x/y, dpc_x/y, idpc as float32
        (scan rows, scan cols), sum/max float32 (frame rows, frame cols), status uint8 (scan rows, scan cols)."""
        return np.load(io.BytesIO(self._request(f"api/scans/{self._scan_id(scan)}/arrays/{name}")))

    def arrays(self, scan: str | int | None = None) -> dict[str, np.ndarray]:
        """Every live array of `scan` (default: the latest), by name."""
        scan_id = self._scan_id(scan)
        names = next(s["arrays"] for s in self.scans() if urllib.parse.quote(s["id"], safe="") == scan_id)
        return {name: self.array(name, urllib.parse.unquote(scan_id)) for name in names}

    def stages(self) -> list[dict]:
        return json.loads(self._request("api/stages"))

    def set_geometry(self, bright_field: float, annuli=(), centre=None, scan: str | int | None = None) -> dict:
        """Recompute `scan`'s images (default: the latest) for a new detector geometry (pixels; centre (x, y),
        None for the frame centre, "auto" for the centre found in the summed pattern). Returns the geometry
        applied; LiveViewError with the server's reason when refused. Changes the view only, not the session."""
        body = json.dumps({"bright_field": bright_field, "annuli": [list(a) for a in annuli], "centre": centre})
        return json.loads(self._request(f"api/scans/{self._scan_id(scan)}/geometry", body.encode(), "PUT"))
