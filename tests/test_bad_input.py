"""Bad input to a running session: garbage on every bound port while it streams, invalid control
calls, and bad files. Every bad message is rejected, counted in detstream_rejected_messages_total
(by reason) and logged once per kind; the session completes with exact accounting."""

import json
import os
import socket
import subprocess
import urllib.request

import grpc
import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from detstream.services.dataplane.wire import WIRE_VERSION
from detstream.v1 import control_pb2
from detstream.v1.wire_pb2 import BLOCK, END_OF_SCAN, RESULT, WANT, Header

from helpers import DETSTREAM, manifest, no_stage_left, wait_for

SMALL = {"rows": 64, "cols": 64, "sectors": 2}
SECTOR_BYTES = 64 * 32 * 2
COUNTING = {"name": "electron-counting", "params": {"dark": "none", "backgroundThreshold": 200,
                                                     "xrayThreshold": 400}}


def rejected(port) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "detstream_rejected_messages_total"}


def h(**fields) -> bytes:
    shape = fields.pop("shape", None)
    header = Header(version=fields.pop("version", WIRE_VERSION), **fields)
    if shape is not None:
        header.shape.extend(shape)
    return header.SerializeToString()


def block(**over):
    """A BLOCK of one sector of frame 1 (block 0)."""
    fields = dict(kind=BLOCK, scan=0, block=0, frames=[1], sectors=[0], shape=[64, 32], dtype="<u2",
                  scan_rows=8, scan_cols=8)
    fields.update(over)
    return h(**fields)


# (reason, message) pairs: every kind of malformed message a data port can get
BAD = [
    ("header", [b"\xff\xff\xff\xff"]),
    ("header", [os.urandom(5000)]),
    ("version", [block(version=1), bytes(SECTOR_BYTES)]),
    ("kind", [h(kind=99)]),
    ("kind", [h(kind=0)]),
    ("parts", [block()]),
    ("parts", [block(), bytes(SECTOR_BYTES), bytes(SECTOR_BYTES)]),
    ("parts", [h(kind=END_OF_SCAN, scan=0), b"extra"]),
    ("parts", [h(kind=WANT, scan=0), b"extra"]),
    ("size", [block(), bytes(SECTOR_BYTES - 1)]),
    ("size", [block(), bytes(SECTOR_BYTES * 3)]),
    ("geometry", [block(shape=[32, 64]), bytes(SECTOR_BYTES)]),
    ("geometry", [block(dtype="<f4"), bytes(SECTOR_BYTES * 2)]),
    ("range", [block(frames=[64]), bytes(SECTOR_BYTES)]),
    ("range", [block(frames=[20]), bytes(SECTOR_BYTES)]),          # not in block 0
    ("range", [block(sectors=[7]), bytes(SECTOR_BYTES)]),
    ("range", [block(scan=5), bytes(SECTOR_BYTES)]),
]


def garbage_messages(rng):
    for _, parts in BAD:
        yield parts
    for _ in range(200):  # random multipart garbage
        yield [rng.bytes(int(rng.integers(1, 300))) for _ in range(int(rng.integers(1, 4)))]


def raw_tcp_garbage(port, rng):
    for payload in (rng.bytes(200), b"\xff" + bytes(8) + b"\x7f" + rng.bytes(64), b"GET / HTTP/1.1\r\n\r\n",
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.bytes(100), b"\x16\x03\x01" + rng.bytes(300)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(payload)
                s.settimeout(0.2)
                s.recv(100)
            except OSError:
                pass


def test_garbage_on_every_port_while_streaming_is_rejected_counted_and_the_scan_is_exact(local_session):
    doc = manifest("garbage", scan={"rows": 8, "cols": 8, "count": 2}, detector=SMALL, source={"rate": 20},
                   plugin=COUNTING, transport={"heartbeatS": 0.1, "workerTimeoutS": 2.0})
    local = local_session(doc)
    wait_for(lambda: local.writer().status is not None and local.writer().status.frames_in > 2)
    rng = np.random.default_rng(11)
    ctx = zmq.Context()
    data_ports = {("distributor", "route"): zmq.DEALER, ("distributor", "work"): zmq.DEALER,
                  ("worker", "data"): zmq.PUSH, ("writer", "results"): zmq.DEALER}
    try:
        for (role, port), kind in data_ports.items():
            stage = local.plan.stage(role, 0)
            sock = ctx.socket(kind)
            sock.linger = 0
            sock.sndhwm = 100000
            sock.connect(f"tcp://127.0.0.1:{stage.ports[port]}")
            for parts in garbage_messages(rng):
                sock.send_multipart(parts)
            raw_tcp_garbage(stage.ports[port], rng)
        # results the writer cannot take: wrong kind of result, not whole uint32s, pixel out of the frame
        writer = ctx.socket(zmq.DEALER)
        writer.connect(f"tcp://127.0.0.1:{local.plan.stage('writer', 0).ports['results']}")
        frame3 = {"frames": [3], "sector_masks": [1], "part_counts": [1]}
        writer.send_multipart([h(kind=RESULT, scan=0, result="frames", **frame3), b"1234"])
        writer.send_multipart([h(kind=RESULT, scan=0, result="events", **frame3), b"123"])
        writer.send_multipart([h(kind=RESULT, scan=0, result="events", **frame3),
                               np.array([64 * 64], np.uint32).tobytes()])
        writer.send_multipart([h(kind=RESULT, scan=0, result="events", **frame3)])
        writer.send_multipart([h(kind=RESULT, scan=0, result="events", frames=[3, 4], sector_masks=[1],
                                 part_counts=[1, 1]), b"", b""])
        for p in local.stages:  # control and metrics ports: raw garbage, and bad HTTP
            raw_tcp_garbage(p.stage.ports["control"], rng)
            raw_tcp_garbage(p.stage.ports["metrics"], rng)
            request = urllib.request.Request(f"http://127.0.0.1:{p.stage.ports['metrics']}/metrics", data=b"x",
                                             method="POST")
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(request, timeout=5)
            with grpc.insecure_channel(f"127.0.0.1:{p.stage.ports['control']}") as channel:
                for method in ("/detstream.v1.StageControl/Configure", "/detstream.v1.StageControl/Nope"):
                    call = channel.unary_unary(method)  # raw bytes in and out
                    with pytest.raises(grpc.RpcError) as err:
                        call(b"\xff\xff\xff\xff", timeout=5)
                    assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT,
                                                grpc.StatusCode.UNIMPLEMENTED)
        wait_for(lambda: local.finished(), timeout=90)
        status = local.writer().client.status()
        assert [(s.scan, s.written, s.lost, s.partial, s.duplicates) for s in status.scans] == \
            [(0, 64, 0, 0, 0), (1, 64, 0, 0, 0)]
        assert all(p.proc.poll() is None for p in local.stages), "a stage died"
        counts = {p.stage.name: rejected(p.stage.ports["metrics"]) for p in local.stages}
        for name in ("distributor-0", "worker-0", "writer-0"):
            reasons = counts[name]
            for reason in ("header", "version", "kind", "parts", "handshake", "http", "control"):
                assert reasons.get(reason, 0) >= 1, (name, reason, reasons)
        for reason in ("size", "geometry", "range"):
            assert counts["worker-0"].get(reason, 0) >= 1, (reason, counts["worker-0"])
        for reason in ("result", "size", "range"):
            assert counts["writer-0"].get(reason, 0) >= 1, (reason, counts["writer-0"])
        assert counts["source-0"].get("http", 0) >= 1 and counts["source-0"].get("control", 0) >= 1
        # logged once per kind, not once per message
        log = (local.run_dir / "logs" / "distributor-0.log").read_text()
        assert log.count("rejected a message (header:") == 1
    finally:
        ctx.destroy(linger=0)


def test_invalid_control_calls_get_proper_status_codes_and_no_stage_crashes(local_session):
    doc = manifest("badcalls", scan={"rows": 4, "cols": 4}, detector=SMALL, source={"rate": 10},
                   plugin=COUNTING)
    local = local_session(doc)
    worker = next(p for p in local.stages if p.stage.role == "worker")
    writer = local.writer()

    def code(call):
        with pytest.raises(grpc.RpcError) as err:
            call()
        return err.value.code(), err.value.details()

    bad_json = control_pb2.ConfigureRequest(plugin_params_json="{not json")
    assert code(lambda: worker.client.stub.Configure(bad_json, timeout=5))[0] == grpc.StatusCode.INVALID_ARGUMENT
    not_object = control_pb2.ConfigureRequest(plugin_params_json="[1, 2]")
    status, details = code(lambda: worker.client.stub.Configure(not_object, timeout=5))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "JSON object" in details
    status, details = code(lambda: worker.client.configure({"backgroundThreshold": -1, "bogus": 1}))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "bogus: unknown parameter" in details
    status, details = code(lambda: writer.client.configure({"x": 1}))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "the writer stage takes no parameters" in details
    wait_for(lambda: local.finished())
    writer.client.stop()
    wait_for(lambda: writer.proc.poll() is not None)  # a stopped stage is gone: a call now finds nobody
    worker.client.configure({"backgroundThreshold": 150, "xrayThreshold": 300})  # valid: accepted live
    assert all(p.proc.poll() is None for p in local.stages if p is not writer)


def test_starting_a_finished_or_failed_stage_is_refused(tmp_path, local_session):
    doc = manifest("wrongstate", scan={"rows": 2, "cols": 2}, detector=SMALL, plugin={"name": "noop"})
    local = local_session(doc)
    wait_for(lambda: local.finished())
    source = next(p for p in local.stages if p.stage.role == "source")
    wait_for(lambda: source.client.status().state == control_pb2.FINISHED)
    with pytest.raises(grpc.RpcError) as err:
        source.client.start()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "FINISHED" in err.value.details()


def run(doc, tmp_path, write_manifest, output=None):
    out = output or tmp_path / "out"
    cmd = DETSTREAM + ["run", str(write_manifest(doc)), "--output", str(out), "--report", str(tmp_path / "r.json")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return result


@pytest.mark.parametrize("shape, dtype, message", [
    ((4, 64, 32), "uint16", "frames of shape (4, 64, 32); the session's detector needs (frames, 64, 64)"),
    ((4, 64, 64), "float32", "dtype float32, the session's detector is uint16"),
    ((2, 64, 64), "uint16", "2 frames, a 2x2 scan needs 4"),
])
def test_a_replay_file_that_does_not_fit_the_session_fails_with_the_reason(tmp_path, write_manifest, shape, dtype,
                                                                           message):
    np.save(tmp_path / "frames.npy", np.zeros(shape, dtype))
    doc = manifest("badreplay", scan={"rows": 2, "cols": 2}, detector=SMALL, plugin={"name": "noop"},
                   source={"kind": "replay", "path": str(tmp_path / "frames.npy")})
    result = run(doc, tmp_path, write_manifest)
    assert result.returncode == 1
    assert "source-0" in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not no_stage_left(str(tmp_path))


def test_a_replay_file_that_is_not_an_array_fails_with_the_reason(tmp_path, write_manifest):
    (tmp_path / "frames.npy").write_bytes(os.urandom(1000))
    doc = manifest("garbagereplay", scan={"rows": 2, "cols": 2}, detector=SMALL, plugin={"name": "noop"},
                   source={"kind": "replay", "path": str(tmp_path / "frames.npy")})
    result = run(doc, tmp_path, write_manifest)
    assert result.returncode == 1 and "is not a readable .npy file" in result.stderr, result.stderr


def mount_tmpfs(path, options):
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): needs root and mount permission")


PATHS = [  # (--output, --report, spec.output.path, the one line expected)
    ("blocker/out", "r.json", "", "--output {t}/blocker/out: {t}/blocker is a file, not a folder; give a folder"),
    (".", "r.json", "blocker/results", "--output {t} (spec.output.path blocker/results): {t}/blocker is a file"),
    ("ro", "r.json", "", "--output {t}/ro: {t}/ro is not writable: Read-only file system; give a folder"),
    ("ro/sub", "r.json", "", "--output {t}/ro/sub: {t}/ro/sub is not writable: Read-only file system"),
    ("out", "blocker/r.json", "", "--report {t}/blocker/r.json: {t}/blocker is a file, not a folder; give a file"),
    ("out", "ro/r.json", "", "--report {t}/ro/r.json: {t}/ro is not writable: Read-only file system"),
    ("out", "out", "", "--report {t}/out: {t}/out is a folder; give a file"),
]


@pytest.mark.parametrize("output, report, output_path, message", PATHS, ids=[p[3].split(":")[0] + " " + p[0] + " "
                                                                              + p[1] + " " + p[2] for p in PATHS])
def test_a_path_that_cannot_be_written_is_refused_before_anything_starts(tmp_path, write_manifest, output, report,
                                                                          output_path, message):
    """Every path of the command line is checked first: exit 2, one line naming the option, nothing started."""
    (tmp_path / "blocker").write_text("a file where a folder should be")
    (tmp_path / "out").mkdir()
    mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    doc = manifest("paths", scan={"rows": 2, "cols": 2}, detector=SMALL, plugin=COUNTING,
                   output={"path": output_path})
    try:
        cmd = DETSTREAM + ["run", str(write_manifest(doc)), "--output", str(tmp_path / output),
                           "--report", str(tmp_path / report)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["umount", str(tmp_path / "ro")])
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("detstream run: " + message.format(t=tmp_path)), line
    assert not list(tmp_path.rglob(".detstream")) and not no_stage_left(str(tmp_path))


def test_a_full_disk_fails_the_session_with_the_reason_and_leaves_no_file(tmp_path, write_manifest):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=64k")
    try:
        # 16x16 frames of ~100 events each: ~100 kB of events, more than the disk holds
        doc = manifest("full", scan={"rows": 16, "cols": 16}, detector={"rows": 128, "cols": 128, "sectors": 2},
                       source={"simulator": {"electronsPerFrame": 100}}, output={"path": "disk"},
                       plugin={"name": "electron-counting", "params": {"dark": "simulated",
                                                                        "backgroundThreshold": 32,
                                                                        "xrayThreshold": 50}})
        result = run(doc, tmp_path, write_manifest, output=tmp_path)
        left = sorted(p.name for p in disk.iterdir())
    finally:
        subprocess.run(["umount", str(disk)])
    assert result.returncode == 1
    assert "writer-0" in result.stderr and "No space left on device" in result.stderr, result.stderr
    assert "cannot write scan 0 to" in result.stderr
    assert left == [], left   # neither a .partial nor a file that looks complete
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["ok"]


def test_the_writer_never_overwrites_an_earlier_result(tmp_path, local_session):
    """Launched without `detstream run`'s check (as the operator launches it, on a volume holding an earlier
    run's files), the writer fails rather than replace a scan file."""
    earlier = tmp_path / "guard-scan0000.h5"
    earlier.write_bytes(b"an earlier acquisition")
    local = local_session(manifest("guard", scan={"rows": 2, "cols": 2}, detector=SMALL, plugin=COUNTING))
    writer = local.writer()
    wait_for(lambda: writer.proc.poll() is not None, what="the writer to fail")
    assert writer.proc.returncode == 1
    assert f"{earlier} exists already (an earlier run): results are never overwritten" in writer.log_tail()
    assert earlier.read_bytes() == b"an earlier acquisition"


def test_a_bad_failed_linger_setting_is_named_without_a_traceback(tmp_path, write_manifest, monkeypatch):
    monkeypatch.setenv("DETSTREAM_FAILED_LINGER_S", "half a minute")
    result = run(manifest("linger"), tmp_path, write_manifest)
    assert result.returncode == 1
    assert "DETSTREAM_FAILED_LINGER_S='half a minute': want a number of seconds >= 0" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
