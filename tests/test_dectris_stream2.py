"""DECTRIS SIMPLON stream v2: decoding real EIGER2 messages bit for bit, start messages from the documented
fields, refusal of bad input (one error class, counted by reason), and the `detstream dcu` stand-in served
to real PULL clients."""

from __future__ import annotations

import os
import struct
import subprocess
import threading
from datetime import datetime, timezone
from pathlib import Path

import cbor2
import h5py
import hdf5plugin
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detstream.services.model.session import Detector
from detstream.services.model.session import Simulator as Settings
from detstream.services.sources.dectris import dcu, stream2
from detstream.services.sources.dectris.ingest import bare_ingest
from detstream.services.sources.dectris.stream2 import End, Image, Start, Stream2Error, array_tag, decode, encode
from detstream.services.sources.simulator import Simulator

from helpers import DETSTREAM

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dectris-stream2"
FOLDERS = ("r500k_bm_bslz4_16bit", "r500k_bm_bslz4_8bit", "r500k_bm_lz4_8bit")
SHAPE = (514, 1030)   # EIGER2 R 500K


def recorded(folder: str) -> list[bytes]:
    path = DATA / folder
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: the real stream v2 messages come with shared/")
        pytest.skip(f"{path} is missing (the real stream v2 messages come with shared/)")
    return [file.read_bytes() for file in sorted(path.glob("*.cbor"))]


# ---- an independent decode: cbor2's raw tags and the HDF5 filters of hdf5plugin ----

def hdf5_decompress(algorithm: str, compressed: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The chunk as HDF5 reads it through hdf5plugin's bitshuffle or LZ4 filter (tag 56500 uses their framing)."""
    with h5py.File("chunk", "w", driver="core", backing_store=False) as file:
        filters = hdf5plugin.Bitshuffle(cname="lz4") if algorithm == "bslz4" else hdf5plugin.LZ4()
        dataset = file.create_dataset("x", shape=shape, dtype=dtype, chunks=shape, **filters)
        dataset.id.write_direct_chunk((0,) * len(shape), compressed)
        return dataset[()]


def independent_channels(message: bytes) -> dict[str, np.ndarray]:
    raw = cbor2.loads(message)                         # tags left as CBORTag
    channels = {}
    for name, tag in raw["data"].items():
        assert tag.tag == 40
        dims, typed = tag.value
        dtype = np.dtype({64: "u1", 69: "<u2", 70: "<u4"}[typed.tag])
        assert typed.value.tag == 56500
        algorithm, _, compressed = typed.value.value
        channels[name] = hdf5_decompress(algorithm, compressed, tuple(dims), dtype)
    return channels


@pytest.mark.parametrize("folder", FOLDERS)
def test_real_messages_decode_bit_for_bit(folder):
    messages = recorded(folder)
    assert len(messages) == 11
    *images, end = [decode(m) for m in messages]
    bits = 16 if "16bit" in folder else 8
    unique_id = images[0].series_unique_id
    for image_id, (image, message) in enumerate(zip(images, messages)):
        assert isinstance(image, Image)
        assert (image.series_id, image.series_unique_id, image.image_id) == (1, unique_id, image_id)
        assert list(image.data) == ["threshold_1", "threshold_2", "difference"]
        expected = independent_channels(message)
        for name, pixels in image.data.items():
            assert pixels.shape == SHAPE and pixels.dtype == np.dtype(f"uint{bits}")
            assert np.array_equal(pixels, expected[name]), (folder, image_id, name)
        assert image.data["threshold_1"].any()        # real counts, not an empty frame equal to an empty one
        assert image.start_time[1] == image.real_time[1] == 50_000_000     # the DCU's time base (Hz)
        assert image.stop_time[0] - image.start_time[0] == image.real_time[0]
        assert image.series_date.tzinfo is not None and image.user_data == [1, "💙"]
    assert isinstance(end, End) and end.series_id == 1 and end.series_unique_id == unique_id


def full_start(shape=SHAPE, channels=("threshold_1", "threshold_2"), dtype="uint16", **changes) -> dict:
    """A start message with every field stream_v2/README.md lists (header_detail "all")."""
    rng = np.random.default_rng(7)
    message = {
        "type": "start", "arm_date": datetime(2023, 2, 10, 15, 49, 5, tzinfo=timezone.utc),
        "beam_center_x": 512.5, "beam_center_y": 256.25, "channels": list(channels), "count_time": 0.019999,
        "countrate_correction_enabled": True,
        "countrate_correction_lookup_table": cbor2.CBORTag(70, np.arange(4096, dtype="<u4").tobytes()),
        "detector_description": "Dectris EIGER2 R 500K", "detector_serial_number": "E-01-0350",
        "detector_translation": [0.0, 0.0, 0.125],
        "flatfield": {c: array_tag(rng.random(shape, dtype=np.float32), "bslz4") for c in channels},
        "flatfield_enabled": True, "frame_time": 0.02,
        "goniometer": {"omega": {"increment": 0.1, "start": 0.0}, "kappa": {"increment": 0.0, "start": 30.0}},
        "image_dtype": dtype, "image_size_x": shape[1], "image_size_y": shape[0], "incident_energy": 12400.0,
        "incident_wavelength": 0.99987, "number_of_images": 10,
        "pixel_mask": {c: array_tag((rng.random(shape) < 0.01).astype(np.uint32)) for c in channels},
        "pixel_mask_enabled": True, "pixel_size_x": 7.5e-05, "pixel_size_y": 7.5e-05, "saturation_value": 65534,
        "sensor_material": "Si", "sensor_thickness": 0.00045, "series_id": 4,
        "series_unique_id": "01GRXWT80JSDY2FNW8SGCCDZD9",
        "threshold_energy": {c: 6200.0 + i for i, c in enumerate(channels)},
        "user_data": {"scan": {"rows": 2, "cols": 5}}, "virtual_pixel_interpolation_enabled": False,
    }
    message.update(changes)
    return message


def test_start_message_from_the_documented_fields():
    fields = full_start()
    start = decode(encode(fields))
    assert isinstance(start, Start)
    assert (start.series_id, start.series_unique_id, start.channels, start.shape, start.image_dtype,
            start.number_of_images) == (4, fields["series_unique_id"], ("threshold_1", "threshold_2"), SHAPE,
                                        np.dtype("uint16"), 10)
    assert start.user_data == {"scan": {"rows": 2, "cols": 5}}
    detail = start.detail
    assert set(detail) == set(fields) - {"type", "series_id", "series_unique_id", "channels", "image_size_x",
                                         "image_size_y", "image_dtype", "number_of_images", "user_data"}
    rng = np.random.default_rng(7)
    flat = rng.random(SHAPE, dtype=np.float32), rng.random(SHAPE, dtype=np.float32)
    assert all(np.array_equal(detail["flatfield"][c], f) for c, f in zip(start.channels, flat))
    assert detail["pixel_mask"]["threshold_2"].dtype == np.uint32 and detail["pixel_mask"]["threshold_2"].shape == SHAPE
    assert np.array_equal(detail["countrate_correction_lookup_table"], np.arange(4096))
    assert detail["goniometer"]["kappa"] == {"increment": 0.0, "start": 30.0}
    assert detail["arm_date"] == fields["arm_date"] and detail["saturation_value"] == 65534
    assert detail["threshold_energy"] == {"threshold_1": 6200.0, "threshold_2": 6201.0}


def test_basic_start_and_images_checked_against_it():
    basic = {k: v for k, v in full_start(channels=("threshold_1", "threshold_2", "difference")).items()
             if k not in ("flatfield", "pixel_mask", "countrate_correction_lookup_table")}  # header_detail "basic"
    start = decode(encode(basic))
    messages = recorded("r500k_bm_bslz4_16bit")
    assert decode(messages[0], start).image_id == 0
    with pytest.raises(Stream2Error, match="expected a typed array of uint16, got a typed array of uint8") as err:
        decode(recorded("r500k_bm_bslz4_8bit")[0], start)
    assert err.value.reason == "field"
    small = decode(encode({**basic, "image_size_x": 1024}))
    with pytest.raises(Stream2Error, match=r"dimensions \[514, 1030\], the start message says \[514, 1024\]") as err:
        decode(messages[0], small)
    assert err.value.reason == "size"
    two = decode(encode({**basic, "channels": ["threshold_1", "threshold_2"]}))
    with pytest.raises(Stream2Error, match="not the start message's") as err:
        decode(messages[0], two)
    assert err.value.reason == "field"


def image(**changes) -> dict:
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4)
    return {"type": "image", "series_id": 1, "series_unique_id": "s", "image_id": 0,
            "data": {"threshold_1": array_tag(pixels, "bslz4")}, **changes}


def compressed(algorithm="bslz4", modifier=2, data=None, dims=(3, 4), tag=69) -> cbor2.CBORTag:
    data = stream2.compress(np.arange(12, dtype=np.uint16), "bslz4") if data is None else data
    return cbor2.CBORTag(40, [list(dims), cbor2.CBORTag(tag, cbor2.CBORTag(56500, [algorithm, modifier, data]))])


GOOD = stream2.compress(np.arange(12, dtype=np.uint16), "bslz4")
HUGE = struct.pack(">QI", 1 << 60, 8192) + GOOD[12:]

BAD = [  # (message bytes, reason, words the error names)
    (b"", "cbor", "not a CBOR message"),
    (b"\xff\x00garbage", "cbor", "not a CBOR message"),
    (encode(image()) + b"\x00", "cbor", "1 bytes follow"),
    (cbor2.dumps([1, 2]), "not-map", "got list"),
    (cbor2.dumps({1: "image"}), "cbor", "not a CBOR message"),     # map keys are text strings
    (cbor2.dumps({"type": "status"}), "type", "'status'"),
    (cbor2.dumps({"series_id": 1}), "type", "None"),
    (encode(image(image_id=-1)), "field", "'image_id': expected an unsigned integer, got int"),
    (encode(image(image_id="3")), "field", "'image_id': expected an unsigned integer, got str"),
    (encode(image(series_id=True)), "field", "'series_id'"),
    (encode({k: v for k, v in image().items() if k != "series_unique_id"}), "field",
     "without field 'series_unique_id'"),
    (encode(image(data={})), "field", "'data'"),
    (encode(image(data={"t": b"raw"})), "field", "expected a multi-dimensional array"),
    (encode(image(real_time=[1, 0])), "field", "'real_time': expected a rational"),
    (encode(image(series_date="yesterday")), "field", "'series_date': expected a date/time"),
    (encode(image(data={"t": compressed(dims=(4, 4))})), "size", "declares 24 bytes, the array has 32"),
    (encode(image(data={"t": compressed(dims=(1 << 40, 1 << 40))})), "size", "elements; expected 1 to"),
    (encode(image(data={"t": compressed(dims=(0, 4))})), "size", "make 0 elements"),
    (encode(image(data={"t": compressed(data=HUGE)})), "size", f"declares {1 << 60} bytes"),
    (encode(image(data={"t": compressed(algorithm="zstd")})), "compression", "'zstd'"),
    (encode(image(data={"t": compressed(modifier=4)})), "compression", "element size 4"),
    (encode(image(data={"t": compressed(data=GOOD[:12] + b"\x00\x00\x00\x05" + b"\xff" * 20)})), "compression",
     "does not decompress"),
    (encode(image(data={"t": compressed(data=b"\x00")})), "compression", "shorter than"),
    (encode(image(data={"t": compressed(tag=71)})), "field", "typed array of uint8, uint16, uint32"),
    (encode(image(data={"t": compressed(tag=85)})), "field", "typed array of uint8, uint16, uint32"),
    (encode(image(data={"t": cbor2.CBORTag(40, [[3, 4], cbor2.CBORTag(69, b"\x00" * 23)])})), "size", "23 bytes"),
    (encode(full_start(image_dtype="float32")), "field", "'image_dtype' is 'float32'"),
    (encode(full_start(channels=[])), "field", "'channels'"),
    (encode(full_start(image_size_x=1 << 20, image_size_y=1 << 20)), "size", "pixels: expected 1 to"),
    (encode(full_start(beam_center_x="middle")), "field", "'beam_center_x': expected a float"),
    (encode(full_start(goniometer={"omega": {"start": "0"}})), "field", "'goniometer'/'omega'/'start'"),
    (encode(full_start(flatfield={"threshold_1": array_tag(np.zeros((2, 2), np.float32))})), "size",
     "the start message says [514, 1030]"),
    (encode({"type": "end", "series_id": 1}), "field", "without field 'series_unique_id'"),
]


@pytest.mark.parametrize("message,reason,words", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_input_refused_with_reason(message, reason, words):
    with pytest.raises(Stream2Error) as err:
        decode(message)
    assert err.value.reason == reason and reason in stream2.REJECT_REASONS
    assert words in str(err.value)


def test_big_endian_and_column_major_arrays():
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4)
    big = cbor2.CBORTag(40, [[3, 4], cbor2.CBORTag(65, pixels.astype(">u2").tobytes())])
    column = cbor2.CBORTag(1040, [[3, 4], cbor2.CBORTag(69, pixels.tobytes(order="F"))])
    got = decode(encode(image(data={"big": big, "column": column}))).data
    assert all(np.array_equal(got[c], pixels) and got[c].dtype == np.uint16 for c in ("big", "column"))


@pytest.mark.parametrize("algorithm", ["bslz4", "lz4", None])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
def test_encoded_frames_read_back_through_hdf5(algorithm, dtype):
    rng = np.random.default_rng(3)
    pixels = rng.poisson(2.0, (257, 301)).astype(dtype)     # odd sizes: a partial last block
    pixels[5, 7] = np.iinfo(dtype).max
    message = encode(image(data={"c": array_tag(pixels, algorithm)}))
    assert np.array_equal(decode(message).data["c"], pixels)
    if algorithm:
        assert np.array_equal(independent_channels(message)["c"], pixels)


def cbor_values():
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8),
                       st.binary(max_size=16))
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4),
        st.builds(cbor2.CBORTag, st.sampled_from([0, 40, 64, 65, 69, 70, 85, 1040, 56500, 55799]), inner)),
        max_leaves=12)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_garbage_bytes(data):
    try:
        decode(data)
    except Stream2Error as err:
        assert err.reason in stream2.REJECT_REASONS


@FUZZ
@given(st.sampled_from(["image", "start", "end"]), st.dictionaries(
    st.sampled_from(["series_id", "series_unique_id", "image_id", "data", "real_time", "channels", "image_size_x",
                     "image_size_y", "image_dtype", "number_of_images", "flatfield", "goniometer", "user_data"]),
    cbor_values(), max_size=8))
def test_fuzz_wrong_fields(kind, fields):
    try:
        decode(cbor2.dumps({"type": kind, **fields}))
    except Stream2Error as err:
        assert err.reason in stream2.REJECT_REASONS


@FUZZ
@given(st.data())
def test_fuzz_damaged_real_message(data):
    """Bytes of a real image changed at random, or cut short: an image (damage inside LZ4 literals still
    decodes) or a Stream2Error, nothing else."""
    message = bytearray(recorded("r500k_bm_bslz4_8bit")[0])
    for _ in range(data.draw(st.integers(1, 8))):
        message[data.draw(st.integers(0, len(message) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(message) - 1)))
    try:
        assert isinstance(decode(bytes(message[:cut])), Image) and cut is None
    except Stream2Error as err:
        assert err.reason in stream2.REJECT_REASONS


# ---- `detstream dcu`, served to real PULL clients ----

def start_dcu(*args: str) -> tuple[subprocess.Popen, str]:
    """`detstream dcu` on a free port of 127.0.0.1; returns the process and the address it serves."""
    process = subprocess.Popen([*DETSTREAM, "dcu", "--bind", "tcp://127.0.0.1:*", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("dcu: serving SIMPLON stream v2 on tcp://127.0.0.1:"), line + process.stderr.read()
    return process, line.split(" on ")[1].split()[0]


def receive(address: str, clients: int, expected: int) -> list[list]:
    """Decoded messages of each of `clients` PULL clients, until `expected` messages came over all."""
    context = zmq.Context.instance()
    sockets = [context.socket(zmq.PULL) for _ in range(clients)]
    poller = zmq.Poller()
    for socket in sockets:
        socket.connect(address)
        poller.register(socket, zmq.POLLIN)
    got: list[list] = [[] for _ in sockets]
    while sum(map(len, got)) < expected:
        ready = dict(poller.poll(60_000))
        assert ready, f"only {sum(map(len, got))} of {expected} messages came"
        for i, socket in enumerate(sockets):
            if socket in ready:
                got[i].append(decode(socket.recv()))
    assert not poller.poll(200), "more messages than the series hold"
    for socket in sockets:
        socket.close(linger=0)
    return got


def check_series(got: list[list], series: int, images: int) -> dict[tuple[int, int], Image]:
    """Every image of every series exactly once over the clients; each start and end once, at one client."""
    messages = [m for client in got for m in client]
    starts = sorted((m.series_id, m.series_unique_id) for m in messages if isinstance(m, Start))
    ends = sorted((m.series_id, m.series_unique_id) for m in messages if isinstance(m, End))
    assert [s for s, _ in starts] == list(range(1, series + 1)) and ends == starts
    unique_ids = dict(starts)
    assert len(set(unique_ids.values())) == series
    keys = sorted((m.series_id, m.image_id) for m in messages if isinstance(m, Image))
    assert keys == [(s, i) for s in range(1, series + 1) for i in range(images)]
    assert all(m.series_unique_id == unique_ids[m.series_id] for m in messages)
    assert all(m.number_of_images == images for m in messages if isinstance(m, Start))
    return {(m.series_id, m.image_id): m for m in messages if isinstance(m, Image)}


@pytest.mark.parametrize("folder,compression", [("r500k_bm_bslz4_16bit", None), ("r500k_bm_lz4_8bit", "bslz4")])
def test_dcu_serves_recorded_messages_to_one_client(folder, compression):
    frames = [decode(m).data for m in recorded(folder)[:10]]
    process, address = start_dcu("--messages", str(DATA / folder), "--series", "2", "--images", "13",
                                 *(["--compression", compression] if compression else []))
    got = receive(address, 1, 2 * (13 + 2))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    images = check_series(got, series=2, images=13)
    for (_, image_id), image in images.items():   # the recorded images, cycled, bit for bit
        assert all(np.array_equal(image.data[c], frames[image_id % 10][c]) for c in frames[0])
    start = next(m for m in got[0] if isinstance(m, Start))
    assert (start.channels, start.shape, start.image_dtype) == (("threshold_1", "threshold_2", "difference"), SHAPE,
                                                                frames[0]["threshold_1"].dtype)
    assert [type(m).__name__ for m in got[0][:15]] == ["Start"] + ["Image"] * 13 + ["End"]   # in order
    assert "dcu: sent 2 series, 26 images" in out


@pytest.mark.parametrize("compression", ["bslz4", "lz4"])
def test_dcu_round_robin_over_two_clients(compression):
    process, address = start_dcu("--shape", "64x96", "--dtype", "uint16", "--seed", "5", "--series", "3",
                                 "--images", "40", "--wait-clients", "2", "--compression", compression,
                                 "--user-data", '{"scan": [5, 8]}')
    got = receive(address, 2, 3 * (40 + 2))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    images = check_series(got, series=3, images=40)
    assert all(any(isinstance(m, Image) for m in client) for client in got)   # both clients had images
    simulator = Simulator(Settings(seed=5), Detector(rows=64, cols=96, sectors=1, dtype="uint16"))
    for (_, image_id), image in images.items():
        assert np.array_equal(image.data["threshold_1"], simulator.frame(0, image_id % dcu.BANK))
    assert all(m.user_data == {"scan": [5, 8]} for client in got for m in client if isinstance(m, Start))
    assert "dcu: 2 clients connected" in out and "dcu: sent 3 series, 120 images" in out


def test_dcu_refuses_a_folder_that_is_not_stream_v2(tmp_path):
    (tmp_path / "000001.cbor").write_bytes(b"not cbor")
    done = subprocess.run([*DETSTREAM, "dcu", "--messages", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "000001.cbor is not a stream v2 message: cbor:" in done.stderr
    assert "Traceback" not in done.stderr


def test_bare_ingest_counts_images_and_refusals():
    process, address = start_dcu("--messages", str(DATA / "r500k_bm_lz4_8bit"), "--series", "2")
    took = bare_ingest(address, ends=2)
    assert process.wait(timeout=60) == 0
    assert (took.starts, took.images, took.ends, took.refused) == (2, 20, 2, {})
    assert took.pixel_bytes == 20 * 3 * SHAPE[0] * SHAPE[1]

    push = zmq.Context.instance().socket(zmq.PUSH)   # garbage on the port: counted by reason, the rest taken
    port = push.bind_to_random_port("tcp://127.0.0.1")
    messages = (b"garbage", cbor2.dumps({"type": "status"}), *recorded("r500k_bm_lz4_8bit"))
    sender = threading.Thread(target=lambda: [push.send(m) for m in messages])   # PUSH waits for the client
    sender.start()
    took = bare_ingest(f"tcp://127.0.0.1:{port}", ends=1)
    sender.join()
    push.close(linger=0)
    assert (took.images, took.ends, took.refused) == (10, 1, {"cbor": 1, "type": 1})
