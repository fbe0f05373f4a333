"""The live table of `detstream run`: steady rates from the stages' own counters and clocks."""

import re
import time

from rich.console import Console
from test_tomo_session import FRAMES, tomo_doc

from detstream.services.launcher.progress import Progress, Rate
from detstream.services.launcher.runner import LocalSession
from detstream.services.model.session import load_session
from detstream.v1.control_pb2 import FINISHED

from helpers import manifest

RATE = 40  # frames/s: slow, so that any machine keeps up


def test_rate_from_status_samples_polled_twice_as_often():
    # what the launcher sees: a status every 0.5 s of the stage's clock at 100 frames/s (4 sectors
    # each, 1 kB a sector), looked at every 0.25 s, so each status is seen twice
    rate = Rate()
    shown = []
    for look in range(40):
        elapsed = (look // 2) * 0.5
        rate.add(elapsed, int(400 * elapsed), int(400_000 * elapsed))
        shown.append((rate.fps, rate.gbps))
    assert shown[0] == (0.0, 0.0)
    assert all(fps == 400 and abs(gbps - 0.0004) < 1e-12 for fps, gbps in shown[2:])


def watched(session, tmp_path, last):
    """Run `session` as run_session does; returns the rates through the workers its progress line showed past
    the start and before the end (frames written), and `last(local, progress)` at its end."""
    local = LocalSession(session, tmp_path)
    progress = Progress(session, quiet=True)
    shown = []
    try:
        local.launch()
        local.wait_healthy()
        local.start()
        while not local.finished():
            local.check_alive(streaming=True)
            progress.update(local.stages)
            written, expected = progress.totals(local.stages)[:2]
            if 80 <= written <= expected - 80:
                shown.append(float(re.search(r"([\d,.]+) frames/s through workers", progress.line(local.stages))[1]))
            time.sleep(0.25)
        return shown, last(local, progress)
    finally:
        local.stop()


def test_live_table_shows_a_steady_rate_near_the_source_rate(tmp_path):
    doc = manifest("steady", scan={"rows": 20, "cols": 20}, source={"rate": RATE}, workers={"replicas": 2},
                   plugin={"name": "noop"})
    shown, table = watched(load_session(doc), tmp_path, lambda local, progress: progress.table(local.stages))
    assert len(shown) >= 10
    assert all(RATE / 2 <= fps <= RATE * 1.5 for fps in shown), shown   # never 0, never twice the rate
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "(frames)" in text and "distributor-0" in text


def test_a_session_routed_by_slice_counts_frames_not_bands(tmp_path):
    """Two workers each take their band of every frame: the line's rate through the workers, the writer's counts
    and the distributor's are frames (README: every count is frames), not twice them."""
    doc = tomo_doc("bands", rate=RATE, liveView={"enabled": False})
    doc["spec"]["scan"]["count"] = 3

    def statuses(local, progress):
        return local.writer().control.status(), [p.control.status() for p in local.stages
                                                  if p.stage.role == "distributor"]
    shown, (writer, lanes) = watched(load_session(doc), tmp_path, statuses)
    assert len(shown) >= 10
    assert all(RATE / 2 <= fps <= RATE * 1.5 for fps in shown), shown
    assert writer.state == FINISHED and writer.frames_in == writer.closed_total.written == 3 * FRAMES
    assert [(lane.frames_out, lane.in_flight) for lane in lanes] == [(3 * FRAMES, 0)]
