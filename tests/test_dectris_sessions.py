"""Sessions whose source is a DECTRIS DCU: `detstream run` with spec.source.kind dectris, fed by the `detstream dcu`
stand-in (real recorded EIGER2 messages, or the simulator) or by a sender of the test's own, with one and with two
source replicas on one DCU. Every image is compared bit for bit with an independent decode (hdf5plugin) in the raw
frames file (spec.output.keepFrames); missing and duplicated images, and garbage, are accounted exactly."""

from __future__ import annotations

import struct

import cbor2
import h5py
import hdf5plugin  # noqa: F401 (the bitshuffle filter h5py reads the frames file with)
import numpy as np
import pytest
import zmq
from test_dectris_stream2 import DATA, FOLDERS, SHAPE, independent_channels, recorded, start_dcu
from test_families import problems

from detstream.services.dataplane.accounting import COMPLETE, MISSING
from detstream.services.model.session import load_session
from detstream.services.sources.dectris.stream2 import array_tag, encode

from helpers import manifest, wait_for
from live import Live

FAST = {"endOfScanTimeoutS": 3.0, "frameTimeoutS": 2.0}


def dcu_session(name, address, scan, count, replicas, detector, **extra):
    return manifest(name, scan=scan | {"count": count}, detector=detector, workers={"replicas": 1},
                    source={"kind": "dectris", "replicas": replicas, "dectris": {"address": address, **extra}},
                    plugin={"name": "noop"}, output={"keepFrames": True}, transport=FAST)


def test_a_dcu_session_manifest_is_checked_naming_the_field():
    small = {"rows": 32, "cols": 32, "sectors": 1, "dtype": "uint16"}
    load_session(dcu_session("ok", "tcp://dcu.lab:31001", {"rows": 8, "cols": 8}, 1, 4, small))  # 4 > 1 sector
    assert problems(dcu_session("bad", "dcu.lab", {"rows": 8, "cols": 8}, 1, 1, dict(small, dtype="float32"))) == [
        "spec.source.dectris.address: must be the DCU's tcp://HOST:PORT (port 31001 on a DCU); got 'dcu.lab'",
        "spec.detector.dtype: stream v2 pixels are uint8, uint16 or uint32; got float32"]
    doc = dcu_session("counting", "tcp://dcu.lab:31001", {"rows": 8, "cols": 8}, 1, 1, small)
    doc["spec"]["plugin"] = {"name": "electron-counting"}
    assert problems(doc) == ["spec.output.keepFrames: electron-counting's results are events, not frames: "
                             "keepFrames keeps the frames a plugin passes on as they came (noop)"]


def scans_of(report):
    return [(s["scan"], s["expected"], s["written"], s["lost"], s["unaccounted"]) for s in report["scans"]]


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("folder", FOLDERS)
def test_recorded_series_arrive_bit_for_bit_in_the_frames_file(folder, replicas, tmp_path):
    messages = recorded(folder)[:10]
    channel = "threshold_2" if replicas == 2 else "threshold_1"
    expected = [independent_channels(m)[channel] for m in messages]
    dcu, address = start_dcu("--messages", str(DATA / folder), "--series", "2", "--wait-clients", str(replicas))
    doc = dcu_session(f"real{replicas}", address, {"rows": 2, "cols": 5}, 2, replicas,
                      {"rows": SHAPE[0], "cols": SHAPE[1], "sectors": replicas, "dtype": expected[0].dtype.name},
                      channel=channel)
    live = Live(doc, tmp_path)
    code, stderr, report = live.finish()
    assert dcu.wait(30) == 0, dcu.stderr.read()
    assert code == 0, stderr
    assert scans_of(report) == [(0, 10, 10, 0, 0), (1, 10, 10, 0, 0)]
    for scan in report["scans"]:
        with h5py.File(scan["file"]) as f:
            frames = f["frames"]
            assert frames.shape == (2, 5, *SHAPE) and frames.dtype == expected[0].dtype
            for position, image in enumerate(expected):
                assert np.array_equal(frames[divmod(position, 5)], image), (folder, scan["scan"], position)
            assert (f["accounting/position_status"][()] == COMPLETE).all()
            assert f["accounting"].attrs["written"] == 10


@pytest.mark.parametrize("replicas", [1, 2])
def test_missing_and_duplicated_images_are_accounted_exactly(replicas, tmp_path):
    """Two series with images 3 and 40 missing and 5 and 6 sent twice, then the DCU restarts (a new process on
    the same port) and sends a third series whole."""
    first, address = start_dcu("--shape", "32x32", "--series", "2", "--images", "64", "--wait-clients",
                               str(replicas), "--skip", "3,40", "--duplicate", "5,6")
    doc = dcu_session(f"gaps{replicas}", address, {"rows": 8, "cols": 8}, 3, replicas,
                      {"rows": 32, "cols": 32, "sectors": 1, "dtype": "uint16"})
    live = Live(doc, tmp_path)
    assert first.wait(60) == 0, first.stderr.read()
    accounting = live.out / f"gaps{replicas}-accounting.jsonl"
    wait_for(lambda: accounting.exists() and len(accounting.read_text().splitlines()) == 2, 60, "two scans closed")
    sources = [f"source-{i}" for i in range(replicas)]
    duplicates = {stage: live.metric(stage, "detstream_rejected_messages_total", reason="duplicate")
                  for stage in [*sources, "worker-0"]}
    assert sum(duplicates.values()) == 4             # 2 per series, dropped where they met their first copy:
    sent = sum(live.metric(s, "detstream_frames_sent_total") for s in sources)   # the replica that had it,
    assert sent == 2 * 62 + duplicates["worker-0"]                               # or the worker that had it
    second, _ = start_dcu("--shape", "32x32", "--images", "64", "--wait-clients", str(replicas), "--bind", address)
    code, stderr, report = live.finish()
    assert second.wait(30) == 0
    assert code == 0, stderr
    assert scans_of(report) == [(0, 64, 62, 2, 0), (1, 64, 62, 2, 0), (2, 64, 64, 0, 0)]
    for scan in report["scans"][:2]:
        with h5py.File(scan["file"]) as f:
            status = f["accounting/position_status"][()].ravel()
            assert list(np.flatnonzero(status == MISSING)) == [3, 40]
            assert not f["frames"][0, 3].any() and f["frames"][0, 4].any()


def free_push() -> tuple[zmq.Socket, str]:
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.bind("tcp://127.0.0.1:*")
    return push, push.getsockopt_string(zmq.LAST_ENDPOINT)


def stream2_series(uid, images, shape=(32, 32), first=0, **image_fields):
    """A start's, the images' and the end's fields of one series of uint16 frames (image i all i)."""
    ids = {"series_id": 1, "series_unique_id": uid}
    start = {"type": "start", **ids, "channels": ["threshold_1"], "image_size_x": shape[1],
             "image_size_y": shape[0], "image_dtype": "uint16", "number_of_images": images}
    frames = [{"type": "image", **ids, "image_id": i,
               "data": {"threshold_1": array_tag(np.full(shape, i, np.uint16), "bslz4")}, **image_fields}
              for i in range(first, first + images)]
    return start, frames, {"type": "end", **ids}


def test_garbage_on_the_dcu_port_is_refused_counted_and_the_series_goes_on(tmp_path):
    push, address = free_push()
    doc = dcu_session("garbage", address, {"rows": 8, "cols": 8}, 1, 1,
                      {"rows": 32, "cols": 32, "sectors": 1, "dtype": "uint16"})
    live = Live(doc, tmp_path)
    start, images, end = stream2_series("good", 64)
    small_start, small_images, small_end = stream2_series("small", 1, shape=(16, 16))
    stray_start, stray_images, stray_end = stream2_series("stray", 1)
    broken = dict(images[0], image_id=7, data={"threshold_1": cbor2.CBORTag(40, [[32, 32], cbor2.CBORTag(
        69, cbor2.CBORTag(56500, ["bslz4", 2, struct.pack(">QII", 2048, 8192, 16) + bytes(range(16))]))])})
    refused = {"cbor": [b"\xff\x00 not CBOR"], "not-map": [cbor2.dumps([1, 2, 3])],
               "type": [cbor2.dumps({"type": "hello"})],
               "field": [encode(dict(images[0], series_id="one")), encode(dict(images[1], data={"other": 1}))],
               "no-start": [encode(stray_images[0]), encode(stray_end)],      # an image, an end before any start
               "size": [encode(small_start), encode(dict(small_images[0], series_unique_id="good"))],
               "compression": [encode(broken)],
               "range": [encode(dict(images[0], image_id=64))]}
    push.send(encode(start))
    for message in [m for ms in refused.values() for m in ms]:
        push.send(message)
    for image in images:
        push.send(encode(image))
    reasons = {reason: float(len(ms)) for reason, ms in refused.items()}

    def counted():
        return {r: live.metric("source-0", "detstream_rejected_messages_total", reason=r) for r in reasons}
    wait_for(lambda: counted() == reasons, 60, f"the source to refuse {reasons} (refused {counted()})")
    assert live.status("source-0").state == 2                          # still running
    push.send(encode(end))
    code, stderr, report = live.finish()
    push.close(linger=0)
    assert code == 0, stderr
    assert scans_of(report) == [(0, 64, 64, 0, 0)]
    with h5py.File(report["scans"][0]["file"]) as f:
        assert [int(f["frames"][divmod(i, 8)][0, 0]) for i in range(64)] == list(range(64))
