"""Another revision of detstream's code, runnable side by side with this checkout's.

`python -m benchmarks.pipeline --against REV` runs the same session with the stage code of REV
in the same run, for before/after ratios. The revision's `services/`, `protos/` and `operator/`
are extracted (git archive, the repository is not touched) into a folder laid out as the
installed package (`detstream/services`, `detstream/v1`, `detstream/operator`); a Python process
with that folder first on PYTHONPATH imports the old code, and the stage processes it starts
inherit it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

from benchmarks.report import ROOT


@contextmanager
def checkout(rev: str):
    """A folder to put first on PYTHONPATH to import detstream as it was at `rev`."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "services", "protos", "operator"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="detstream-rev-") as tmp:
        src = Path(tmp) / "src"
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(src, filter="data")
        pkg = Path(tmp) / "path" / "detstream"
        pkg.mkdir(parents=True)
        (pkg / "services").symlink_to(src / "services")
        (pkg / "operator").symlink_to(src / "operator")
        (pkg / "v1").symlink_to(src / "protos" / "detstream" / "v1")
        yield str(pkg.parent)


def run_session(path: str, doc: dict, workdir: Path, timeout: float = 300.0) -> dict:
    """Run one session with the code on `path` (from `checkout`), in a child process; its result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([path, str(ROOT)]))
    if doc["spec"].get("liveView") == {"enabled": False}:  # what a revision before the live view did anyway
        doc = {**doc, "spec": {k: v for k, v in doc["spec"].items() if k != "liveView"}}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sessions", json.dumps(doc), str(workdir)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"session with the code of another revision failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
