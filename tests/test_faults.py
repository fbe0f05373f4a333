"""Faults injected into whole sessions of real processes (`detstream run`), and what must follow:
nothing lost silently, nothing hangs, memory bounded, and every loss counted and reported.

Timeouts in the manifests are short so each test takes seconds; no test asserts on timing.
"""

import re
import signal
import subprocess

import h5py
import numpy as np
import pytest
import stempy.io

from detstream.services.dataplane.accounting import COMPLETE, MISSING, PARTIAL
from detstream.services.model.session import Detector
from detstream.services.model.session import Simulator as SimulatorSettings
from detstream.services.plugins.counting import Counter, Thresholds
from detstream.services.sources.simulator import Simulator

from helpers import DETSTREAM, DetectorSender, manifest, wait_for
from live import Live

SMALL = {"rows": 128, "cols": 128, "sectors": 4}
COUNTING = {"name": "electron-counting", "params": {"dark": "simulated", "backgroundThreshold": 32,
                                                     "xrayThreshold": 50}}
FAST = {"heartbeatS": 0.1, "workerTimeoutS": 1.0, "frameTimeoutS": 0.5, "endOfScanTimeoutS": 1.5,
        "startupTimeoutS": 30}


def truth_events(scan, positions):
    """What the counting plugin must find in each frame of the simulator (seed 0, SMALL detector)."""
    from detstream.services.sources.simulator import Simulator, dark_reference
    detector = Detector(**SMALL)
    sim = Simulator(SimulatorSettings(), detector)
    counter = Counter(dark_reference(0, 128, 128, 100.0), Thresholds(32, 50), (128, 128))
    return [counter.count(sim.frame(scan, p)) for p in range(positions)]


def assert_exact(report, scans=1):
    assert [s["scan"] for s in report["scans"]] == list(range(scans))
    for s in report["scans"]:
        assert s["complete"] and s["unaccounted"] == 0, s


def assert_file_matches_truth(path, scan, positions):
    counted = stempy.io.load_electron_counts(path)
    truth = truth_events(scan, positions)
    for p in range(positions):
        np.testing.assert_array_equal(np.sort(counted.data[p][0]), truth[p], err_msg=f"position {p}")


def run_exact(doc, tmp_path, failpoints="", disturb=None):
    """Run a session to its end (after `disturb(live)`): it succeeds, its one scan accounted exactly."""
    live = Live(doc, tmp_path, failpoints=failpoints)
    try:
        if disturb:
            disturb(live)
        code, err, report = live.finish()
    finally:
        live.kill()
    assert code == 0, err
    assert_exact(report)
    (scan,) = report["scans"]
    return live, err, report, scan


def kill_worker(live, after: int) -> None:
    live.wait_started(frames=after)
    live.signal("worker-1", signal.SIGKILL)


def resent_in(log: str) -> int:
    return sum(int(n) for n in re.findall(r"routing its (\d+) frames again", log))


def test_a_killed_worker_loses_nothing_and_every_frame_is_written_once(tmp_path):
    doc = manifest("wkill", scan={"rows": 24, "cols": 24}, detector=SMALL, source={"rate": 150},
                   workers={"replicas": 3}, plugin=COUNTING, transport=FAST)
    live, _, report, scan = run_exact(doc, tmp_path, failpoints="worker-1:process-delay=0.05",  # always holds frames
                                      disturb=lambda live: kill_worker(live, after=100))
    assert (scan["expected"], scan["written"], scan["lost"], scan["partial"]) == (576, 576, 0, 0)
    assert any("worker-1 exited with code -9" in i for i in report["incidents"])
    distributor = live.log("distributor-0")
    assert "worker declared dead" in distributor
    assert resent_in(distributor) >= 1          # its frames in flight went to the other workers
    assert_file_matches_truth(scan["file"], 0, 576)


def test_a_worker_whose_queue_is_full_waits_and_is_not_declared_dead(tmp_path):
    # More credits than the high-water mark lets through: the distributor's send to a slow worker finds
    # its queue full. That worker is only busy: it gets no frame until it next speaks, nothing is re-sent.
    doc = manifest("fullq", scan={"rows": 16, "cols": 16}, detector=SMALL, source={"rate": 400},
                   workers={"replicas": 2, "credits": 16}, plugin={"name": "noop"},
                   transport={**FAST, "highWaterMark": 2})
    live, _, _, scan = run_exact(doc, tmp_path, failpoints="worker:process-delay=0.01")
    assert (scan["written"], scan["lost"], scan["duplicates"]) == (256, 0, 0)
    assert "worker declared dead" not in live.log("distributor-0")


def test_a_hung_worker_is_declared_dead_and_its_late_results_are_dropped(tmp_path):
    doc = manifest("whang", scan={"rows": 24, "cols": 24}, detector=SMALL, source={"rate": 150},
                   workers={"replicas": 3}, plugin=COUNTING, transport=FAST)
    def hang_and_wake(live):
        live.wait_started(frames=100)
        live.signal("worker-1", signal.SIGSTOP)  # keeps its connections, reads nothing, says nothing
        wait_for(lambda: "worker declared dead" in live.log("distributor-0"), 30, "the hung worker declared dead")
        live.signal("worker-1", signal.SIGCONT)  # it wakes up and delivers results the others already made
    live, _, _, scan = run_exact(doc, tmp_path, failpoints="worker-1:process-delay=0.05", disturb=hang_and_wake)
    assert (scan["written"], scan["lost"]) == (576, 0)
    resent = resent_in(live.log("distributor-0"))
    assert resent >= 1
    assert 1 <= scan["duplicates"] <= resent    # each re-sent frame written once, the late copy dropped
    assert "silent for" in live.log("distributor-0")
    assert_file_matches_truth(scan["file"], 0, 576)


def run_slow_writer(tmp_path, name, rows, **transport):
    doc = manifest(name, scan={"rows": rows, "cols": 32}, workers={"replicas": 2}, plugin={"name": "noop"},
                   transport={**FAST, "highWaterMark": 4, **transport})
    live = Live(doc, tmp_path / name, failpoints="writer-0:write-delay=0.004")
    ahead = []
    try:
        live.wait_started(frames=1)
        while live.proc.poll() is None:
            source, writer = live.status("source-0"), live.status("writer-0")
            if source and writer and writer.scans:
                sectors = source.frames_out
                ahead.append(sectors / 4 - sum(s.written for s in writer.scans))
            subprocess.run(["sleep", "0.2"])
        code, err, report = live.finish()
    finally:
        live.kill()
    return code, err, report, ahead


def test_a_slow_writer_backpressures_the_source_and_memory_stays_bounded(tmp_path):
    """Same session, a scan 4x longer: every stage's peak memory stays the same, the source is never
    more than the pipeline's bounded queues ahead of the writer, and nothing is dropped."""
    short = run_slow_writer(tmp_path, "short", 8)
    long = run_slow_writer(tmp_path, "long", 32)
    for code, err, report, _ahead in (short, long):
        assert code == 0, err
        assert_exact(report)
        (scan,) = report["scans"]
        assert scan["written"] == scan["expected"] and scan["lost"] == scan["partial"] == 0
        assert report["dropped"] == 0
    _, _, short_report, _ = short
    _, _, long_report, ahead = long
    assert ahead and max(ahead) < 120, ahead    # in flight: a few high-water marks' worth, not the scan (1024)
    for name, stats in long_report["stages"].items():
        before = short_report["stages"][name]["peak_rss_bytes"]
        assert stats["peak_rss_bytes"] < before * 1.15 + 16e6, (name, before, stats["peak_rss_bytes"])


def test_when_the_policy_says_drop_every_drop_is_counted_and_reported(tmp_path):
    doc = manifest("drop", scan={"rows": 16, "cols": 16}, workers={"replicas": 2}, plugin={"name": "noop"},
                   transport={**FAST, "highWaterMark": 2, "onFull": "drop", "sourceWindowFrames": 32})
    _, err, report, scan = run_exact(doc, tmp_path, failpoints="writer-0:write-delay=0.01")
    assert report["dropped"] > 0
    assert report["dropped"] == scan["lost"] + scan["partial"]   # one source: a dropped frame is lost or partial
    assert scan["written"] + scan["lost"] == 256
    assert "frames dropped by the sources" in err


def test_the_file_marks_the_positions_that_did_not_arrive_whole(local_session):
    """Field case 10: a detector that sends some frames without some sectors, and some not at all. The file says
    per position what arrived (complete, partial, missing; which sectors), agreeing with the accounting, and
    every position it calls complete holds that frame's events."""
    doc = manifest("marks", scan={"rows": 4, "cols": 4}, detector=SMALL, source={"kind": "external", "replicas": 1},
                   plugin=COUNTING, transport=FAST)
    local = local_session(doc)
    detector = DetectorSender(local.plan)
    sim = Simulator(SimulatorSettings(), Detector(**SMALL))
    withheld, lost = {3: {2}, 9: {0, 3}}, {5, 12}   # position -> sectors never sent; frames never sent
    detector.send_scan(0, {p: [(sector, np.ascontiguousarray(pixels))
                               for sector, pixels in enumerate(np.split(sim.frame(0, p), 4, axis=1))
                               if sector not in withheld.get(p, ())]
                           for p in sorted(set(range(16)) - lost)}, rows=4, cols=4)
    detector.end_scan(0, expected=16, rows=4, cols=4)
    wait_for(local.finished, 60, "the scan to close")
    detector.close()
    (scan,) = local.writer().client.status().scans
    assert (scan.written, scan.partial, scan.lost) == (14, 2, 2)

    with h5py.File(scan.file) as f:
        status = f["accounting/position_status"][()]
        arrived = f["accounting/sectors_arrived"][()]
        totals = dict(f["accounting"].attrs)
        names = dict(f["accounting/position_status"].attrs)
        events = f["electron_events/frames"][()]
        counting = dict(f["metadata/electron_counting"].attrs)
    expected_status = np.full(16, COMPLETE)
    expected_status[list(withheld)] = PARTIAL
    expected_status[list(lost)] = MISSING
    np.testing.assert_array_equal(status, expected_status.reshape(4, 4))
    expected_arrived = np.full(16, 0b1111, np.uint64)
    expected_arrived[3], expected_arrived[9] = 0b1011, 0b0110
    expected_arrived[list(lost)] = 0
    np.testing.assert_array_equal(arrived, expected_arrived.reshape(4, 4))
    assert names == {"COMPLETE": COMPLETE, "PARTIAL": PARTIAL, "MISSING": MISSING}
    assert {k: totals[k] for k in ("expected", "written", "partial", "lost", "unaccounted")} == \
        {"expected": 16, "written": 14, "partial": 2, "lost": 2, "unaccounted": 0}
    assert counting == {"threshold_calculated": False, "background_threshold": 32, "x_ray_threshold": 50}
    truth = truth_events(0, 16)
    for p in np.flatnonzero(expected_status == COMPLETE):
        np.testing.assert_array_equal(np.sort(events[p]), truth[p], err_msg=f"position {p}")


def external_source(live: Live, tmp_path):
    ingest = [f"--connect={live.plan.endpoint('distributor', 0, 'route')}"]
    return subprocess.Popen(DETSTREAM + ["stage", "source", "--manifest", str(live.manifest), "--index", "0",
                                         *ingest], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def scan_closed(live: Live, number: int):
    status = live.status("writer-0")
    return status and any(s.scan == number and s.complete for s in status.scans)


def test_a_source_that_vanishes_mid_scan_its_scans_close_as_lost_and_the_session_goes_on(tmp_path):
    # the replacement sender must be heard within endOfScanTimeoutS of scan 2's close, or scan 3 closes too;
    # 100 frames/s leaves the test seconds to kill the sender mid scan 1, however loaded the machine
    doc = manifest("vanish", scan={"rows": 16, "cols": 16, "count": 4}, detector=SMALL,
                   source={"kind": "external", "rate": 100}, plugin=COUNTING,
                   transport={**FAST, "endOfScanTimeoutS": 4})
    live = Live(doc, tmp_path)
    sender = None
    try:
        sender = external_source(live, tmp_path)
        wait_for(lambda: scan_closed(live, 0) and live.written() >= 256 + 40, 60, "scan 1 under way")
        sender.kill()                                # mid scan 1: its END_OF_SCAN never comes
        sender.wait()
        wait_for(lambda: scan_closed(live, 2), 60, "scans 1 and 2 closed by timeout")
        sender = external_source(live, tmp_path)     # the detector is back: scans 0-2 are late, 3 goes through
        code, err, report = live.finish()
    finally:
        if sender:
            sender.kill()
            sender.wait()
        live.kill()
    assert code == 0, err
    assert_exact(report, scans=4)
    s0, s1, s2, s3 = report["scans"]
    assert (s0["written"], s0["lost"]) == (256, 0)
    assert 40 <= s1["written"] < 256 and s1["lost"] == 256 - s1["written"]   # closed by timeout
    assert (s2["written"], s2["lost"], s2["file"]) == (0, 256, "")           # never started: no file
    assert (s3["written"], s3["lost"]) == (256, 0)                           # the session went on
    lane = live.log("distributor-0")
    assert "scan 1 closed (no input for 4 s)" in lane
    assert "scan 2 closed (never started: no input for 4 s)" in lane
    assert_file_matches_truth(s3["file"], 3, 256)


def test_a_vanished_source_fails_the_session_when_the_policy_says_so(tmp_path):
    doc = manifest("vanishfail", scan={"rows": 16, "cols": 16, "count": 3}, detector=SMALL,  # 100/s: see above
                   source={"kind": "external", "rate": 100}, plugin=COUNTING, transport={**FAST, "onLoss": "fail"})
    live = Live(doc, tmp_path)
    sender = None
    try:
        sender = external_source(live, tmp_path)
        wait_for(lambda: live.written() >= 40, 60, "scan 0 under way")
        sender.kill()
        sender.wait()
        code, err, report = live.finish()
    finally:
        if sender:
            sender.kill()
            sender.wait()
        live.kill()
    assert code == 1
    # the first scan with a loss fails the session (scan 0, or 1 if the sender was a scan ahead of the writer)
    failed = re.search(r"scan (\d) closed with [1-9]\d* frames lost, \d+ partial "
                       r"\(spec.transport.onLoss is fail\)", err)
    assert failed, err
    assert [s["scan"] for s in report["scans"]] == list(range(int(failed.group(1)) + 1))  # nothing after it
    assert not report["ok"] and "writer-0" in report["failure"]


@pytest.mark.parametrize("victim", ["distributor-0", "writer-0"])
def test_a_killed_pipeline_stage_fails_the_session_naming_it(tmp_path, victim):
    doc = manifest("crit", scan={"rows": 32, "cols": 32}, detector=SMALL, source={"rate": 200},
                   plugin={"name": "noop"}, transport=FAST)
    live = Live(doc, tmp_path)
    try:
        live.wait_started(frames=50)
        live.signal(victim, signal.SIGKILL)
        code, err, report = live.finish(timeout=60)
    finally:
        live.kill()
    assert code == 1
    assert f"{victim} exited with code -9" in err
    assert report["failure"].startswith(f"{victim} exited with code -9") and not report["ok"]


def test_a_hung_distributor_fails_the_session_instead_of_hanging_it(tmp_path):
    doc = manifest("dhang", scan={"rows": 32, "cols": 32}, detector=SMALL, source={"rate": 200},
                   plugin={"name": "noop"}, transport=FAST)
    live = Live(doc, tmp_path)
    try:
        live.wait_started(frames=50)
        live.signal("distributor-0", signal.SIGSTOP)
        code, err, report = live.finish(timeout=60)
    finally:
        live.kill()
    assert code == 1
    assert "distributor-0 has not answered for" in err


def test_stages_starting_slowly_and_in_any_order_still_start_together(tmp_path):
    doc = manifest("slowstart", scan={"rows": 8, "cols": 8}, detector=SMALL, plugin={"name": "noop"},
                   transport=FAST)
    # the consumers come up last: the source connects to ports nobody listens on yet
    _, _, _, scan = run_exact(doc, tmp_path, failpoints="writer-0:setup-delay=3,distributor-0:setup-delay=2,"
                                                      "worker-0:setup-delay=1,source-0:setup-delay=0.5")
    assert scan["written"] == 64


def test_a_stage_too_slow_to_start_is_named_when_the_startup_timeout_passes(tmp_path):
    doc = manifest("tooslow", scan={"rows": 8, "cols": 8}, detector=SMALL, plugin={"name": "noop"},
                   transport={**FAST, "startupTimeoutS": 3})
    live = Live(doc, tmp_path, failpoints="writer-0:setup-delay=60")
    try:
        code, err, report = live.finish(timeout=60)
    finally:
        live.kill()
    assert code == 1
    stalled = re.search(r"not healthy after 3 s \(spec.transport.startupTimeoutS\): (.*)", err)
    assert stalled and "writer-0" in stalled.group(1).split(", "), err
    assert report["failure"] and not report["scans"]


def test_a_worker_killed_while_the_writer_is_slow_loses_nothing(tmp_path):
    """A frame is done only once the writer has its result: whatever the killed worker still held
    (frames, results in its own memory) is re-sent, what it had handed to its socket arrives
    anyway (the kernel delivers it), and the writer drops any second copy."""
    doc = manifest("wkillslow", scan={"rows": 16, "cols": 16}, detector=SMALL, workers={"replicas": 3},
                   plugin={"name": "noop"}, transport=FAST)
    live, _, _, scan = run_exact(doc, tmp_path, failpoints="writer-0:write-delay=0.02",
                                 disturb=lambda live: kill_worker(live, after=40))
    assert (scan["written"], scan["lost"], scan["partial"]) == (256, 0, 0)
    assert "worker declared dead" in live.log("distributor-0")
