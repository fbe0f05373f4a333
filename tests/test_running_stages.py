"""A session driven from the test: an external sender withholds a sector; every stage's metrics
endpoint, health service and probes (/readyz, /healthz) answer while it streams."""

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import stempy.io
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from detstream.services.launcher.runner import free_ports
from detstream.services.runtime.stage import STALL_S

from helpers import DETSTREAM, DetectorSender, manifest, wait_for


def test_a_withheld_sector_gives_a_partial_frame_zero_filled(local_session):
    doc = manifest("partial", scan={"rows": 2, "cols": 3}, source={"kind": "external", "replicas": 1},
                   transport={"frameTimeoutS": 0.3},
                   plugin={"name": "electron-counting", "params": {"backgroundThreshold": 10, "xrayThreshold": 100}})
    local = local_session(doc)
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 5, (6, 576, 576), dtype=np.uint16)
    frames[:, 100, 10::144] = 30   # one event in each sector of every frame
    detector = DetectorSender(local.plan)
    detector.send_scan(0, {number: [(sector, np.ascontiguousarray(frame[:, sector * 144:(sector + 1) * 144]))
                                    for sector in range(4) if (number, sector) != (4, 2)]   # one withheld
                           for number, frame in enumerate(frames)}, rows=2, cols=3)
    detector.end_scan(0, expected=6, rows=2, cols=3)
    wait_for(lambda: local.finished())
    status = local.writer().client.status()
    (account,) = status.scans
    assert (account.expected, account.written, account.partial, account.lost) == (6, 6, 1, 0)
    time.sleep(0.2)
    assert local.writer().client.status().elapsed_s == status.elapsed_s > 0  # stopped at its end
    counted = stempy.io.load_electron_counts(account.file)
    events = [np.sort(counted.data[p][0]) for p in range(6)]
    assert [len(e) for e in events] == [4, 4, 4, 4, 3, 4]
    assert 100 * 576 + 2 * 144 + 10 not in events[4]  # the zero-filled sector has no event
    detector.close()


def test_metrics_and_health_answer_on_every_stage(local_session):
    doc = manifest("watched", scan={"rows": 40, "cols": 40}, source={"rate": 100}, lanes=2, plugin={"name": "noop"})
    local = local_session(doc)
    wait_for(lambda: local.writer().status is not None and local.writer().status.frames_in > 0)
    for p in local.stages:
        samples = scrape(p.stage.ports["metrics"])
        labels = {"session": "watched", "stage": p.stage.role, "replica": str(p.stage.index)}
        assert ("detstream_frames_received_total", labels) in [(n, got) for n, got, _ in samples], p.stage.name
        assert ("detstream_stage_state", labels, 2.0) in samples, p.stage.name  # running
        with grpc.insecure_channel(p.client.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, p.stage.name
    threads = os.environ.get("OMP_NUM_THREADS", "1").encode()   # (a value the user set wins)
    for p in local.stages:  # every stage starts single-threaded in its libraries (runtime.stage.STAGE_ENV)
        environ = Path(f"/proc/{p.proc.pid}/environ").read_bytes().split(b"\0")
        assert b"OMP_NUM_THREADS=" + threads in environ, p.stage.name
    source = next(p for p in local.stages if p.stage.role == "source")
    wait_for(lambda: any(n == "detstream_frames_sent_total" and v > 0
                         for n, _, v in scrape(source.stage.ports["metrics"])))
    worker = next(p for p in local.stages if p.stage.role == "worker")   # (blocks of 16 frames: it may be second)
    wait_for(lambda: any(n == "detstream_processing_seconds_count" and v > 0
                         for n, _, v in scrape(worker.stage.ports["metrics"])))


def probe(port, path):
    """What the kubelet's httpGet probe gets: (status code, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()


def probes(p):
    return probe(p.stage.ports["metrics"], "/readyz"), probe(p.stage.ports["metrics"], "/healthz")


def test_probes_follow_the_lifecycle(tmp_path, monkeypatch):
    """Not ready while setting up, ready from configured through finished, gone once stopped; live
    throughout."""
    from detstream.services.launcher.runner import LocalSession
    from detstream.services.model.session import load_session

    monkeypatch.setenv("DETSTREAM_FAILPOINTS", "writer-0:setup-delay=3")
    local = LocalSession(load_session(manifest("probed", plugin={"name": "noop"})), tmp_path)
    try:
        local.launch()
        writer = local.writer()

        def answering():
            try:
                return probes(writer)
            except urllib.error.URLError:
                return None  # the metrics port is not open yet
        assert wait_for(answering, 30, "the writer's metrics port") == ((503, "not set up, or stopping"),
                                                                        (200, "setting up"))
        local.wait_healthy()
        for p in local.stages:
            ready, (code, why) = probes(p)
            assert ready == (200, "configured"), p.stage.name
            assert code == 200 and why.startswith("main loop last turned "), p.stage.name
        local.start()
        assert probes(writer)[0] == (200, "running")
        wait_for(local.finished, 60, "the scan written")
        assert probes(writer)[0] == (200, "finished") and probes(writer)[1][0] == 200
    finally:
        local.stop()
    with pytest.raises(urllib.error.URLError):  # stopped: the kubelet finds nothing listening
        probes(writer)


def test_a_hung_stage_fails_liveness_and_a_stage_held_by_backpressure_does_not(tmp_path, monkeypatch):
    """The only worker takes 60 s over its first frame (its loop is stuck); the frames behind it
    fill the source's window within seconds, so the source waits for room: alive, not hung
    (checked once the worker has been stuck well past STALL_S, so have they been waiting)."""
    from detstream.services.launcher.runner import LocalSession
    from detstream.services.model.session import load_session

    monkeypatch.setenv("DETSTREAM_FAILPOINTS", "worker:process-delay=60")
    doc = manifest("stuck", scan={"rows": 64, "cols": 64}, workers={"replicas": 1}, plugin={"name": "noop"})
    local = LocalSession(load_session(doc), tmp_path)
    try:
        local.launch()
        local.wait_healthy()
        local.start()
        worker = next(p for p in local.stages if p.stage.role == "worker")
        def stuck():
            code, why = probe(worker.stage.ports["metrics"], "/healthz")
            return float(why.split()[4]) >= STALL_S + 10 and code  # "main loop last turned 12.3 s ago"
        assert wait_for(stuck, 60, "the worker stuck past STALL_S", every=1) == 503
        for p in local.stages:
            if p is not worker:
                ready, (code, why) = probes(p)
                assert ready == (200, "running") and code == 200, (p.stage.name, why)
        assert probe(worker.stage.ports["metrics"], "/readyz") == (200, "running")  # set up, still there
    finally:
        local.stop()


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def test_drain_mid_scan_closes_the_file_with_exact_accounting(local_session):
    doc = manifest("drained", scan={"rows": 30, "cols": 30, "count": 3}, source={"rate": 150},
                   plugin={"name": "electron-counting", "params": {"backgroundThreshold": 32, "xrayThreshold": 50}})
    local = local_session(doc)
    wait_for(lambda: local.writer().status is not None and local.writer().status.frames_in > 50)
    for p in local.stages:
        p.client.drain()
    wait_for(lambda: local.finished(), timeout=30)
    (account,) = local.writer().client.status().scans  # the scan under way; no further scan started
    assert account.complete and 0 < account.written < 900
    assert account.expected == account.written + account.lost == 900
    assert len(stempy.io.load_electron_counts(account.file).data) == 900


def test_an_outside_source_joins_through_the_ingest_addresses(local_session, write_manifest, tmp_path):
    # Two senders started independently may be seconds apart on a loaded machine: a frame waits for
    # its other sectors up to frameTimeoutS before it is passed on as partial.
    doc = manifest("joined", scan={"rows": 6, "cols": 6}, lanes=2, source={"kind": "external", "replicas": 2},
                   transport={"frameTimeoutS": 60}, plugin={"name": "noop"})
    local = local_session(doc)
    path = write_manifest(doc)
    ingest = [f"--connect={local.plan.endpoint('distributor', lane, 'route')}" for lane in range(2)]
    senders = [subprocess.Popen(DETSTREAM + ["stage", "source", "--manifest", str(path), "--index", str(i), *ingest])
               for i in range(2)]
    assert [s.wait(timeout=60) for s in senders] == [0, 0]
    wait_for(lambda: local.finished())
    (account,) = local.writer().client.status().scans
    assert (account.expected, account.written, account.partial, account.lost) == (36, 36, 0, 0)


@pytest.mark.parametrize("rows", [1, 8])  # 2 frames stay queued; 16 fill the queue and the sender waits
def test_an_outside_source_whose_data_reached_no_session_fails_naming_the_address(write_manifest, rows):
    """Field case 06: nothing listens at the address; the sender must not report success."""
    path = write_manifest(manifest("nowhere", scan={"rows": rows, "cols": 2}, source={"kind": "external"}))
    address = f"tcp://127.0.0.1:{next(free_ports())}"
    result = subprocess.run(DETSTREAM + ["stage", "source", "--manifest", str(path), "--connect", address],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"sent to {address} (lane 0) did not reach a session: nothing answered there" in result.stderr
    if rows == 1:
        assert "2 frame(s) sent" in result.stderr


def test_an_outside_source_address_without_scheme_gets_a_usage_message(write_manifest):
    path = write_manifest(manifest("joined", source={"kind": "external"}))
    result = subprocess.run(DETSTREAM + ["stage", "source", "--manifest", str(path), "--connect", "127.0.0.1:7200"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stderr.strip() == (
        "detstream stage source: --connect 127.0.0.1:7200: give the address as tcp://HOST:PORT (PORT 1 to 65535), "
        "as the session's status.ingest lists it")


def test_an_outside_source_replaying_a_missing_file_gets_a_usage_message(write_manifest, tmp_path):
    path = write_manifest(manifest("joined", source={"kind": "external"}))
    result = subprocess.run(DETSTREAM + ["stage", "source", "--manifest", str(path), "--connect", "tcp://127.0.0.1:1",
                                         "--replay", str(tmp_path / "absent.npy")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"detstream stage source: --replay {tmp_path / 'absent.npy'}: no such file; give a .npy or HDF5 file of frames"]


def test_an_outside_source_needs_one_address_per_lane(write_manifest):
    path = write_manifest(manifest("joined", lanes=2, source={"kind": "external"}))
    result = subprocess.run(DETSTREAM + ["stage", "source", "--manifest", str(path), "--connect", "tcp://127.0.0.1:1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "give one --connect per lane, got 1" in result.stderr
