"""The live view of a tomography session: `detstream run` as a subprocess at a slow source rate, its chosen slices
read with the Python client and in Debian's chromium (Playwright) while the projections arrive, and checked
against the volume files at the end; and spec.liveView.slices' validation."""

import math
import re

import h5py
import numpy as np
import pytest
from test_live_session import _answers
from test_tomo_session import ANGLES, FRAMES, SIZE, tomo_doc

from detstream.services.model.schema import SpecError
from detstream.services.model.session import load_session
from detstream.services.results.client import LiveClient

from helpers import wait_for
from live import Live


def two_scans(name, rate, **spec):
    """tomo_doc's session with two scans: scan 0 closes (and is checked on the live view) while scan 1 streams."""
    doc = tomo_doc(name, rate=rate, **spec)
    doc["spec"]["scan"]["count"] = 2
    return doc


def started(live):
    """The live view's client once it answers."""
    client = LiveClient(live.plan.live_url(), timeout=5)
    wait_for(lambda: live.proc.poll() is not None or _answers(client), what="the live view to answer")
    return client


def finished(live):
    """The session's end: it succeeded, every frame of both scans accounted; returns the report's scans."""
    code, stderr, report = live.finish()
    assert code == 0, stderr
    assert f"live view of session {live.name} at {live.plan.live_url()}" in stderr
    assert [(s["written"], s["lost"], s["unaccounted"], s["volume"]["complete"]) for s in report["scans"]] == \
        [(FRAMES, 0, 0, True)] * 2
    return report["scans"]


def volume_of(path):
    with h5py.File(path) as f:
        return f["exchange/data"][()]


def test_chosen_slices_form_as_projections_arrive_and_end_as_the_files(tmp_path):
    """Two slices, one in each worker's band: the client sees each made of more projections over time, and at
    scan 0's close the very slices of its volume file, and its accounting."""
    live = Live(two_scans("tlive", rate=30, liveView={"slices": [40, 20]}), tmp_path)
    try:
        client = started(live)
        seen: dict[int, np.ndarray] = {}   # projections in slice 20's image -> that image

        def scan0_closed():
            scans = client.scans()
            if not scans:
                return None
            scan = scans[0]
            used = {s["slice"]: s["projections"] for s in scan["slices"]}
            if 0 < used[20] < ANGLES and used[20] not in seen:
                seen[used[20]] = client.array("slice_20", scan=0)
            return scan if scan["accounting"] else None
        scan = wait_for(scan0_closed, timeout=120, what="scan 0 to close")
        final = client.arrays(scan=0)
        assert live.proc.poll() is None, "the session ended before scan 0 was read"
        files = finished(live)
    finally:
        live.kill()

    assert scan["view"] == "slices" and scan["arrays"] == ["slice_20", "slice_40"]
    assert [s["projections"] for s in scan["slices"]] == [ANGLES, ANGLES]
    assert scan["progress"]["projections_arrived"] == ANGLES
    assert scan["accounting"]["volume"] == files[0]["volume"]
    assert scan["accounting"]["written"] == files[0]["written"]
    # the slice formed: images of ever more projections, each different
    assert len(seen) >= 2, f"slice 20 seen made of {sorted(seen)} projections only"
    images = [seen[n] for n in sorted(seen)]
    assert all(not np.array_equal(a, b) for a, b in zip(images, images[1:]))
    # the last live images are the file's slices, exactly
    volume = volume_of(files[0]["file"])
    np.testing.assert_array_equal(final["slice_20"], volume[20])
    np.testing.assert_array_equal(final["slice_40"], volume[40])
    assert final["slice_20"].dtype == np.float32 and final["slice_20"].shape == (SIZE, SIZE)


def test_page_of_a_running_tomography_session_shows_the_slice_forming_and_the_files_numbers(tmp_path):
    """The default slice (the middle one) on the page: it changes as projections arrive; once scan 0 closed, the
    value under the pointer, the total shown and the accounting are the file's."""
    playwright = pytest.importorskip("playwright.sync_api")
    live = Live(two_scans("tpage", rate=30), tmp_path)
    middle = SIZE // 2
    panel = f'.panel[data-name="slice_{middle}"]'
    try:
        client = started(live)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(live.plan.live_url())
                page.wait_for_function("scans.length > 0 && current === '0'", timeout=60_000)
                assert page.locator("#pattern-panel").is_hidden()

                def shown():
                    """(projections the page says the slice holds, the canvas' pixels) while part of the scan came."""
                    note = page.locator(f"{panel} .note")
                    found = re.match(r"(\d+) of (\d+) projections", note.inner_text()) if note.count() else None
                    pixels = page.evaluate(f"""() => {{ const c = document.querySelector('{panel} canvas.image');
                        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }}""")
                    return int(found[1]), pixels if found and int(found[2]) == ANGLES else None

                first = wait_for(lambda: (s := shown()) and 0 < s[0] < ANGLES and s, what="part of the slice shown")
                later = wait_for(lambda: (s := shown()) and s[0] > first[0] and s, what="more of the slice shown")
                assert later[1] != first[1], "the slice image did not change as projections arrived"
                assert live.proc.poll() is None

                wait_for(lambda: client.scans()[0]["accounting"], timeout=120, what="scan 0 to close")
                closed = client.scans()[0]["progress"]["version"]
                wait_for(lambda: int(page.evaluate("document.body.dataset.version")) == closed,
                         what="the page to show scan 0 as closed")
                progress = page.locator("#progress").inner_text()
                total = float(page.locator(f"{panel} .total").inner_text())
                box = page.locator(f"{panel} canvas.image").bounding_box()
                row, col = 30, 25
                page.mouse.move(box["x"] + (col + 0.5) * box["width"] / SIZE,
                                box["y"] + (row + 0.5) * box["height"] / SIZE)
                hover = page.locator(f"{panel} .hover").inner_text()
                assert live.proc.poll() is None, "the session ended before scan 0 was checked on the page"
            finally:
                browser.close()
        files = finished(live)
    finally:
        live.kill()

    volume = volume_of(files[0]["file"])[middle]
    assert f"{ANGLES}/{ANGLES} projections arrived" in progress
    assert f"projections used {ANGLES}, projections lost 0" in progress
    shown = re.fullmatch(r"\((\d+), (\d+)\) = (\S+)", hover)
    assert shown and (int(shown[1]), int(shown[2])) == (row, col)
    assert float(shown[3]) == float(volume[row, col])
    page_sum = 0.0   # the page's own sum: the finite values in order, in doubles, to 10 significant digits
    for value in volume.ravel().tolist():
        if math.isfinite(value):
            page_sum += value
    assert total == float(f"{page_sum:.10g}")


@pytest.mark.parametrize("slices, message", [
    ([64], r"spec.liveView.slices: slice numbers are detector rows, from 0 to 63 \(detector.rows - 1\); got \[64\]"),
    ([3, 3], r"spec.liveView.slices: at most 16 distinct slice numbers; got \[3, 3\]"),
    (list(range(17)), r"spec.liveView.slices: at most 16 distinct slice numbers"),
    (["middle"], r"spec.liveView.slices: must be a list of integers, got \['middle'\]"),
])
def test_chosen_slices_are_checked_naming_the_field_and_the_range(slices, message):
    with pytest.raises(SpecError, match=message):
        load_session(tomo_doc("bad", liveView={"slices": slices}))


def test_slices_are_refused_for_a_session_without_tomography():
    doc = tomo_doc("stem", liveView={"slices": [3]})
    del doc["spec"]["tomography"]
    doc["spec"].update(source={"kind": "simulator"}, plugin={"name": "noop"}, scan={"rows": 4, "cols": 4})
    with pytest.raises(SpecError, match=r"spec.liveView.slices: only a tomography session \(spec.tomography\) "
                                        r"shows slices; remove it"):
        load_session(doc)
