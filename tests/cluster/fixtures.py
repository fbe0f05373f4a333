"""pytest fixtures around ControlPlane. Import them into a test module:

    from cluster.fixtures import control_plane, kubectl  # noqa: F401

DETSTREAM_SKIP_CLUSTER=1 skips every test that uses `control_plane`; otherwise the first use builds
Kubernetes once (5-10 min, cached) and starts a fresh control plane (~10-20 s) for the whole session.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import require

from .controlplane import ControlPlane

SKIP = os.environ.get("DETSTREAM_SKIP_CLUSTER") == "1"
skip_if_no_cluster = pytest.mark.skipif(SKIP, reason="DETSTREAM_SKIP_CLUSTER=1")


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
