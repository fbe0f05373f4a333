"""Whole sessions as real processes on 127.0.0.1, through `detstream run` as a user runs them."""

import json
import os
import signal
import subprocess

import h5py
import numpy as np
import pytest
import stempy.image
import stempy.io

from detstream.services.model.session import Detector
from detstream.services.model.session import Simulator as SimulatorSettings
from detstream.services.plugins.counting import Counter, fit_thresholds
from detstream.services.sources.simulator import Simulator, dark_reference

from helpers import DETSTREAM, DETSTREAM_INTERRUPTIBLE, ROOT, manifest, no_stage_left

COUNTING = {"name": "electron-counting",
            "params": {"dark": "simulated", "backgroundThreshold": 32, "xrayThreshold": 50}}


def run(path, out, *extra, timeout=180):
    cmd = DETSTREAM + ["run", str(path), "--output", str(out), "--report", str(out / "report.json"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def stempy_events(frame, dark, background=32, xray=50):
    counted = stempy.image.electron_count_frame(frame, darkreference=dark, background_threshold=background,
                                                xray_threshold=xray)
    return np.sort(counted.data[0][0])


def test_example_session_counts_like_stempy(tmp_path):
    result = run(ROOT / "examples" / "4dstem-local.yaml", tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    (scan,) = report["scans"]
    assert (scan["expected"], scan["written"], scan["lost"], scan["unaccounted"]) == (1024, 1024, 0, 0)
    assert set(report) >= {"scans", "throughput_gbps", "frames_per_second", "duration_s"}
    assert "session demo: OK" in result.stderr

    counted = stempy.io.load_electron_counts(scan["file"])
    assert tuple(counted.scan_shape) == (32, 32) and tuple(counted.frame_shape) == (576, 576)
    with h5py.File(scan["file"]) as f:   # the plugin's parameters as JSON
        assert json.loads(f["metadata"].attrs["plugin_params"])["dark"] == "simulated"
    sim = Simulator(SimulatorSettings(seed=7), Detector())
    for position in range(0, 1024, 31):
        expected = stempy_events(sim.frame(0, position), sim.dark)
        np.testing.assert_array_equal(np.sort(counted.data[position][0]), expected)


def crafted_frames(n, rng):
    """Frames with events on sector edges, ties between neighbours and X-ray hits (dark = 0)."""
    frames = rng.integers(0, 6, (n, 576, 576), dtype=np.uint16)
    for f in frames:
        for col in (0, 143, 144, 287, 288, 431, 432, 575):
            f[rng.integers(0, 576), col] = 20
        r, c = rng.integers(1, 575, 2)
        f[r, c] = f[r, c + 1] = 22              # a tie: neither is a strict maximum
        f[rng.integers(0, 576), rng.integers(0, 576)] = 5000   # an X-ray hit
        f[0, 0] = 25                            # a corner event
    return frames


def test_replay_from_npy_with_several_scans(tmp_path, write_manifest):
    frames = crafted_frames(2 * 16, np.random.default_rng(3))
    np.save(tmp_path / "frames.npy", frames)
    doc = manifest("replay", scan={"rows": 4, "cols": 4, "count": 2}, lanes=2,
                   source={"kind": "replay", "path": str(tmp_path / "frames.npy"), "replicas": 2},
                   plugin={"name": "electron-counting", "params": {"backgroundThreshold": 10, "xrayThreshold": 100}})
    result = run(write_manifest(doc), tmp_path / "out")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(s["scan"], s["written"], s["unaccounted"]) for s in report["scans"]] == [(0, 16, 0), (1, 16, 0)]
    zero = np.zeros((576, 576), np.float32)
    for s in report["scans"]:
        counted = stempy.io.load_electron_counts(s["file"])
        for position in range(16):
            frame = frames[s["scan"] * 16 + position]
            expected = stempy_events(frame, zero, 10, 100)
            np.testing.assert_array_equal(np.sort(counted.data[position][0]), expected)
            assert len(expected) >= 6  # the edge events and the corner are there; the tie is not


def test_bad_manifest_starts_nothing(tmp_path, write_manifest):
    doc = manifest("bad", scan={"rows": -1, "cols": 4}, plugin={"name": "nope"})
    result = run(write_manifest(doc), tmp_path)
    assert result.returncode == 2
    assert "spec.scan.rows: must be >= 1" in result.stderr
    assert "spec.plugin.name: unknown plugin 'nope'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".detstream").exists()


def test_missing_replay_file_fails_with_the_reason(tmp_path, write_manifest):
    doc = manifest("nofile", source={"kind": "replay", "path": str(tmp_path / "absent.npy")}, plugin={"name": "noop"})
    result = run(write_manifest(doc), tmp_path / "out")
    assert result.returncode == 1
    assert "source-0" in result.stderr and "absent.npy does not exist" in result.stderr
    assert not no_stage_left(str(tmp_path))


def test_a_killed_stage_stops_the_session(tmp_path, write_manifest):
    doc = manifest("killed", scan={"rows": 64, "cols": 64}, source={"rate": 200}, plugin={"name": "noop"})
    path = write_manifest(doc)
    proc = subprocess.Popen(DETSTREAM + ["run", str(path), "--output", str(tmp_path)], stderr=subprocess.PIPE,
                            text=True)
    plan = tmp_path / ".detstream" / "killed" / "plan.json"
    victim = None
    for _ in range(200):
        victims = subprocess.run(["pgrep", "-f", f"stage distributor --plan {plan}"], capture_output=True,
                                 text=True).stdout.split()
        if victims and (tmp_path / ".detstream/killed/logs/source-0.log").stat().st_size:
            victim = victims[0]
            break
        subprocess.run(["sleep", "0.1"])
    assert victim, "the session never started"
    subprocess.run(["kill", "-9", victim], check=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    # killed once it runs, or (on a loaded machine) between its start-up and the launcher's Start: either way the
    # session stops at once, naming it
    assert "distributor-0 exited with code -9" in err or "distributor-0 refused Start" in err, err
    assert not no_stage_left(str(plan))


def test_workers_fit_thresholds_on_sampled_frames(tmp_path, write_manifest):
    """Field case 03: fitted thresholds. Every worker fits one threshold set on the same frames (the scan's
    first `samples`), the file records it where stempy does, and two runs of the manifest give the same file."""
    doc = manifest("sampled", scan={"rows": 12, "cols": 12}, source={"replicas": 2}, workers={"replicas": 3},
                   plugin={"name": "electron-counting", "params": {"dark": "simulated", "samples": 20}})
    files = []
    for run_dir in (tmp_path / "a", tmp_path / "b"):
        result = run(write_manifest(doc), run_dir)
        assert result.returncode == 0, result.stderr
        files.append(json.loads((run_dir / "report.json").read_text())["scans"][0]["file"])
    counted = [stempy.io.load_electron_counts(f) for f in files]
    recorded = counted[0].metadata["electron_counting"]
    assert counted[1].metadata["electron_counting"] == recorded
    sim = Simulator(SimulatorSettings(seed=0), Detector())
    dark = dark_reference(0, 576, 576, 100.0)
    fit = fit_thresholds(np.stack([sim.frame(0, p) for p in range(20)]), dark)
    assert recorded == pytest.approx(fit.metadata())
    assert recorded["threshold_calculated"] and recorded["number_of_samples"] == 20
    counter = Counter(dark, fit.thresholds, (576, 576))
    for p in range(144):  # one threshold set explains every position, in both runs
        expected = counter.count(sim.frame(0, p))
        np.testing.assert_array_equal(np.sort(counted[0].data[p][0]), expected, err_msg=f"position {p}")
        np.testing.assert_array_equal(np.sort(counted[1].data[p][0]), expected, err_msg=f"position {p}")
    truth = [sim.truth(0, p) for p in range(144)]
    found = sum(len(np.intersect1d(counted[0].data[p][0], truth[p])) for p in range(144))
    assert found / sum(len(t) for t in truth) > 0.95  # nearly every simulated electron is found


def test_a_detector_of_as_many_sectors_as_the_schema_allows_streams(tmp_path, write_manifest):
    """spec.detector.sectors at its maximum (64): every frame is reassembled and written (field case 01)."""
    doc = manifest("sectors", scan={"rows": 2, "cols": 2}, detector={"rows": 16, "cols": 128, "sectors": 64},
                   workers={"replicas": 1}, plugin={"name": "noop"})
    result = run(write_manifest(doc), tmp_path)
    assert result.returncode == 0, result.stderr
    (scan,) = json.loads((tmp_path / "report.json").read_text())["scans"]
    assert (scan["written"], scan["partial"], scan["lost"]) == (4, 0, 0)


SMALL_COUNTING = dict(scan={"rows": 4, "cols": 4}, detector={"rows": 64, "cols": 64, "sectors": 2}, plugin=COUNTING)


def test_a_second_run_into_the_same_folder_overwrites_nothing(tmp_path, write_manifest):
    """Field case 15: the second run is refused before it starts, naming the file and the fix."""
    first = run(write_manifest(manifest("again", **SMALL_COUNTING)), tmp_path)
    assert first.returncode == 0, first.stderr
    scan_file = tmp_path / "again-scan0000.h5"
    before = scan_file.read_bytes()
    logs = sorted((tmp_path / ".detstream").rglob("*.log"))
    stamps = [p.stat().st_mtime_ns for p in logs]
    doc = manifest("again", **{**SMALL_COUNTING, "scan": {"rows": 4, "cols": 4, "count": 2},
                               "source": {"simulator": {"seed": 9}}})
    second = run(write_manifest(doc, "second.yaml"), tmp_path)
    assert second.returncode == 2
    assert second.stderr.splitlines() == [
        f"detstream run: --output {tmp_path}: again-scan0000.h5, again-accounting.jsonl in {tmp_path} would be "
        f"overwritten (an earlier run "
        f"of session again); give another --output folder, or move the files away"]
    assert scan_file.read_bytes() == before and not (tmp_path / "again-scan0001.h5").exists()
    assert [p.stat().st_mtime_ns for p in logs] == stamps  # nothing started


def test_an_interrupted_run_names_no_file_that_is_not_there(tmp_path, write_manifest):
    """Ctrl-C while the first scan streams: its unfinished file is removed, and neither the summary nor the
    report names it."""
    doc = manifest("cut", **{**SMALL_COUNTING, "scan": {"rows": 32, "cols": 32}, "source": {"rate": 50}})
    proc = subprocess.Popen(DETSTREAM_INTERRUPTIBLE + ["run", str(write_manifest(doc)), "--output", str(tmp_path),
                                                       "--report", str(tmp_path / "report.json")],
                            stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "cut-scan0000.h5.partial"
    for _ in range(600):
        if partial.exists():
            break
        subprocess.run(["sleep", "0.1"])
    assert partial.exists(), "the writer never started the scan's file"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "interrupted (Ctrl-C)" in err
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["file"] for s in report["scans"]] == [""]
    assert not list(tmp_path.glob("cut-scan0000.h5*")) and "cut-scan0000.h5" not in err


def test_uint32_frames_count_without_wrapping(tmp_path, write_manifest):
    """Field case 02: a pixel at 65536 + 40 (an X-ray, far above the threshold) is no electron."""
    frames = np.zeros((4, 16, 16), np.uint32)
    frames[0, 8, 8] = 65536 + 40
    frames[1, 4, 4] = 40
    np.save(tmp_path / "frames.npy", frames)
    doc = manifest("wide", scan={"rows": 2, "cols": 2}, detector={"rows": 16, "cols": 16, "sectors": 1,
                                                                  "dtype": "uint32"},
                   source={"kind": "replay", "path": str(tmp_path / "frames.npy")}, workers={"replicas": 1},
                   plugin={"name": "electron-counting", "params": {"dark": "none", "backgroundThreshold": 32,
                                                                   "xrayThreshold": 50}})
    result = run(write_manifest(doc), tmp_path / "out")
    assert result.returncode == 0, result.stderr
    counted = stempy.io.load_electron_counts(str(tmp_path / "out" / "wide-scan0000.h5"))
    assert [counted.data[p][0].tolist() for p in range(4)] == [[], [4 * 16 + 4], [], []]


def test_a_worker_killed_while_the_session_starts_is_survived(tmp_path, write_manifest):
    """A worker loses no data (its frames would go to the others): lost before streaming, as at any other
    moment, the session goes on with the rest and reports it."""
    doc = manifest("early", **SMALL_COUNTING)
    env = {**os.environ, "DETSTREAM_FAILPOINTS": "distributor-0:setup-delay=4"}  # the session is still starting
    proc = subprocess.Popen(DETSTREAM + ["run", str(write_manifest(doc)), "--output", str(tmp_path), "--report",
                                         str(tmp_path / "report.json")], stderr=subprocess.PIPE, text=True, env=env)
    log = tmp_path / ".detstream" / "early" / "logs" / "worker-1.log"
    for _ in range(300):
        if log.exists() and "ready" in log.read_text():
            break
        subprocess.run(["sleep", "0.1"])
    assert "ready" in log.read_text(), "worker-1 never came up"
    assert not (tmp_path / ".detstream" / "early" / "logs" / "distributor-0.log").read_text().count("ready")
    plan = tmp_path / ".detstream" / "early" / "plan.json"
    (victim,) = subprocess.run(["pgrep", "-f", f"stage worker --plan {plan} --index 1"], capture_output=True,
                               text=True).stdout.split()
    subprocess.run(["kill", "-9", victim], check=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(s["written"], s["lost"]) for s in report["scans"]] == [(16, 0)]
    assert [i.split(":")[0] for i in report["incidents"]] == ["worker-1 exited with code -9"]
