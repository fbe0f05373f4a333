"""The live view: a small read-only web app over a `LiveStore`, served by uvicorn.

Starlette + uvicorn + server-sent events (sse-starlette): an ASGI app of a few routes, no template engine,
no widget framework. Bokeh/Panel (the field's choice) would bring a Tornado server, a websocket protocol
and ~10 MB of JS for what is here one HTML file of plain JS drawing arrays into canvases.

Routes (all GET except the geometry):
  /                                  the page (live.html)
  /api/scans                         JSON: per scan id, shapes, geometry, centre, array names, progress, accounting
  /api/scans/{scan}/arrays/{name}    one live array as a .npy file (numpy.load reads it; the page parses it):
                                     float arrays as float32 (exact for counts < 2**24 per position), status uint8.
                                     Compact binary rather than PNG so that contrast and colour change in the
                                     browser without a new request, the page shows true values, and the same
                                     bytes serve the Python client. ?version=V (the scan's progress.version an
                                     event or a geometry change gave): any encoding at least that new will do, so
                                     the viewers of one event share one encoding; without it: the latest.
  PUT /api/scans/{scan}/geometry     JSON {"bright_field": r, "annuli": [[in, out], ...], "centre": [x, y] | null
                                     | "auto"}: recompute the scan's images for it ("auto": the centre found in
                                     the summed pattern). Changes what every viewer sees, nothing of the session.
                                     400 naming the field for a bad geometry, 409 when the scan's events were not
                                     kept (see ScanImages).
  /api/stages                        JSON: the stage table
  /api/events                        server-sent events: {"scans": [...summary...], "stages": [...]} every
                                     `interval` seconds when something changed, made once for all viewers. A
                                     viewer whose connection does not take an event within `send_timeout`
                                     seconds is dropped: the server keeps no queue per viewer, only the latest
                                     state.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import socket
import threading
import time
from importlib.resources import files
from types import SimpleNamespace

import numpy as np
import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route

from detstream.services.results.geometry import DetectorGeometry, GeometryError
from detstream.services.results.images import RecomputeUnavailable
from detstream.services.results.store import LiveStore

__all__ = ["create_app", "LiveServer"]


def _npy(array: np.ndarray) -> bytes:
    if array.dtype.kind == "f":
        array = array.astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(store: LiveStore, interval: float = 0.5, send_timeout: float = 10.0, prefix: str = "") -> Starlette:
    """The ASGI app of the live view over `store` (routes above). `interval`: seconds between event checks;
    `send_timeout`: seconds a viewer may take to accept one event before it is dropped; `prefix` (e.g.
    "/lab/demo"): the routes are served under it too (behind an Ingress that does not rewrite paths; the page's
    own requests are relative). app.state.viewers counts the open event streams."""
    page = files("detstream.services.results").joinpath("live.html").read_text()

    async def index(request: Request):
        return HTMLResponse(page)

    async def scans(request: Request):
        return JSONResponse(await run_in_threadpool(store.summary))

    async def stages(request: Request):
        return JSONResponse(await run_in_threadpool(store.stage_table))

    def scan_of(request: Request):
        return store.scan(request.path_params["scan"])

    # The encoded arrays of the last scan asked for, per name, with the version they were read at: all
    # viewers of a scan share one encoding (and one iDPC integration) per change, or per event with ?version;
    # memory: one scan's arrays.
    encoded: dict[tuple[str, str], tuple[int, bytes]] = {}
    encoded_lock = threading.Lock()

    def cached_npy(scan_id: str, name: str, wanted: int) -> bytes | None:
        """The encoding of `name` if one at least as new as version `wanted` is kept (-1: the scan's latest)."""
        with encoded_lock:
            cached = encoded.get((scan_id, name))
        if cached is None or cached[0] < (store.scan(scan_id).version if wanted < 0 else wanted):
            return None
        return cached[1]

    def npy_of(scan_id: str, name: str, wanted: int) -> bytes:
        data = cached_npy(scan_id, name, wanted)
        if data is None:
            scan = store.scan(scan_id)
            version = scan.version  # read first: the array read after it is at least this new
            data = _npy(scan.array(name))
            with encoded_lock:
                for key in [key for key in encoded if key[0] != scan_id]:
                    del encoded[key]
                encoded[(scan_id, name)] = (version, data)
        return data

    async def array(request: Request):
        scan_id, name = request.path_params["scan"], request.path_params["name"]
        try:
            wanted = int(request.query_params.get("version", -1))
        except ValueError:
            return _error(400, f"version: must be an integer (a scan's progress.version); got "
                               f"{request.query_params['version']!r}")
        try:  # a kept encoding is served from here, without a thread of the pool
            data = cached_npy(scan_id, name, wanted) or await run_in_threadpool(npy_of, scan_id, name, wanted)
        except KeyError as e:
            return _error(404, e.args[0])
        return Response(data, media_type="application/octet-stream", headers={"Cache-Control": "no-store"})

    async def geometry(request: Request):
        try:
            scan = scan_of(request)
            body = await request.json()
            centre = body.get("centre") if isinstance(body, dict) else None
            if centre == "auto":
                body = {**body, "centre": await run_in_threadpool(scan.found_centre)}
            new = DetectorGeometry.from_dict(body)
            await run_in_threadpool(scan.set_geometry, new)
        except KeyError as e:
            return _error(404, e.args[0])
        except json.JSONDecodeError as e:
            return _error(400, f"geometry: not JSON ({e})")
        except GeometryError as e:
            return _error(400, str(e))
        except RecomputeUnavailable as e:
            return _error(409, str(e))
        return JSONResponse({"geometry": scan.geometry.to_dict(), "centre": list(scan.centre), "version": scan.version})

    # The event all viewers are sent: made at most once per half interval, whatever the number of viewers.
    event = SimpleNamespace(at=-math.inf, data="")
    event_lock = threading.Lock()

    def latest_event() -> str:
        with event_lock:
            if time.monotonic() - event.at >= interval / 2:
                event.data = json.dumps({"scans": store.summary(), "stages": store.stage_table()})
                event.at = time.monotonic()
            return event.data

    async def events(request: Request):
        async def stream():
            request.app.state.viewers += 1
            try:
                last = None
                while not request.app.state.ending.is_set():   # the server stops: the stream ends, cleanly
                    data = await run_in_threadpool(latest_event)
                    if data != last:
                        yield {"data": data}
                        last = data
                    await asyncio.sleep(interval)
            finally:
                request.app.state.viewers -= 1
        return EventSourceResponse(stream(), send_timeout=send_timeout, ping=15)

    routes = [
        Route("/", index),
        Route("/api/scans", scans),
        Route("/api/stages", stages),
        Route("/api/scans/{scan}/arrays/{name}", array),
        Route("/api/scans/{scan}/geometry", geometry, methods=["PUT"]),
        Route("/api/events", events),
    ]
    app = Starlette(routes=[*routes, Mount(prefix.rstrip("/"), routes=routes)] if prefix.strip("/") else routes)
    app.state.viewers = 0
    app.state.ending = threading.Event()   # set by LiveServer.stop: open event streams end
    return app


class LiveServer:
    """The live view served by uvicorn in a background thread of this process.

    host, port: where to listen (port 0: any free port); `url` is the page's address once constructed.
    Raises OSError (e.g. the port is taken) from the constructor. `stop()` ends it and waits for the thread: the
    viewers' event streams end first (within one event `interval`), so uvicorn's graceful shutdown finds no
    response running and cancels none (a cancelled stream logs a traceback).
    """

    def __init__(self, store: LiveStore, host: str = "127.0.0.1", port: int = 0, **app_options):
        self._socket = socket.create_server((host, port))
        bound_host, bound_port = self._socket.getsockname()[:2]
        self.url = f"http://{bound_host}:{bound_port}/"
        self.app = create_app(store, **app_options)
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="live-view", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.app.state.ending.set()
        self._server.should_exit = True
        self._thread.join()
        self._socket.close()
