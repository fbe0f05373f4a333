"""Hypothesis drives the message handling of every stage with thousands of generated messages,
mostly well-formed enough to get past the header codec into the stages' own logic: nothing may
raise, every bad message is counted, and the stages' books stay consistent.

The pipeline's stages run in this process on real sockets (their own ports, as in a session), so
what one stage emits reaches the next when they are pumped."""


import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detstream.services.dataplane.wire import WIRE_VERSION, WireError, decode
from detstream.services.launcher.runner import free_ports
from detstream.services.model.plan import LocalNetwork, build_plan
from detstream.services.model.session import load_session
from detstream.services.stages import distributor, source, worker, writer
from detstream.v1 import wire_pb2
from detstream.v1.wire_pb2 import Header

from helpers import manifest

KINDS = [k for k in wire_pb2.Kind.values()] + [99]


TRANSPORT = {"highWaterMark": 100000, "frameTimeoutS": 0.05, "endOfScanTimeoutS": 0.2, "workerTimeoutS": 0.2,
             "heartbeatS": 0.05, "blockFrames": 4}
SESSIONS = {   # 4D-STEM (whole frames), and tomography routed by slice (2 bands of 4 rows; worker 0 has band 0)
    "4d-stem": dict(scan={"rows": 4, "cols": 4, "count": 3}, workers={"replicas": 1, "credits": 4},
                    plugin={"name": "electron-counting", "params": {"backgroundThreshold": 2, "xrayThreshold": 9}}),
    "tomo": dict(scan={"rows": 1, "cols": 16, "count": 3}, workers={"replicas": 2, "credits": 4},
                 tomography={"angles": 12, "darks": 2, "flats": 2}, plugin={"name": "tomo-fbp"},
                 source={"kind": "tomo-simulator", "replicas": 1})}


@pytest.fixture(scope="module", params=list(SESSIONS))
def stages(tmp_path_factory, request):
    doc = manifest("fuzz", detector={"rows": 8, "cols": 8, "sectors": 2}, transport=TRANSPORT,
                   **{"source": {"replicas": 1}, **SESSIONS[request.param]})
    plan = build_plan(load_session(doc), LocalNetwork(free_ports()))
    out = tmp_path_factory.mktemp("fuzz")
    built = {"writer": writer.WriterStage(plan, 0, output=out), "worker": worker.WorkerStage(plan, 0),
             "distributor": distributor.DistributorStage(plan, 0), "source": source.SourceStage(plan, 0)}
    for stage in built.values():
        stage.reactor.poll_ms = 0  # a turn takes what is there and returns
        stage.setup()
        stage.start()
    yield built
    for stage in built.values():
        stage.ctx.destroy(linger=0)


TARGETS = ["source", "distributor-route", "distributor-work", "distributor-receipts", "worker", "writer"]
NATURAL = {wire_pb2.BLOCK: ["worker"], wire_pb2.SAMPLE: ["worker"], wire_pb2.WANT: ["distributor-route"],
           wire_pb2.ASSIGN: ["source"], wire_pb2.RELEASE: ["source"],
           wire_pb2.RESULT: ["writer"], wire_pb2.END_OF_SCAN: ["distributor-route", "writer"],
           wire_pb2.CREDIT: ["distributor-work"], wire_pb2.HEARTBEAT: ["distributor-work"],
           wire_pb2.RECEIPT: ["distributor-receipts"], wire_pb2.CALIBRATION: ["writer"],
           wire_pb2.VOLUME: ["writer"], wire_pb2.PREVIEW: ["writer"], wire_pb2.GONE: ["source"]}
ADDRESSES = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:0", "tcp://nowhere", "ipc:///tmp/x", "", "tcp://[::1]:5"]
KEYS = ["worker-0", "worker-7", "", "../../etc/passwd"]
PEERS = [b"peer-a", b"peer-b", b"\x00"]


def build(kind, scan, frame, sector, mutation, target, seed):
    """A message of `kind` as the session would carry it, then (by `mutation`) broken in one way."""
    rng = np.random.default_rng(seed)
    h = Header(version=WIRE_VERSION, kind=kind, scan=scan, scan_rows=4, scan_cols=4,
               sender=["source-0", "distributor-0", "worker-0", "x"][seed % 4], band=seed % 5 // 2)
    parts = []
    rows = 4 if seed % 5 == 1 else 8   # a band's rows (tomo), or a whole frame's
    if kind in (wire_pb2.BLOCK, wire_pb2.SAMPLE):   # blocks of 4 frames; one or both sectors of 1-2 frames
        h.shape.extend([rows, 4])
        h.dtype = "<u2"
        h.block = frame // 4
        h.frames.extend(sorted({frame, min(frame + seed % 2, h.block * 4 + 3)}))
        h.sectors.extend([sector % 2] if seed % 3 else [0, 1])
        parts = [rng.integers(0, 12, rows * 4, dtype=np.uint16).tobytes()
                 for _ in range(len(h.frames) * len(h.sectors))]
        h.flags = int(rng.integers(0, 16))
    elif kind in (wire_pb2.WANT, wire_pb2.ASSIGN):
        h.block = frame // 4 + seed % 2
        h.address, h.key = ADDRESSES[seed % len(ADDRESSES)], KEYS[seed % len(KEYS)]
        h.flags = int(rng.integers(0, 4))
    elif kind == wire_pb2.VOLUME:   # band 0's 4 slices of 8x8 and its 12 angles, or a shape of another band
        h.shape.extend([4 if seed % 3 else 5, 8, 8])
        h.dtype = "<f4"
        parts = [rng.random(h.shape[0] * 64, np.float32).tobytes(), np.packbits(rng.random(12) < 0.9).tobytes()]
    elif kind == wire_pb2.PREVIEW:  # band 1's chosen slice (the middle one, 4) of 8x8, or two slices
        h.shape.extend([1 if seed % 3 else 2, 8, 8])
        h.dtype = "<f4"
        parts = [rng.random(h.shape[0] * 64, np.float32).tobytes(), np.packbits(rng.random(12) < 0.9).tobytes()]
    elif kind == wire_pb2.GONE:
        h.address = ADDRESSES[seed % len(ADDRESSES)]
    elif kind == wire_pb2.RESULT:
        h.result = ["events", "volume"][seed % 2]
        h.frames.extend(sorted({frame, (frame + seed % 3) % 16}))   # one or two frames' results
        h.sector_masks.extend([3 if seed % 4 else 1] * len(h.frames))
        h.part_counts.extend([1] * len(h.frames))
        parts = [np.unique(rng.integers(0, 64, int(rng.integers(0, 5)))).astype(np.uint32).tobytes()
                 for _ in h.frames]
    elif kind == wire_pb2.END_OF_SCAN:
        h.expected, h.sent = 16, int(rng.integers(0, 17))
        h.lost = 16 - h.sent
        if h.lost and seed % 2:  # the bitmap of the lost frames, as a distributor sends it (or one more)
            lost = np.zeros(16, bool)
            lost[rng.choice(16, min(16, h.lost + seed % 3 // 2), replace=False)] = True
            parts = [np.packbits(lost).tobytes()]
    elif kind == wire_pb2.CALIBRATION:  # a worker's, or JSON of the wrong shape, or not JSON at all
        parts = [[b'{"electron_counting": {"background_threshold": 32.5, "threshold_calculated": true}}',
                  b'{"electron_counting": [1, 2]}', b'[]', b'{"a": {"b": null}}', b'\xff{'][seed % 5]]
    elif kind in (wire_pb2.CREDIT, wire_pb2.HEARTBEAT, wire_pb2.RECEIPT, wire_pb2.RELEASE):
        h.credit = int(rng.integers(0, 6)) if kind == wire_pb2.CREDIT else 0
        h.address, h.key = ADDRESSES[seed % len(ADDRESSES)], KEYS[seed % len(KEYS)]
        h.acked.extend(int(scan) << 40 | int(f) for f in rng.integers(0, 16, int(rng.integers(0, 4))))
        h.bands.extend(int(b) for b in rng.integers(0, 3, len(h.acked) if seed % 4 else 1))
        h.frames.extend(int(f) for f in rng.integers(0, 17, int(rng.integers(0, 3))))   # a worker's absent frames
    if mutation == 6:
        h.version = 1
    elif mutation == 7 and parts:
        parts.pop()
    elif mutation == 8 and parts:
        parts[0] = parts[0][: len(parts[0]) // 2 + 1]
    elif mutation == 9:
        h.dtype, h.result = "<f4", "frames"
    elif mutation == 10:
        return target, [rng.bytes(int(rng.integers(1, 60))), *parts]
    elif mutation == 11:
        h.scan_rows, h.credit = 8, 2**32 - 1
    elif mutation == 12 and h.frames:
        h.frames[-1] = 16 + seed % 3
    elif mutation == 13:
        parts.append(rng.bytes(8))
    return target, [h.SerializeToString(), *parts]


@st.composite
def messages(draw):
    kind = draw(st.sampled_from(KINDS))
    natural = NATURAL.get(kind, TARGETS)
    target = draw(st.one_of(st.sampled_from(natural), st.sampled_from(TARGETS)))
    target, raw = build(kind, draw(st.integers(0, 3)), draw(st.integers(0, 16)), draw(st.integers(0, 2)),
                        draw(st.integers(0, 13)), target, draw(st.integers(0, 2**32 - 1)))
    return target, raw, draw(st.sampled_from(PEERS))


def deliver(stages, target, raw, peer):
    stage = stages[target.split("-")[0]]
    try:
        msg = decode(raw, stage.geometry)
    except WireError as exc:
        stage.reject(exc)
        return
    if target == "source":
        stage.from_lane(0, msg)
    elif target == "distributor-route":
        stage.from_source(peer, msg)
    elif target == "distributor-work":
        stage.from_worker(peer, msg)
    elif target == "distributor-receipts":
        stage.from_writer(msg)
    elif target == "writer":
        stage.handle(msg)
    else:
        stage.from_source(msg)


def check_books(stages):
    d = stages["distributor"]
    assert all(s.in_flight >= 0 and s.count <= s.done.size for s in d.ledger.scans.values())
    assert all(w.credit <= d.spec.workers.credits for w in d.ledger.workers.values())   # (below 0: it owes)
    w = stages["writer"]
    assert all(s.count == s.done.sum() <= s.done.size for s in w.accounts.scans.values())
    assert all(a.written + a.lost <= a.expected for a in w.accounts.recent)
    assert all(s.in_flight == sum(len(r.open) for r in d.ledger.routes.values() if r.scan == n)
               for n, s in d.ledger.scans.items())
    assert len(stages["source"].window.kept) <= stages["source"].window.limit   # the window stays bounded


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(messages(), min_size=1, max_size=8))
def test_stages_take_any_sequence_of_messages_without_failing(stages, batch):
    before = {name: sum(s.counters.rejected.values()) for name, s in stages.items()}
    for target, raw, peer in batch:
        deliver(stages, target, [zmq.Frame(p) for p in raw], peer)
    for stage in stages.values():  # let what they emitted flow on, and their timers run
        stage.reactor.turn()
    for name, stage in stages.items():
        assert sum(stage.counters.rejected.values()) >= before[name]
    check_books(stages)

