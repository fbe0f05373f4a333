"""The committed generated code is what `make protos` produces from protos/."""

import filecmp
import shutil
import subprocess
import sys

from helpers import ROOT


def test_generated_code_is_fresh(tmp_path):
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    base = [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos", "--python_out=protos", "--pyi_out=protos"]
    subprocess.run(base + ["protos/detstream/v1/wire.proto"], cwd=tmp_path, check=True)
    subprocess.run(base + ["--grpc_python_out=protos", "protos/detstream/v1/control.proto"], cwd=tmp_path, check=True)
    fresh = tmp_path / "protos" / "detstream" / "v1"
    committed = ROOT / "protos" / "detstream" / "v1"
    generated = sorted(p.name for p in fresh.iterdir() if p.suffix in (".py", ".pyi"))
    assert generated == sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
    stale = [name for name in generated if not filecmp.cmp(fresh / name, committed / name, shallow=False)]
    assert not stale, f"run `make protos`: stale generated files {stale}"
