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

import pytest

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
