"""Shared test helpers (import them: `from helpers import manifest`): manifests built in code, the
detstream command line, the installed tools, polling, and background processes. Fixtures and hooks
live in conftest.py."""

from __future__ import annotations

import copy
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from detstream.services.dataplane.blocks import Blocks
from detstream.services.dataplane.wire import ASSIGN, BLOCK, BLOCK_END, END_OF_SCAN, WANT, WIRE_VERSION, Header

ROOT = Path(__file__).resolve().parents[1]
DETSTREAM = [sys.executable, "-m", "detstream.services.launcher.cli"]
# The same, with SIGINT (Ctrl-C) handled even when this test run was started with it ignored, as a shell
# starts a background job: an ignored signal stays ignored across exec, and Python then never raises
# KeyboardInterrupt.
DETSTREAM_INTERRUPTIBLE = [sys.executable, "-c", "import os, signal, sys; "
                           "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                           "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])", *DETSTREAM[1:]]


def manifest(name: str = "t", **spec) -> dict:
    """A StreamingSession manifest: a small scan by default; each key of `spec` replaces its section."""
    merged = {"scan": {"rows": 8, "cols": 8}, "workers": {"replicas": 2}, **copy.deepcopy(spec)}
    return {"apiVersion": "detstream.io/v1alpha1", "kind": "StreamingSession", "metadata": {"name": name},
            "spec": merged}


def no_stage_left(marker: str) -> list[str]:
    """Command lines of stage processes whose arguments contain `marker` (should be none)."""
    out = subprocess.run(["pgrep", "-af", f"detstream.services.launcher.cli stage .*{marker}"], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def require(tool: str) -> str:
    """The tool's path; a test without it fails in CI (where `make tools` must have run), else skips."""
    path = which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing (run `make tools`); in CI every tool must be there")
        pytest.skip(f"{tool} is not installed (`make tools` installs it)")
    return path


def which(tool: str) -> str | None:
    local = ROOT / ".tools" / "bin" / tool
    return str(local) if local.exists() else shutil.which(tool)


def wait_for(predicate, timeout=60.0, what="condition", every=0.05):
    """Poll every `every` seconds until `predicate()` is true (returned), failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(every)


class Background:
    """A long-running helper process (an operator, the node agent) writing to a log file. It dies
    with the test run even when that is killed (PR_SET_PDEATHSIG), so none is ever left behind."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None):
        self.argv, self.log_path, self.env, self.cwd = argv, Path(log_path), env, cwd
        self.start()

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    def stop(self, timeout: float = 20) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class DetectorSender:
    """A detector-side sender for tests that must send exactly what they choose (sectors withheld, frames
    skipped, a scan never ended), speaking the session's wire as a source replica does (docs/full-rate.md):
    it asks the block's lane where a block goes (WANT), sends the block's sectors to the worker the lane
    names (BLOCK, the last flagged BLOCK_END) and ends scans (END_OF_SCAN). `plan`: the session's plan;
    `keys`: a `Keys` when the session runs CURVE (the sender then holds the `external` key)."""

    def __init__(self, plan, name: str = "detector-0", keys=None, answer_s: float = 30.0):
        spec = plan.session_spec()
        self.name, self.keys, self.answer_s = name, keys, answer_s
        self.geometry = spec.detector
        self.blocks = Blocks(spec.scan.frames, spec.transport.block_frames, spec.lanes)
        self.ctx = zmq.Context()
        self.lanes = []
        for lane in range(spec.lanes):
            sock = self.ctx.socket(zmq.DEALER)
            sock.linger = 1000
            if keys is not None:
                keys.curve_client(sock, "external", f"distributor-{lane}")
            sock.connect(plan.endpoint("distributor", lane, "route"))
            self.lanes.append(sock)
        self.workers: dict = {}
        self.seq = 0

    def header(self, **fields) -> Header:
        self.seq += 1
        return Header(version=WIRE_VERSION, sender=self.name, seq=self.seq, **fields)

    def send_scan(self, scan: int, frames: dict, rows: int, cols: int) -> None:
        """Send `frames` (frame number -> [(sector, C-contiguous pixels)]) of `scan`, block by block."""
        by_block: dict = {}
        for frame in sorted(frames):
            by_block.setdefault(self.blocks.of(frame), []).append(frame)
        for block, numbers in by_block.items():
            address, key = self.route(scan, block)
            groups: dict = {}   # frames with the same sectors go in one message
            for frame in numbers:
                groups.setdefault(tuple(s for s, _ in frames[frame]), []).append(frame)
            for i, (sectors, group) in enumerate(groups.items()):
                h = self.header(kind=BLOCK, scan=scan, block=block, frames=group, sectors=sectors,
                                shape=[self.geometry.rows, self.geometry.cols // self.geometry.sectors],
                                dtype=self.dtype, flags=BLOCK_END if i == len(groups) - 1 else 0,
                                scan_rows=rows, scan_cols=cols)
                parts = [p for f in group for _, p in frames[f]]
                self.worker(address, key).send_multipart([h.SerializeToString(), *parts])

    @property
    def dtype(self) -> str:
        return np.dtype(self.geometry.dtype).str

    def route(self, scan: int, block: int) -> tuple[str, str]:
        """Ask the block's lane where it goes; its answer (address, key)."""
        lane = self.lanes[self.blocks.lane(block)]
        lane.send(self.header(kind=WANT, scan=scan, block=block).SerializeToString())
        deadline = time.monotonic() + self.answer_s
        while time.monotonic() < deadline:
            if lane.poll(100):
                h = Header.FromString(lane.recv_multipart()[0])
                if h.kind == ASSIGN and (h.scan, h.block) == (scan, block):
                    return h.address, h.key
        raise AssertionError(f"no lane answered where block {block} of scan {scan} goes")

    def worker(self, address: str, key: str):
        sock = self.workers.get(address)
        if sock is None:
            sock = self.workers[address] = self.ctx.socket(zmq.PUSH)
            sock.linger = 1000
            if self.keys is not None:
                self.keys.curve_client(sock, "external", key)
            sock.connect(address)
        return sock

    def end_scan(self, scan: int, expected: int, rows: int, cols: int) -> None:
        for lane in self.lanes:
            lane.send(self.header(kind=END_OF_SCAN, scan=scan, expected=expected, scan_rows=rows,
                                  scan_cols=cols).SerializeToString())

    def close(self) -> None:
        self.ctx.destroy(linger=1000)
