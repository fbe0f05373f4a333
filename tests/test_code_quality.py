"""The code keeps its habits: ruff, mypy and the import contracts (.importlinter) pass, each run as the
real tool from this interpreter's environment (the `test` extra installs them). A failure shows the
tool's own report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

BIN = Path(sys.executable).parent


def run(argv: list[str], env: dict | None = None) -> None:
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout}{out.stderr}"


def test_ruff_finds_nothing():
    run([sys.executable, "-m", "ruff", "check", "--no-cache", "."])


def test_mypy_finds_nothing():
    run(["bash", str(ROOT / ".ci" / "mypy")], env=dict(os.environ, PYTHON=sys.executable))


def test_the_import_contracts_are_kept():
    run([str(BIN / "lint-imports"), "--no-cache"])
