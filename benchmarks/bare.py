"""Bare pyzmq: a session's data plane with nothing but ZeroMQ, the baseline of the framework.

The same processes and hops as a detstream session

    source x S --> aggregator x L --> distributor x L ==> worker x M ==> writer

PUSH/PULL all the way, the same message sizes (a 64-byte header with one 576x144 uint16 sector
per message from the sources, then one message of the frame's 4 sector buffers per frame), the
same high-water mark, zero-copy: every stage receives with copy=False and forwards the very
buffers it received. What a bare stage does is the least its role needs: the aggregator groups
the sectors of a frame by frame number, the others forward; no control plane, no credits, no
checks, no accounting. The frames come from detstream's own simulator (`mode="simulator"`, the
same work as a session's source) or are the same few buffers sent again and again (`"bank"`,
the transport alone). `one_hop()` is a single PUSH/PULL hop of whole frames: the transport
ceiling of the machine.

`direct=True` is the shape the full-rate issue proposes, for measuring it before building it: the
sources send their sectors straight to the worker that takes the frame (no aggregator, no
distributor: frames are assigned to workers in blocks of `batch`, round-robin), `batch` frames per
message; the worker gathers a block's messages from every source, then sends the writer either the
whole block (`full_result`, as the noop plugin returns its frame) or one small message saying the
block is done. `transport` is tcp (loopback) or ipc (Unix domain sockets).

Each stage is a process (`python -m benchmarks.bare CONFIG`); the writer prints when the last
frame arrived, on the system-wide monotonic clock the caller also reads.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import zmq

from benchmarks.processes import cpu_seconds, end, free_port, spawn
from benchmarks.report import ROOT

HEADER = struct.Struct("<QQQ40x")  # scan, frame, sector: 64 bytes, about a detstream header's size
BANK = 16


@dataclass
class Topology:
    frames: int
    sources: int = 1
    lanes: int = 1
    workers: int = 2
    sectors: int = 4
    rows: int = 576
    cols: int = 576
    hwm: int = 16
    mode: str = "simulator"      # simulator | bank
    copy: bool = False           # False: zero-copy sends
    one_hop: bool = False        # source -> writer directly, a frame per message
    direct: bool = False         # sources -> workers -> writer, `batch` frames per message (see above)
    batch: int = 1
    full_result: bool = True     # direct: the worker sends the writer the frames (else a small receipt)
    transport: str = "tcp"       # tcp | ipc
    ingest: list = field(default_factory=list)   # ports, per lane
    frames_ports: list = field(default_factory=list)
    work: list = field(default_factory=list)
    results: int = 0


def _socket(ctx, kind, hwm):
    s = ctx.socket(kind)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RCVHWM, hwm)
    s.setsockopt(zmq.LINGER, -1 if kind == zmq.PUSH else 0)
    return s


def _endpoint(t: Topology, port: int) -> str:
    return f"ipc:///tmp/detstream-bare-{port}" if t.transport == "ipc" else f"tcp://127.0.0.1:{port}"


def _pushes(ctx, t: Topology, ports: list) -> list:
    """A PUSH socket connected to each of `ports`."""
    sockets = []
    for port in ports:
        s = _socket(ctx, zmq.PUSH, t.hwm)
        s.connect(_endpoint(t, port))
        sockets.append(s)
    return sockets


def _ready():
    print("ready", flush=True)


def source(t: Topology, index: int) -> None:
    ctx = zmq.Context()
    mine = [s for s in range(t.sectors) if s % t.sources == index]
    width = t.cols // t.sectors
    if t.mode == "simulator":
        from detstream.services.model.session import Detector
        from detstream.services.model.session import Simulator as Settings
        from detstream.services.sources.simulator import Simulator
        sim = Simulator(Settings(), Detector(rows=t.rows, cols=t.cols, sectors=t.sectors))
        sector = sim.sector
    else:
        rng = np.random.default_rng(1)
        bank = [[rng.integers(90, 130, (t.rows, width), dtype=np.uint16) for _ in range(t.sectors)]
                for _ in range(BANK)]
        sector = lambda scan, frame, s: bank[frame % BANK][s]  # noqa: E731
    if t.direct:
        workers = _pushes(ctx, t, t.work)
        _ready()
        sys.stdin.readline()
        for first in range(0, t.frames, t.batch):
            frames = range(first, min(first + t.batch, t.frames))
            parts = [sector(0, frame, s) for frame in frames for s in mine]
            workers[(first // t.batch) % t.workers].send_multipart([HEADER.pack(0, first, len(frames))] + parts,
                                                                    copy=t.copy)
    elif t.one_hop:
        out = _socket(ctx, zmq.PUSH, t.hwm)
        out.connect(_endpoint(t, t.results))
        _ready()
        sys.stdin.readline()
        for frame in range(t.frames):
            out.send_multipart([HEADER.pack(0, frame, 0)] + [sector(0, frame, s) for s in range(t.sectors)],
                               copy=t.copy)
    else:
        lanes = _pushes(ctx, t, t.ingest)
        _ready()
        sys.stdin.readline()
        for frame in range(t.frames):
            out = lanes[frame % t.lanes]
            for s in mine:
                out.send_multipart([HEADER.pack(0, frame, s), sector(0, frame, s)], copy=t.copy)
    sys.stdin.readline()  # keep the sockets (and what they still queue) until the caller ends this process


def aggregator(t: Topology, lane: int) -> None:
    ctx = zmq.Context()
    ingest = _socket(ctx, zmq.PULL, t.hwm)
    ingest.bind(_endpoint(t, t.ingest[lane]))
    out = _socket(ctx, zmq.PUSH, t.hwm)
    out.connect(_endpoint(t, t.frames_ports[lane]))
    _ready()
    pending: dict[int, list] = {}
    mine = len(range(lane, t.frames, t.lanes))
    for _ in range(mine):
        while True:
            header, pixels = ingest.recv_multipart(copy=False)
            _, frame, s = HEADER.unpack(header.buffer)
            parts = pending.setdefault(frame, [None] * t.sectors)
            parts[s] = pixels
            if all(p is not None for p in parts):
                del pending[frame]
                out.send_multipart([HEADER.pack(0, frame, 0), *parts], copy=t.copy)
                break
    sys.stdin.readline()


def forward(t: Topology, pull: zmq.Socket, push: zmq.Socket) -> None:
    while True:
        push.send_multipart(pull.recv_multipart(copy=False), copy=t.copy)


def distributor(t: Topology, lane: int) -> None:
    ctx = zmq.Context()
    pull = _socket(ctx, zmq.PULL, t.hwm)
    pull.bind(_endpoint(t, t.frames_ports[lane]))
    push = _socket(ctx, zmq.PUSH, t.hwm)
    push.bind(_endpoint(t, t.work[lane]))
    _ready()
    forward(t, pull, push)


def worker(t: Topology, index: int) -> None:
    ctx = zmq.Context()
    pull = _socket(ctx, zmq.PULL, t.hwm)
    if t.direct:
        pull.bind(_endpoint(t, t.work[index]))
    else:
        for port in t.work:
            pull.connect(_endpoint(t, port))
    push = _socket(ctx, zmq.PUSH, t.hwm)
    push.connect(_endpoint(t, t.results))
    _ready()
    if not t.direct:
        forward(t, pull, push)
    pending: dict[int, list] = {}  # a block's first frame -> the parts of the sources heard from so far
    while True:
        header, *parts = pull.recv_multipart(copy=False)
        _, first, count = HEADER.unpack(header.buffer)
        block = pending.setdefault(first, [])
        block.append(parts)
        if len(block) == t.sources:
            del pending[first]
            payload = [p for source_parts in block for p in source_parts] if t.full_result else []
            push.send_multipart([HEADER.pack(0, first, count)] + payload, copy=t.copy)


def writer(t: Topology, index: int) -> None:
    ctx = zmq.Context()
    pull = _socket(ctx, zmq.PULL, t.hwm)
    pull.bind(_endpoint(t, t.results))
    _ready()
    cpu0 = time.process_time()
    header, *_ = pull.recv_multipart(copy=False)
    first = time.monotonic()
    # a message carries one frame, or a block of them (direct: its count is the header's third field)
    received = HEADER.unpack(header.buffer)[2] if t.direct else 1
    while received < t.frames:
        header, *_ = pull.recv_multipart(copy=False)
        received += HEADER.unpack(header.buffer)[2] if t.direct else 1
    last = time.monotonic()
    print(json.dumps({"first": first, "last": last, "cpu": time.process_time() - cpu0}), flush=True)


ROLES = {"source": source, "aggregator": aggregator, "distributor": distributor, "worker": worker, "writer": writer}


def run(t: Topology, timeout: float = 300.0) -> dict:
    """Run the topology once: seconds from the sources' start to the last frame at the writer, and
    the CPU seconds every process spent meanwhile."""
    t.results = free_port()
    t.ingest = [free_port() for _ in range(t.lanes)]
    t.frames_ports = [free_port() for _ in range(t.lanes)]
    t.work = [free_port() for _ in range(t.lanes)]
    roles = [("writer", 0)]
    if t.direct:
        t.work = [free_port() for _ in range(t.workers)]  # each worker binds its own
        roles += [("worker", i) for i in range(t.workers)]
    elif not t.one_hop:
        roles += [("worker", i) for i in range(t.workers)] + [("distributor", i) for i in range(t.lanes)] \
            + [("aggregator", i) for i in range(t.lanes)]
    roles += [("source", i) for i in range(t.sources)]
    config = json.dumps(asdict(t))
    procs = {}
    try:
        for role, index in roles:
            procs[role, index] = spawn([sys.executable, "-m", "benchmarks.bare", role, str(index), config], cwd=ROOT,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
        for (role, index), p in procs.items():
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"bare {role}-{index} did not start: {line!r}")
        time.sleep(0.5)  # connections made (ZeroMQ connects in the background)
        cpu0 = {key: cpu_seconds(p.pid) for key, p in procs.items()}
        t0 = time.monotonic()
        for (role, _), p in procs.items():
            if role == "source":
                p.stdin.write("go\n")
                p.stdin.flush()
        writer_proc = procs["writer", 0]
        writer_proc.wait(timeout)
        times = json.loads(writer_proc.stdout.readline())
        cpu = {f"{role}-{index}": cpu_seconds(p.pid) - cpu0[role, index] for (role, index), p in procs.items()
               if p.poll() is None}
        cpu["writer-0"] = times["cpu"]
        return {"seconds": times["last"] - t0, "frames": t.frames, "cpu": cpu}
    finally:
        end(list(procs.values()))


def one_hop(frames: int, copy: bool, hwm: int = 16, transport: str = "tcp") -> dict:
    return run(Topology(frames=frames, mode="bank", one_hop=True, copy=copy, hwm=hwm, transport=transport))


if __name__ == "__main__":
    role, index, config = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    try:
        ROLES[role](Topology(**config), index)
    except KeyboardInterrupt:
        pass
