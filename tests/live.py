"""A `detstream run` under test: started as a user starts it, watched and disturbed from outside.

`Live` runs the session as a subprocess (optionally with failpoints in its environment), finds the
stage processes by their command lines, reads the stages' status over gRPC and their metrics over
HTTP, and collects the exit status, the stderr and the JSON report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from detstream.services.model.plan import Plan
from detstream.services.runtime.control import StageClient

from helpers import DETSTREAM, no_stage_left, wait_for


class Live:
    def __init__(self, doc: dict, tmp_path: Path, failpoints: str = "", extra_env: dict | None = None):
        self.name = doc["metadata"]["name"]
        self.out = tmp_path / "out"
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.manifest = tmp_path / f"{self.name}.yaml"
        self.manifest.write_text(yaml.safe_dump(doc))
        self.report_path = self.out / "report.json"
        self.run_dir = self.out / ".detstream" / self.name
        env = dict(os.environ, **(extra_env or {}))
        if failpoints:
            env["DETSTREAM_FAILPOINTS"] = failpoints
        self.proc = subprocess.Popen(DETSTREAM + ["run", str(self.manifest), "--output", str(self.out),
                                                  "--report", str(self.report_path), "--quiet"],
                                     stderr=subprocess.PIPE, text=True, env=env)
        self._plan: Plan | None = None
        self._clients: dict[str, StageClient] = {}
        self.stderr = ""

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            path = self.run_dir / "plan.json"
            wait_for(lambda: path.exists() and path.stat().st_size, what="plan.json")
            self._plan = Plan.read(path)
        return self._plan

    def stage(self, name: str):
        role, index = name.rsplit("-", 1)
        return self.plan.stage(role, int(index))

    def pid(self, name: str) -> int:
        role, index = name.rsplit("-", 1)
        pattern = f"cli stage {role} --plan {self.run_dir / 'plan.json'} --index {index} "
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        assert len(out) == 1, f"{name}: processes {out}"
        return int(out[0])

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.pid(name), sig)

    def client(self, name: str) -> StageClient:
        if name not in self._clients:
            stage = self.stage(name)
            self._clients[name] = StageClient(f"127.0.0.1:{stage.ports['control']}", timeout=3)
        return self._clients[name]

    def status(self, name: str):
        try:
            return self.client(name).status()
        except Exception:
            return None

    def written(self) -> int:
        status = self.status("writer-0")
        return sum(s.written for s in status.scans) if status else 0

    def metrics(self, name: str) -> list[tuple[str, dict, float]]:
        port = self.stage(name).ports["metrics"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]

    def metric(self, name: str, metric: str, **labels) -> float:
        return sum(v for n, got, v in self.metrics(name)
                   if n == metric and all(got.get(k) == x for k, x in labels.items()))

    def wait_started(self, frames: int = 1, timeout: float = 60.0) -> None:
        wait_for(lambda: self.proc.poll() is not None or self.written() >= frames, timeout,
                 f"{frames} frames written")
        assert self.proc.poll() is None, f"session ended early: {self.finish()[1]}"

    def finish(self, timeout: float = 120.0) -> tuple[int, str, dict | None]:
        """Wait for `detstream run` to end: (exit status, stderr, report)."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        try:
            _, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            _, self.stderr = self.proc.communicate(timeout=30)
            raise AssertionError(f"detstream run hung; stderr:\n{self.stderr}") from None
        report = json.loads(self.report_path.read_text()) if self.report_path.exists() else None
        assert not no_stage_left(str(self.run_dir)), "stage processes left behind"
        return self.proc.returncode, self.stderr, report

    def log(self, name: str) -> str:
        return (self.run_dir / "logs" / f"{name}.log").read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
