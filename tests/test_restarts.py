"""A pipeline stage restarted mid-session, as Kubernetes restarts a pod whose process died: the
session resumes, and every scan is accounted for exactly (expected = written + lost, nothing
unaccounted). Locally `detstream run` fails instead (tests/test_faults.py); here the test plays
the kubelet and the operator: it kills the stage, runs it again with the same plan and starts it.

Workers are slowed down so that the pipeline is backpressured and the killed stage holds frames.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import stempy.io
import zmq

from detstream.services.dataplane.wire import RESULT, Header, Outbox
from detstream.services.model.session import Detector
from detstream.services.model.session import Simulator as SimulatorSettings
from detstream.services.plugins.counting import Counter, fit_thresholds
from detstream.services.sources.simulator import Simulator, dark_reference
from detstream.v1.control_pb2 import FINISHED

from helpers import DetectorSender, manifest, wait_for

ROWS = 12
FAST = {"heartbeatS": 0.1, "workerTimeoutS": 1.0, "frameTimeoutS": 0.5, "endOfScanTimeoutS": 2.0,
        "startupTimeoutS": 30}


def restart(local, name: str):
    """Kill a stage (SIGKILL) and run it again, as a kubelet restarts a container; then Start it,
    as the operator does with a stage that came up mid-session."""
    old = next(p for p in local.stages if p.stage.name == name)
    old.proc.kill()
    old.proc.wait()
    # through a shell that execs: no fork of this process, where gRPC runs (its fork handler would
    # abort the child); the stage still dies with the test (PR_SET_PDEATHSIG survives exec)
    wrapper = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
               "os.execv(sys.argv[1], sys.argv[1:])")
    old.log_file.close()
    log = open(old.log_path, "ab")
    old.proc = subprocess.Popen([sys.executable, "-c", wrapper, *local.argv(old.stage)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    old.log_file = log
    wait_for(old.client.healthy, 30, f"{name} healthy again")
    old.client.start()
    return old


def writer_status(local):
    return local.writer().client.status()


@pytest.mark.parametrize("victim", ["distributor-0"])
def test_a_restarted_pipeline_stage_resumes_the_session_with_exact_accounting(local_session, monkeypatch, victim):
    monkeypatch.setenv("DETSTREAM_FAILPOINTS", "worker:process-delay=0.01")
    doc = manifest("restart", scan={"rows": ROWS, "cols": ROWS, "count": 3}, workers={"replicas": 2},
                   detector={"rows": 128, "cols": 128, "sectors": 4}, source={"kind": "simulator", "rate": 400},
                   plugin={"name": "electron-counting", "params": {"dark": "simulated", "backgroundThreshold": 32,
                                                                    "xrayThreshold": 50}},
                   transport={**FAST, "highWaterMark": 8})
    local = local_session(doc)
    wait_for(lambda: writer_status(local).frames_in >= 40, 60, "scan 0 under way")
    restarted = restart(local, victim)
    wait_for(lambda: writer_status(local).state == FINISHED, 120, "the writer to close every scan")

    scans = writer_status(local).scans
    print({s.scan: (s.written, s.lost, s.partial) for s in scans})
    assert [s.scan for s in scans] == [0, 1, 2]
    for s in scans:
        assert s.complete and s.expected == ROWS * ROWS, s
        assert s.written + s.lost == s.expected, s  # exact: nothing unaccounted
        if s.written:
            counted = stempy.io.load_electron_counts(s.file)
            assert sum(1 for frames in counted.data if len(frames[0])) == s.written
    assert scans[2].written == ROWS * ROWS, "the session resumed: the scan after the restart is whole"
    assert "UNACCOUNTED" not in local.writer().log_path.read_text()
    assert restarted.log_path.read_text().count(" ready (control") == 2


def test_a_restarted_worker_calibrates_again_on_the_same_sample_frames(local_session, monkeypatch):
    """Fitted thresholds: a worker that comes back mid-session gets the session's sample frames from the
    distributor again and fits the same thresholds; every position of every scan is counted with that one set."""
    # slow workers: the session outlasts the restart (~10 s of work left), however loaded the machine
    monkeypatch.setenv("DETSTREAM_FAILPOINTS", "worker:process-delay=0.05")
    detector = {"rows": 128, "cols": 128, "sectors": 4}
    doc = manifest("recal", scan={"rows": ROWS, "cols": ROWS, "count": 3}, workers={"replicas": 2}, detector=detector,
                   source={"kind": "simulator", "rate": 400}, transport={**FAST, "highWaterMark": 8},
                   plugin={"name": "electron-counting", "params": {"dark": "simulated", "samples": 10}})
    local = local_session(doc)
    wait_for(lambda: writer_status(local).frames_in >= 40, 60, "scan 0 under way")
    restarted = restart(local, "worker-0")
    fits = lambda: re.findall(r"calibrated on 10 sample frames \(0\.\.9\): (.*)", restarted.log_path.read_text())  # noqa: E731
    wait_for(lambda: len(fits()) == 2, 60, "the restarted worker to calibrate")
    assert fits()[0] == fits()[1], fits()
    wait_for(lambda: writer_status(local).state == FINISHED, 120, "the writer to close every scan")
    sim = Simulator(SimulatorSettings(), Detector(**detector))
    dark = dark_reference(0, 128, 128, 100.0)
    counter = Counter(dark, fit_thresholds(np.stack([sim.frame(0, p) for p in range(10)]), dark).thresholds, (128, 128))
    for s in writer_status(local).scans:
        assert s.written == ROWS * ROWS, s
        counted = stempy.io.load_electron_counts(s.file)
        for p in range(ROWS * ROWS):
            np.testing.assert_array_equal(np.sort(counted.data[p][0]), counter.count(sim.frame(s.scan, p)))


def test_a_lane_started_after_a_scan_closes_that_scan_as_lost(local_session):
    # What a restarted distributor sees when its predecessor died between two scans: the first input
    # is of scan 1. Scan 0 never comes: while scan 1 is open, scan 0 is closed as lost one timeout
    # later (scan 1 stays open: its frames come slowly, one message each), and scan 1 goes through.
    doc = manifest("gap", scan={"rows": 2, "cols": 3, "count": 2}, source={"kind": "external", "replicas": 1},
                   plugin={"name": "noop"}, transport={**FAST, "endOfScanTimeoutS": 1.0})
    local = local_session(doc)
    detector = DetectorSender(local.plan)
    pixels = np.zeros((576, 144), np.uint16)
    for frame in range(6):
        time.sleep(0.4)
        detector.send_scan(1, {frame: [(sector, pixels) for sector in range(4)]}, rows=2, cols=3)
    lane = next(p for p in local.stages if p.stage.role == "distributor")
    wait_for(lambda: "scan 0 closed (never seen here: this lane started after it)"
             in lane.log_path.read_text(), 30, "scan 0 closed")
    detector.end_scan(1, expected=6, rows=2, cols=3)
    wait_for(lambda: local.finished(), 30, "both scans closed")
    s0, s1 = local.writer().client.status().scans
    assert (s0.scan, s0.written, s0.lost, s0.file) == (0, 0, 6, "")
    assert (s1.scan, s1.written, s1.lost) == (1, 6, 0)
    detector.close()


def test_a_scan_no_lane_ends_is_closed_when_stale_with_its_missing_frames_lost(local_session):
    # A distributor that died holding its lane's end of scan: the writer has some results of the scan
    # (here sent straight to it, as the workers would) and no end. It closes the scan when stale.
    doc = manifest("stale", scan={"rows": 2, "cols": 3}, source={"kind": "external", "replicas": 1},
                   transport={**FAST, "endOfScanTimeoutS": 1.0, "workerTimeoutS": 0.5})
    local = local_session(doc)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(local.plan.endpoint("writer", 0, "results"))
    out = Outbox(dealer, "worker-9")
    for frame in (0, 2, 5):
        out.send(Header(kind=RESULT, scan=0, frames=[frame], sector_masks=[15], part_counts=[1], scan_rows=2,
                        scan_cols=3, result="events"),
                 [np.array([frame], np.uint32)])
    wait_for(lambda: local.finished(), 30, "the stale scan closed")
    (account,) = local.writer().client.status().scans
    assert (account.complete, account.written, account.lost) == (True, 3, 3)
    counted = stempy.io.load_electron_counts(account.file)
    assert [len(counted.data[p][0]) for p in range(6)] == [1, 0, 1, 0, 0, 1]
    log = local.writer().log_path.read_text()
    assert "scan 0: no input for" in log and "1 of 1 lanes never ended it" in log
    dealer.close()
