"""The install scripts on a fresh machine: a missing program is named, a broken build is never trusted.

These run the real scripts (`tests/cluster/build.sh`, `.ci/install-tools`) in a sandboxed PATH or cache,
so that a program can be missing or a cached binary broken without touching this machine.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT, require

BUILD = ROOT / "tests" / "cluster" / "build.sh"


def fake_binary(path: Path, version_line: str | None) -> None:
    """An executable at `path` that prints `version_line`, or an empty file (a build cut short)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n" if version_line else "")
    path.chmod(0o755)


def cache_is_trusted(cache: Path) -> bool:
    result = subprocess.run(["bash", str(BUILD), "--cached"], env={**os.environ, "DETSTREAM_CACHE": str(cache)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


@pytest.mark.parametrize("apiserver, controller_manager, trusted", [
    ("Kubernetes v1.20.2", "Kubernetes v1.20.2", True),
    (None, None, False),                                    # 0-byte files left by an interrupted build
    ("Kubernetes v1.20.2", None, False),                    # one of the two broken
    ("Kubernetes v1.19.0", "Kubernetes v1.19.0", False),    # another version
])
def test_build_trusts_only_binaries_that_run(tmp_path, apiserver, controller_manager, trusted):
    require("etcd")     # build.sh --cached also wants the run-time programs
    require("openssl")
    bin_dir = tmp_path / "kubernetes-v1.20.2" / "bin"
    fake_binary(bin_dir / "kube-apiserver", apiserver)
    fake_binary(bin_dir / "kube-controller-manager", controller_manager)
    assert cache_is_trusted(tmp_path) is trusted


def test_a_failed_build_leaves_nothing_a_later_run_trusts(tmp_path):
    """A cache holding a 0-byte binary (an interrupted build) and a build that then fails (here: an apt-get
    that fetches no source): the run fails, and leaves no bin/ and no work folder behind."""
    require("etcd")
    cache = tmp_path / "cache"
    fake_binary(cache / "kubernetes-v1.20.2" / "bin" / "kube-apiserver", None)
    fake_binary(cache / "kubernetes-v1.20.2" / "bin" / "kube-controller-manager", None)
    sandbox = path_without(tmp_path / "path", {"apt-get", "sudo"}, {"apt-get": "#!/bin/sh\nexit 0\n"})
    result = subprocess.run(["bash", str(BUILD)],
                            env={**os.environ, "PATH": str(sandbox), "DETSTREAM_CACHE": str(cache)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "apt-get source kubernetes did not give" in result.stderr, result.stderr
    assert not (cache / "kubernetes-v1.20.2" / "bin").exists()
    assert not list((cache / "kubernetes-v1.20.2").glob("work.*"))
    assert not cache_is_trusted(cache)


def path_without(folder: Path, left_out: set[str], extra: dict[str, str] | None = None) -> Path:
    """A PATH folder of links to every program on this PATH but `left_out`, plus `extra` scripts."""
    folder.mkdir(parents=True)
    for d in os.environ["PATH"].split(os.pathsep):
        for program in Path(d).glob("*") if Path(d).is_dir() else ():
            link = folder / program.name
            if program.name not in left_out and not link.exists() and os.access(program, os.X_OK):
                link.symlink_to(program)
    for name, text in (extra or {}).items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def test_install_tools_names_a_program_it_could_not_install(tmp_path):
    """pgrep missing, and an apt-get that installs nothing: the script stops and names the program and its
    package, instead of leaving a test to fail later with 'No such file'."""
    require("helm")  # the .tools/bin part is already installed, so only the system programs are checked
    sandbox = path_without(tmp_path / "path", {"pgrep", "apt-get", "sudo"}, {"apt-get": "#!/bin/sh\nexit 0\n"})
    result = subprocess.run(["bash", str(ROOT / ".ci" / "install-tools")], env={**os.environ, "PATH": str(sandbox)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "pgrep (Debian package procps)" in result.stderr, result.stderr
