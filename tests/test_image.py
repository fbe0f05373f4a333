"""The container image's recipe. No Docker engine runs here, so the Dockerfile is checked for its
promises (multi-stage, wheels only in the runtime, non-root uid 10001, entrypoint, OCI labels),
linted with hadolint, and its builder step is replayed: `pip wheel --no-deps` of exactly what the
Dockerfile copies must give a wheel with every detstream package and the `detstream` command.

Without hadolint the lint test skips, unless $CI is set: then it fails.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile

import yaml

from helpers import ROOT, require

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def args_of(stage) -> dict:
    found = {}
    for word, rest in stage:
        if word == "ARG":
            name, _, default = rest.partition("=")
            found[name] = default
    return found


def test_multi_stage_builder_makes_wheels_runtime_installs_them_only():
    builder, runtime = stages()
    top_args = args_of(instructions()[:[w for w, _ in instructions()].index("FROM")])
    assert top_args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    assert runtime[0] == ("FROM", "${PYTHON_IMAGE}")
    builder_runs = " ".join(rest for word, rest in builder if word == "RUN")
    assert "pip wheel --no-deps --wheel-dir /wheels ." in builder_runs
    assert "pip wheel --prefer-binary --wheel-dir /wheels -r requirements.txt" in builder_runs
    runtime_runs = [rest for word, rest in runtime if word == "RUN"]
    assert len(runtime_runs) == 1
    (install,) = runtime_runs
    assert "--mount=type=bind,from=builder,source=/wheels,target=/wheels" in install  # wheels never become a layer
    assert "pip install --no-cache-dir --no-index --find-links=/wheels" in install
    assert "pip uninstall --yes pip setuptools wheel" in install
    for tool in ("apt-get", "gcc", "build-essential", "curl", "wget"):
        assert tool not in install, f"{tool} in the runtime stage"
    assert not [rest for word, rest in runtime if word in ("COPY", "ADD")], "the runtime copies nothing in"


def test_runtime_runs_as_uid_10001_with_detstream_as_entrypoint():
    runtime = stages()[-1]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users == ["10001:10001"], "numeric, so Kubernetes can verify runAsNonRoot"
    assert "useradd --system --uid 10001 --gid 10001" in " ".join(rest for w, rest in runtime if w == "RUN")
    values = yaml.safe_load((ROOT / "charts" / "detstream" / "values.yaml").read_text())
    assert values["securityContext"]["runAsUser"] == values["podSecurityContext"]["runAsUser"] == 10001
    (entrypoint,) = [rest for word, rest in runtime if word == "ENTRYPOINT"]
    assert entrypoint == '["detstream"]'
    assert runtime[-1][0] in ("ENTRYPOINT", "CMD")


def test_oci_labels_come_from_build_args():
    runtime = stages()[-1]
    args = args_of(runtime)
    labels = " ".join(rest for word, rest in runtime if word == "LABEL")
    for label, arg in (("source", "SOURCE"), ("version", "VERSION"), ("licenses", "LICENSES")):
        assert f'org.opencontainers.image.{label}="${{{arg}}}"' in labels, label
        assert arg in args, f"ARG {arg} must be declared in the runtime stage"
    assert args["LICENSES"] == "BSD-3-Clause"
    assert 'license = "BSD-3-Clause"' in (ROOT / "pyproject.toml").read_text()


def copied_sources() -> list[str]:
    sources = []
    for word, rest in stages()[0]:
        if word == "COPY" and "--from" not in rest:
            sources += rest.split()[:-1]
    return [s.rstrip("/") for s in sources]


def ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")):
            result = not negate
    return result


def test_dockerignore_keeps_the_sources_and_drops_the_rest():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert set(copied_sources()) == {"pyproject.toml", "README.md", "services", "operator", "protos"}
    for source in copied_sources():
        assert not ignored(source, patterns), f"{source} is copied but .dockerignore drops it"
    for junk in (".venv", ".git", "out", "tests", ".tools", ".pytest_cache", ".hypothesis", "__pycache__",
                 "services/__pycache__", "detstream.egg-info", "build", "dist", "benchmarks"):
        assert ignored(junk, patterns), f"{junk} would be sent to the Docker daemon"


def test_hadolint_finds_nothing():
    out = subprocess.run([require("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_builders_wheel_has_every_package_and_the_command(tmp_path):
    """Replays the builder's `pip wheel --no-deps .` on exactly the files the Dockerfile copies."""
    src = tmp_path / "src"
    src.mkdir()
    for source in copied_sources():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, src / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / source)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                          str(tmp_path / "wheels"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "wheels").glob("detstream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("detstream/services/launcher/cli.py", "detstream/services/stages/worker.py",
                   "detstream/services/plugins/electron_counting.py", "detstream/v1/control_pb2_grpc.py",
                   "detstream/v1/wire_pb2.py"):
        assert module in names, module
    assert any(n.startswith("detstream/operator/") and n.endswith(".py") for n in names), "operator missing"
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "detstream = detstream.services.launcher.cli:main" in text
