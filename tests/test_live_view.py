"""The live view served by uvicorn on 127.0.0.1 while a feeder adds scan positions over time: the Python
client, a viewer that stops reading, and the page in Debian's chromium driven by Playwright."""

import io
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
from test_live_images import simulated_events

from detstream.services.results.client import LiveClient, LiveViewError
from detstream.services.results.geometry import DetectorGeometry
from detstream.services.results.store import LiveStore
from detstream.services.results.web import LiveServer

SCAN, SIZE, CENTRE = (24, 24), 64, (30, 33)


def wait_for(condition, timeout=60.0, what="condition"):
    """Poll until condition() is truthy (the bound only ends a hung test; nothing is timed)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)
    return result


@contextmanager
def chromium_page(url):
    """A page of Debian's chromium (Playwright, nothing downloaded) opened at `url`."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            yield page
        finally:
            browser.close()


class Feeder(threading.Thread):
    """Adds the scan row by row; `go` lets the next `step` rows in, so the test decides how far the scan is."""

    def __init__(self, images, frames):
        super().__init__(daemon=True)
        self.images, self.frames, self.rows_allowed, self.rows_done = images, frames, 0, 0
        self.changed = threading.Condition()

    def go(self, rows):
        with self.changed:
            self.rows_allowed = min(SCAN[0], self.rows_allowed + rows)
            self.changed.notify_all()

    def run(self):
        for row in range(SCAN[0]):
            with self.changed:
                self.changed.wait_for(lambda row=row: self.rows_allowed > row)
            positions = np.arange(row * SCAN[1], (row + 1) * SCAN[1])
            self.images.add_events(positions, [len(self.frames[p]) for p in positions],
                                   np.concatenate([self.frames[p] for p in positions]))
            self.rows_done = row + 1


@pytest.fixture
def live():
    frames = simulated_events(SCAN, SIZE, CENTRE, np.random.default_rng(1))
    store = LiveStore(lambda: [{"stage": "worker-0", "state": "RUNNING"}, {"stage": "writer", "state": "RUNNING"}])
    images = store.open_scan("scan-0", SCAN, (SIZE, SIZE), DetectorGeometry(6, ((10, 24),), CENTRE))
    server = LiveServer(store, interval=0.1)
    feeder = Feeder(images, frames)
    feeder.start()
    yield server, store, images, feeder
    feeder.go(SCAN[0])
    feeder.join()
    server.stop()


def test_client_reads_the_live_arrays_as_they_fill_in(live):
    server, store, images, feeder = live
    client = LiveClient(server.url)
    feeder.go(5)
    wait_for(lambda: feeder.rows_done == 5, what="5 rows")
    bright = client.array("bright_field")
    assert bright.shape == SCAN and bright.dtype == np.float32
    assert np.isfinite(bright[:5]).all() and np.isnan(bright[5:]).all()
    feeder.go(SCAN[0])
    wait_for(lambda: feeder.rows_done == SCAN[0], what="the whole scan")
    arrays = client.arrays("scan-0")
    assert set(arrays) == set(images.array_names)
    for name, array in arrays.items():
        np.testing.assert_allclose(array, images.array(name).astype(array.dtype), equal_nan=True, err_msg=name)
    (scan,) = client.scans()
    assert scan["progress"]["complete"] == SCAN[0] * SCAN[1] and scan["geometry"]["annuli"] == [[10, 24]]
    assert client.stages()[1] == {"stage": "writer", "state": "RUNNING"}

    applied = client.set_geometry(4, [(6, 12), (12, 30)], centre="auto")
    assert np.allclose(applied["centre"], CENTRE, atol=0.5)
    assert images.geometry.annuli == ((6, 12), (12, 30))
    np.testing.assert_array_equal(client.array("annular_dark_field_1"), images.array("annular_dark_field_1"))
    with pytest.raises(LiveViewError, match=r"^annuli\[0\]: inner radius"):
        client.set_geometry(4, [(12, 6)])
    with pytest.raises(LiveViewError, match="scan nope: not in this session; known: scan-0"):
        client.array("bright_field", scan="nope")


def test_viewers_of_one_version_share_its_encoding_and_a_newer_one_is_read_anew(live):
    """?version=V serves any kept encoding at least V new (the viewers of one event share one); a version past it,
    or none, reads the scan again; a version that is not an integer is refused by name."""
    server, store, images, feeder = live
    feeder.go(3)
    wait_for(lambda: feeder.rows_done == 3, what="3 rows")
    url = f"{server.url}api/scans/scan-0/arrays/bright_field"

    def get(query=""):
        with urllib.request.urlopen(url + query, timeout=10) as response:
            return np.load(io.BytesIO(response.read()))

    first = images.version
    at_first = get(f"?version={first}")
    assert np.isfinite(at_first[:3]).all() and np.isnan(at_first[3:]).all()
    feeder.go(3)
    wait_for(lambda: feeder.rows_done == 6, what="6 rows")
    np.testing.assert_array_equal(get(f"?version={first}"), at_first)  # kept: at least as new as asked
    for query in (f"?version={images.version}", ""):
        now = get(query)
        assert np.isfinite(now[:6]).all() and np.isnan(now[6:]).all(), query
    with pytest.raises(urllib.error.HTTPError) as refused:
        get("?version=latest")
    assert refused.value.code == 400
    assert json.loads(refused.value.read())["error"].startswith("version: must be an integer")


def test_a_viewer_that_stops_reading_is_dropped():
    """Events are large and change every 10 ms; a client that never reads fills the socket buffers and the
    server's send times out: the viewer is dropped while a reading viewer stays."""
    tick = iter(range(10**9))
    store = LiveStore(lambda: [{"tick": next(tick), "padding": "x" * 8000}])
    server = LiveServer(store, interval=0.01, send_timeout=3.0)
    host, port = server.url.split("//")[1].strip("/").split(":")
    request = f"GET /api/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    try:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((host, int(port)))
        stalled.sendall(request)
        reader = socket.create_connection((host, int(port)))
        reader.sendall(request)
        stop = threading.Event()

        def read():
            while not stop.is_set() and reader.recv(1 << 16):
                pass
        threading.Thread(target=read, daemon=True).start()
        wait_for(lambda: server.app.state.viewers == 2, what="two viewers")
        wait_for(lambda: server.app.state.viewers == 1, what="the stalled viewer to be dropped")
        time.sleep(1.0)  # the reading viewer is still served (its events keep coming)
        assert server.app.state.viewers == 1
        stop.set()
        stalled.close()
        reader.close()
    finally:
        server.stop()


def test_a_server_stopped_with_viewers_connected_logs_no_error():
    """The session ends while a viewer reads the events: its stream ends and the server stops without cancelling
    it, so the writer's log holds no traceback (uvicorn logs a cancelled response as an error)."""
    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.records = []

        def emit(self, record):
            self.records.append(record)
    store = LiveStore(lambda: [{"tick": time.monotonic()}])
    server = LiveServer(store, interval=0.05)
    collect = Collect()
    uvicorn_log = logging.getLogger("uvicorn.error")   # (uvicorn's loggers do not propagate to the root)
    uvicorn_log.addHandler(collect)
    host, port = server.url.split("//")[1].strip("/").split(":")
    try:
        viewers = [socket.create_connection((host, int(port))) for _ in range(2)]
        for viewer in viewers:
            viewer.sendall(f"GET /api/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert b"data:" in viewer.recv(1 << 16) + viewer.recv(1 << 16)
        wait_for(lambda: server.app.state.viewers == 2, what="two viewers")
        server.stop()
        assert server.app.state.viewers == 0
        assert [r.getMessage() for r in collect.records] == []
        for viewer in viewers:
            viewer.close()
    finally:
        uvicorn_log.removeHandler(collect)
        server.stop()


def test_page_in_chromium_fills_in_and_redraws_for_a_new_radius(live):
    server, store, images, feeder = live
    client = LiveClient(server.url)
    with chromium_page(server.url) as page:
        bright = page.locator('.panel[data-name="bright_field"]')

        def drawn_pixels():
            """Pixels of the bright-field canvas not in the page's colour for 'no data yet'."""
            return page.evaluate("""() => {
                const c = document.querySelector('.panel[data-name="bright_field"] canvas.image');
                if (!c) return 0;
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4) if (!(d[i] === 40 && d[i+1] === 60 && d[i+2] === 90)) n++;
                return n; }""")

        feeder.go(6)
        wait_for(lambda: feeder.rows_done == 6, what="6 rows")
        wait_for(lambda: drawn_pixels() == 6 * SCAN[1], what="6 rows drawn")
        feeder.go(SCAN[0])
        wait_for(lambda: drawn_pixels() == SCAN[0] * SCAN[1], what="the whole scan drawn")
        assert "576 complete, 0 partial, 0 lost" in page.locator("#progress").inner_text()
        assert "writer" in page.locator("#stages").inner_text()

        def shown_total():
            return float(bright.locator(".total").inner_text() or "nan")
        wait_for(lambda: shown_total() == np.nansum(client.array("bright_field").astype(float)),
                 what="the total shown to match the array")
        before = shown_total()

        page.fill("#bf", "12")
        page.click("#apply")
        wait_for(lambda: images.geometry.bright_field == 12, what="the typed radius applied")
        after = wait_for(lambda: shown_total() != before and shown_total(), what="the image redrawn")
        assert after == np.nansum(client.array("bright_field").astype(float))

        # a number shown under the pointer equals the array's value there
        box = bright.locator("canvas.image").bounding_box()
        row, col = 7, 17
        page.mouse.move(box["x"] + (col + 0.5) * box["width"] / SCAN[1],
                        box["y"] + (row + 0.5) * box["height"] / SCAN[0])
        shown = re.fullmatch(r"\((\d+), (\d+)\) = (\S+) complete", bright.locator(".hover").inner_text())
        assert (int(shown[1]), int(shown[2])) == (row, col)
        assert float(shown[3]) == client.array("bright_field")[row, col]

        # dragging the outer circle of the annulus outwards widens it on the server
        pattern = page.locator("#pattern-canvas").bounding_box()
        scale = pattern["width"] / SIZE
        x0, y0 = pattern["x"] + (CENTRE[0] + 0.5) * scale, pattern["y"] + (CENTRE[1] + 0.5) * scale
        page.mouse.move(x0 + 24 * scale, y0)
        page.mouse.down()
        page.mouse.move(x0 + 28 * scale, y0, steps=4)
        page.mouse.up()
        wait_for(lambda: images.geometry.annuli == ((10, 28),), what="the dragged radius applied")
        wait_for(lambda: json.loads(page.evaluate("JSON.stringify(scans[0].geometry.annuli)")) == [[10, 28]],
                 what="the page to show the dragged radius")


def test_page_of_a_raw_frame_scan_says_its_geometry_is_the_manifests():
    """Raw frames are reduced in the workers for the session's geometry: the page says so, and an edit shows the
    server's refusal while the images stay as they are."""
    store = LiveStore(lambda: [{"stage": "writer-0"}])
    images = store.open_scan("scan-0", (4, 4), (32, 32), DetectorGeometry(5, ((5, 12),)))
    images.add_frames(np.arange(16), np.random.default_rng(3).poisson(2.0, (16, 32, 32)).astype(np.uint16))
    server = LiveServer(store, interval=0.05)
    try:
        with chromium_page(server.url) as page:
            progress = page.locator("#progress")
            wait_for(lambda: "reduced in the workers" in progress.inner_text(), what="the raw-frames note")
            assert "patterns of 16 frames" in progress.inner_text()
            version = images.version
            page.fill("#bf", "9")
            page.click("#apply")
            wait_for(lambda: "spec.liveView.geometry" in page.locator("#error").inner_text(), what="the refusal shown")
            assert images.geometry.bright_field == 5 and images.version == version
    finally:
        server.stop()
