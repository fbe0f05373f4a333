"""detstream sessions run from a benchmark: the local launcher in this process, timed by the writer
from its Start (the first stage started; the sources are started last) to its end (every scan
closed), with the CPU time and memory of every stage process."""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.processes import cpu_seconds, memory
from benchmarks.report import ROOT
from detstream.services.launcher.runner import LocalSession
from detstream.services.model.session import load_session
from detstream.v1.control_pb2 import FAILED, FINISHED

POLL_S = 0.1  # the writer answers each poll: 40 Hz cost it ~0.02 core, as much as a fifth of its work
THRESHOLDS = (32, 50)  # fixed electron-counting thresholds (the simulator's pedestal + 4 and + 10 noise sigma)
COUNTING = {"name": "electron-counting",
            "params": {"dark": "simulated", "backgroundThreshold": THRESHOLDS[0], "xrayThreshold": THRESHOLDS[1]}}


def manifest(name: str, **spec) -> dict:
    """A session of the benchmarks: noop on a 64x64 scan, live view off (the data plane alone; benchmarks/live.py
    measures the live view's cost); each key of `spec` replaces its section."""
    merged = {"scan": {"rows": 64, "cols": 64}, "workers": {"replicas": 2}, "plugin": {"name": "noop"},
              "liveView": {"enabled": False}, **copy.deepcopy(spec)}
    return {"apiVersion": "detstream.io/v1alpha1", "kind": "StreamingSession", "metadata": {"name": name},
            "spec": merged}


class SessionRun:
    """A session launched and healthy (start-up is not timed); `stream()` runs it to the end."""

    def __init__(self, doc: dict, workdir: Path):
        self.doc = doc
        self.workdir = Path(workdir)
        self.local: LocalSession | None = None

    def __enter__(self) -> SessionRun:
        self.local = LocalSession(load_session(self.doc), self.workdir)
        try:
            self.local.launch()
            self.local.wait_healthy()
        except BaseException:
            self.local.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.local.stop()

    @property
    def pids(self) -> dict[str, int]:
        return {p.stage.name: p.proc.pid for p in self.local.stages}

    def status(self, name: str):
        return next(p for p in self.local.stages if p.stage.name == name).client.status()

    def stream(self, timeout: float = 300.0, every: float = 0.0, sample=None) -> dict:
        """Start the stages (sources last) and wait until the writer has closed every scan.
        `sample(elapsed)` is called about every `every` seconds meanwhile. The seconds are the
        writer's own, from its Start to its end: neither the poll for its end (every POLL_S) nor
        the status call counts. (A stage of a revision before its elapsed time stopped at its end,
        see `--against`, counts both.)"""
        cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        writer = self.local.writer().client
        t0 = time.monotonic()
        self.local.start()
        next_sample = t0
        while True:
            status = writer.status()
            now = time.monotonic()
            if status.state == FINISHED:
                break
            if status.state == FAILED:
                raise RuntimeError(f"writer failed: {status.message}")
            if now - t0 > timeout:
                raise RuntimeError(f"session not finished after {timeout:g} s (writer: {status})")
            if sample is not None and now >= next_sample:
                sample(now - t0)
                next_sample = now + every
            self.local.check_alive(streaming=False)
            time.sleep(POLL_S)
        seconds = min(status.elapsed_s, now - t0)
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in self.pids.items()}
        peak = {name: memory(pid)[1] for name, pid in self.pids.items()}
        return {"seconds": seconds, "cpu": cpu, "peak_rss": peak, "writer": status}


@contextmanager
def bench_plugins():
    """Make the benchmark plugins (benchmarks/plugins.py) loadable by name, here and in stage processes."""
    with tempfile.TemporaryDirectory(prefix="detstream-bench-plugins-") as tmp:
        info = Path(tmp) / "detstream_bench_plugins-0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: detstream-bench-plugins\nVersion: 0\n")
        (info / "entry_points.txt").write_text("[detstream.plugins]\nbench-sleep = benchmarks.plugins:Sleep\n")
        paths = [tmp, str(ROOT)]
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
        sys.path[:0] = paths
        try:
            yield
        finally:
            for p in paths:
                sys.path.remove(p)
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old


def _main() -> None:
    """`python -m benchmarks.sessions MANIFEST_JSON WORKDIR`: run it once, print the result as JSON
    (how a session runs with the code of another revision, see benchmarks/revision.py)."""
    import json
    doc, workdir = json.loads(sys.argv[1]), Path(sys.argv[2])
    with SessionRun(doc, workdir) as run:
        result = run.stream()
    result["writer"] = {"frames_in": result["writer"].frames_in}
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
