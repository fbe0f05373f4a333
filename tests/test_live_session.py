"""The live view of a real session: `detstream run` as a subprocess at a slow source rate, its page opened in
Debian's chromium (Playwright) while it runs, its images checked against the scan files and stempy, and many
viewers reading while it streams."""

import http.client
import threading
import urllib.parse

import h5py
import hdf5plugin  # noqa: F401  (the frames file's bitshuffle filter)
import numpy as np
import pytest
import stempy.image
import stempy.io

from detstream.services.results.client import LiveClient, LiveViewError
from detstream.services.results.geometry import DetectorGeometry
from detstream.services.results.images import COMPLETE

from helpers import manifest, wait_for
from live import Live

COUNTING = {"name": "electron-counting",
            "params": {"dark": "simulated", "backgroundThreshold": 32, "xrayThreshold": 50}}
SCAN = (24, 24)


def session(name, rate, count=2):
    return manifest(name, scan={"rows": SCAN[0], "cols": SCAN[1], "count": count}, plugin=COUNTING,
                    source={"rate": rate, "simulator": {"seed": 3, "electronsPerFrame": 40}},
                    liveView={"geometry": {"bright_field": 72, "annuli": [[72, 144]]}})


def stem_images(path):
    with h5py.File(path) as f:
        images = f["stem/images"]
        return images[()], dict(images.attrs), f["stem/position_status"][()]


def stempy_images(path, attrs):
    """stempy.image.create_stem_images on the file's own electron events, with the file's geometry; stempy sums
    0xFFFF per electron (see services/results/images.py)."""
    counted = stempy.io.load_electron_counts(path)
    centre = tuple(int(c) for c in attrs["centre"])
    return stempy.image.create_stem_images(counted, [int(r) for r in attrs["inner_radii"]],
                                           [int(r) for r in attrs["outer_radii"]], center=centre) / 0xFFFF


def test_page_of_a_running_session_fills_in_redraws_and_matches_the_file(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    live = Live(session("livepage", rate=80), tmp_path)
    url = live.plan.live_url()
    client = LiveClient(url, timeout=5)
    try:
        wait_for(lambda: live.proc.poll() is not None or _answers(client), what="the live view to answer")
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(url)
                page.wait_for_function("scans.length > 0 && current === '0'", timeout=60_000)

                def drawn():
                    """Positions the page holds for scan 0's bright field (finite values: arrived)."""
                    return page.evaluate("arrays.bright_field ? arrays.bright_field.data.filter(Number.isFinite)"
                                         ".length : 0")
                # images fill in: part of the scan shown while it streams, then more of it
                first = wait_for(lambda: 0 < (n := drawn()) < SCAN[0] * SCAN[1] and n, what="part of scan 0 drawn")
                wait_for(lambda: drawn() > first, what="more of scan 0 drawn")
                assert live.proc.poll() is None

                # a new radius redraws the whole scan so far (typed while scan 0 still streams)
                total = page.locator('.panel[data-name="bright_field"] .total')
                page.fill("#bf", "40")
                page.click("#apply")
                wait_for(lambda: client.scans()[0]["geometry"]["bright_field"] == 40, what="the radius applied")
                version = client.scans()[0]["progress"]["version"]
                wait_for(lambda: int(page.evaluate("document.body.dataset.version || -1")) >= version,
                         what="the page to redraw for the new radius")
                wait_for(lambda: client.scans()[0]["accounting"], timeout=120, what="scan 0 to close")
                closed = client.scans()[0]["progress"]["version"]
                wait_for(lambda: int(page.evaluate("document.body.dataset.version")) == closed,
                         what="the page to show scan 0 as closed")
                shown = np.array(page.evaluate("Array.from(arrays.bright_field.data)"), np.float64)
                shown_total = float(total.inner_text())
                box = page.locator('.panel[data-name="bright_field"] canvas.image').bounding_box()
                row, col = 5, 11
                page.mouse.move(box["x"] + (col + 0.5) * box["width"] / SCAN[1],
                                box["y"] + (row + 0.5) * box["height"] / SCAN[0])
                hover = page.locator('.panel[data-name="bright_field"] .hover').inner_text()
                assert live.proc.poll() is None, "the session ended before scan 0 was checked on the page"
            finally:
                browser.close()
        code, stderr, report = live.finish()
    finally:
        live.kill()
    assert code == 0, stderr
    assert f"live view of session livepage at {url}" in stderr
    assert [(s["expected"], s["written"], s["lost"], s["unaccounted"]) for s in report["scans"]] == \
        [(SCAN[0] * SCAN[1], SCAN[0] * SCAN[1], 0, 0)] * 2

    path = report["scans"][0]["file"]
    images, attrs, status = stem_images(path)
    assert list(attrs["names"]) == ["bright_field", "annular_dark_field_0"]
    assert list(attrs["outer_radii"]) == [40, 144]  # the page's radius reached the file
    assert (status == COMPLETE).all()
    # the numbers the page showed are the file's
    np.testing.assert_array_equal(shown.reshape(SCAN), images[0])
    assert shown_total == images[0].sum()
    assert hover == f"({row}, {col}) = {images[0][row, col]:g} complete"
    # and the file's images are stempy's on the file's own events
    np.testing.assert_array_equal(images, stempy_images(path, attrs))


def _answers(client):
    try:
        return client.scans() is not None
    except OSError:
        return False


class Viewer(threading.Thread):
    """Reads the live view's server-sent events as a browser's EventSource does; `reading=False` connects,
    asks, and never reads (a viewer that stopped)."""

    def __init__(self, url, reading=True):
        super().__init__(daemon=True)
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port, self.reading = parsed.hostname, parsed.port, reading
        self.events, self.last = 0, b""

    def run(self):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        connection.request("GET", "/api/events")
        response = connection.getresponse()
        if not self.reading:
            return  # keeps the connection open, unread, until the process ends
        for line in response:
            if line.startswith(b"data:"):
                self.events += 1
                self.last = line


def test_ten_viewers_read_while_the_session_completes_with_exact_accounting(tmp_path):
    live = Live(session("viewers", rate=150, count=3), tmp_path)
    url = live.plan.live_url()
    client = LiveClient(url, timeout=5)
    try:
        wait_for(lambda: live.proc.poll() is not None or _answers(client), what="the live view to answer")
        # the page is also served under /NAMESPACE/SESSION/, the path of its Ingress on Kubernetes
        assert LiveClient(url + "default/viewers/", timeout=5).scans() is not None
        viewers = [Viewer(url) for _ in range(10)] + [Viewer(url, reading=False)]
        for viewer in viewers:
            viewer.start()
        code, stderr, report = live.finish(timeout=180)
    finally:
        live.kill()
    assert code == 0, stderr
    expected = SCAN[0] * SCAN[1]
    assert [(s["expected"], s["written"], s["lost"], s["unaccounted"]) for s in report["scans"]] == \
        [(expected, expected, 0, 0)] * 3
    for viewer in viewers[:10]:
        viewer.join(30)
        assert viewer.events >= 3, "a viewer saw the session change fewer than 3 times"


def raw_session(name, keep_frames):
    return manifest(name, scan={"rows": 8, "cols": 8, "count": 2}, detector={"rows": 64, "cols": 64, "sectors": 4},
                    workers={"replicas": 2}, plugin={"name": "noop"}, source={"rate": 40},
                    output={"keepFrames": keep_frames},
                    liveView={"geometry": {"bright_field": 6, "annuli": [[6, 14], [14.5, 30]], "centre": [30, 33.5]}})


def test_raw_frames_are_reduced_in_the_workers_and_the_file_matches_numpy(tmp_path):
    """A noop session (raw frames): the workers reduce each frame, so the writer gets a 48-byte record per frame and
    no pixels; with keepFrames it also gets the frames, and its stem/ images equal numpy's on them; a new geometry
    is refused, saying why."""
    record = 8 * (3 + 3)  # three detectors, total, x and y moments
    for keep in (False, True):
        live = Live(raw_session(f"raw{int(keep)}", keep), tmp_path / f"keep{int(keep)}")
        client = LiveClient(live.plan.live_url(), timeout=5)
        try:
            live.wait_started(frames=10)
            status = live.status("writer-0")
            per_frame = 64 * 64 * 2 if keep else 0
            assert status.bytes_in == status.frames_in * (record + per_frame)
            with pytest.raises(LiveViewError, match="reduced in the workers.*spec.liveView.geometry"):
                client.set_geometry(10, [(10, 20)])
            code, stderr, report = live.finish(timeout=120)
        finally:
            live.kill()
        assert code == 0, stderr
        assert [(s["expected"], s["written"], s["lost"]) for s in report["scans"]] == [(64, 64, 0)] * 2
    geometry = DetectorGeometry(6, ((6, 14), (14.5, 30)), (30, 33.5))
    masks = geometry.masks((64, 64))
    y, x = np.indices((64, 64))
    for scan in report["scans"]:
        with h5py.File(scan["file"]) as f:
            frames = f["frames"][()].reshape(64, 64 * 64).astype(np.float64)
            images, com, status = f["stem/images"][()], f["stem/com"][()], f["stem/position_status"][()]
            sum_pattern, max_pattern = f["stem/sum_pattern"], f["stem/max_pattern"][()]
            assert (status == COMPLETE).all() and sum_pattern.attrs["frames"] == 64
            np.testing.assert_array_equal(sum_pattern[()], frames.sum(axis=0).reshape(64, 64))
            np.testing.assert_array_equal(max_pattern, frames.max(axis=0).reshape(64, 64))
        for image, mask in zip(images, masks):
            np.testing.assert_array_equal(image.ravel(), frames[:, mask].sum(axis=1))
        expected_com = np.stack([frames @ x.ravel(), frames @ y.ravel()]) / frames.sum(axis=1)
        np.testing.assert_allclose(com.reshape(2, -1), expected_com)
