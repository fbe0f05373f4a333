"""pytest fixtures around ControlPlane. Import them into a test module:

    from cluster.fixtures import control_plane, helm, kubectl  # noqa: F401

DETSTREAM_SKIP_CLUSTER=1 skips every test that uses `control_plane`; otherwise the first use builds
Kubernetes once (5-10 min, cached) and starts a fresh control plane (~10-20 s) for the whole session.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from .controlplane import ControlPlane
from helpers import require

SKIP = os.environ.get("DETSTREAM_SKIP_CLUSTER") == "1"
skip_if_no_cluster = pytest.mark.skipif(SKIP, reason="DETSTREAM_SKIP_CLUSTER=1")
# What the API server and kopf log when RBAC refuses a ServiceAccount (the operator's log must not say it);
# the quotes are escaped where a log shows the API server's JSON reply.
RBAC_DENIAL = re.compile(r'forbidden: User \\?"system:serviceaccount:|Not enough permissions')


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> ControlPlane:
    if SKIP:
        pytest.skip("DETSTREAM_SKIP_CLUSTER=1")
    cp = ControlPlane(tmp_path_factory.mktemp("controlplane"))
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


class Kubectl:
    """Runs `kubectl` (the one `make tools` installs, else the machine's) against one control plane, never the
    developer's own KUBECONFIG."""

    def __init__(self, cp: ControlPlane):
        self.cp = cp
        self.exe = require("kubectl")  # a fresh machine has only .tools/bin's
        self.env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig)}
        self.cache = cp.workdir / "kubectl-cache"

    def run(self, *args: str, token: str | None = None, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        if token is None:  # admin (system:masters) by client certificate
            auth = [f"--kubeconfig={self.cp.kubeconfig}"]
        else:  # the token alone: a kubeconfig with a client cert would authenticate as admin first
            empty = self.cp.workdir / "empty.kubeconfig"
            empty.touch()
            auth = [f"--kubeconfig={empty}", f"--server={self.cp.server}",
                    f"--certificate-authority={self.cp.ca_file}", f"--token={token}"]
        r = subprocess.run([self.exe, *auth, f"--cache-dir={self.cache}", *args], input=input,
                           capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r

    def __call__(self, *args: str, **kw) -> str:
        return self.run(*args, **kw).stdout


@pytest.fixture(scope="session")
def kubectl(control_plane) -> Kubectl:
    return Kubectl(control_plane)


class Helm:
    """The real `helm` (v4), against the test control plane only, with its own cache and config."""

    def __init__(self, cp, home):
        self.exe = require("helm")
        self.cp = cp
        self.env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_DATA_HOME": str(home / "data")}
        self.env.pop("KUBECONFIG", None)

    def __call__(self, *args: str, values: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.exe, *args, "--kubeconfig", str(self.cp.kubeconfig)]
        if values is not None:
            path = self.cp.workdir / "helm-values.yaml"
            path.write_text(yaml.safe_dump(values))
            cmd += ["-f", str(path)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=180)
        if check:
            assert out.returncode == 0, f"helm {' '.join(args)} failed:\n{out.stdout}{out.stderr}"
        return out


@pytest.fixture(scope="module")
def helm(kubectl, tmp_path_factory):  # noqa: F811
    return Helm(kubectl.cp, tmp_path_factory.mktemp("helm"))
