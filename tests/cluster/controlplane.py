"""A real Kubernetes v1.20.2 control plane on 127.0.0.1: etcd + kube-apiserver + kube-controller-manager.

Stdlib only. The Kubernetes binaries come from build.sh beside this file (built once from Debian's
source package, then cached); etcd is Debian's etcd-server. Every start is a fresh cluster: new
certificates, empty etcd, free ports picked at start so that runs do not collide. There is no
scheduler and no kubelet: Pods stay Pending.

    with ControlPlane(workdir) as cp:
        subprocess.run(["kubectl", "--kubeconfig", cp.kubeconfig, "get", "namespaces"])

Command line (used by up.sh / down.sh): `python3 controlplane.py serve WORKDIR` starts a control plane,
writes WORKDIR/ready (the server URL) and keeps it up until SIGTERM/SIGINT.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VERSION = "v1.20.2"
HERE = Path(__file__).resolve().parent
SERVICE_CIDR = "10.0.0.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"


class ControlPlaneError(RuntimeError):
    pass


def bin_dir() -> Path:
    cache = os.environ.get("DETSTREAM_CACHE") or Path.home() / ".cache" / "detstream"
    return Path(cache) / f"kubernetes-{VERSION}" / "bin"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all bound at once, so the ports are distinct
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the process that started it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _make_pki(d: Path) -> None:
    """A CA; a serving cert for 127.0.0.1/localhost (apiserver and etcd); client certs; the SA key pair."""
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        r = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True)
        if r.returncode:
            raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{r.stderr}")

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]  # EC: much faster than RSA
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "3650", "-subj", "/CN=detstream-test-ca")
    sans = "IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1"
    certs = {  # name: (subject, extensions)
        "server": ("/CN=kube-apiserver", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth"),
        "admin": ("/O=system:masters/CN=detstream-admin", "extendedKeyUsage=clientAuth"),
        # the user the bootstrap RBAC policy grants the controller-manager's own rights to
        "controller-manager": ("/CN=system:kube-controller-manager", "extendedKeyUsage=clientAuth"),
        "etcd-client": ("/CN=kube-apiserver-etcd-client", "extendedKeyUsage=clientAuth"),
    }
    for name, (subject, ext) in certs.items():
        (d / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\n{ext}\n")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "3650", "-sha256", "-extfile", f"{name}.ext")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key")  # signs ES256
    openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")


def _write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: detstream
  cluster:
    server: {server}
    certificate-authority-data: {b64("ca.crt")}
users:
- name: {user}
  user:
    client-certificate-data: {b64(f"{user}.crt")}
    client-key-data: {b64(f"{user}.key")}
contexts:
- name: detstream
  context:
    cluster: detstream
    user: {user}
current-context: detstream
""")
    path.chmod(0o600)


class ControlPlane:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir).resolve()
        self.pki = self.workdir / "pki"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.ca_file = self.pki / "ca.crt"
        self.server = ""
        self._procs: list[tuple[str, subprocess.Popen]] = []

    # -- public ---------------------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> None:
        """Build the binaries if missing (not counted in `timeout`), start all, wait until usable."""
        self._ensure_binaries()
        for attempt in range(3):
            try:
                self._start_once(time.monotonic() + timeout)
                return
            except BaseException as e:
                self.stop()
                # A free port picked at start can be taken by someone else before we bind it: retry.
                if not (isinstance(e, ControlPlaneError) and "address already in use" in str(e)) or attempt == 2:
                    raise

    def stop(self) -> None:
        """Terminate every process (controller-manager, apiserver, etcd), wait, kill stragglers."""
        procs, self._procs = self._procs, []
        for _, p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for _, p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        atexit.unregister(self.stop)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------------------
    def _ensure_binaries(self) -> None:
        # build.sh alone decides whether the cache can be trusted (binaries that run and report VERSION)
        if subprocess.run(["bash", str(HERE / "build.sh"), "--cached"], capture_output=True).returncode == 0:
            return
        print(f"[controlplane] building Kubernetes {VERSION} (once; cached in {bin_dir()})", file=sys.stderr,
              flush=True)
        # Own process group, so that an interrupted build (Ctrl-C, pytest-timeout) takes `go build` down too.
        build = subprocess.Popen(["bash", str(HERE / "build.sh")], start_new_session=True)
        try:
            rc = build.wait()
        except BaseException:
            os.killpg(build.pid, signal.SIGTERM)
            try:
                build.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(build.pid, signal.SIGKILL)  # whatever is left of the group (grandchildren)
            build.wait()
            raise
        if rc != 0:
            raise ControlPlaneError(f"{HERE / 'build.sh'} failed with code {rc} (see its output above)")

    @staticmethod
    def _etcd() -> str | None:
        return shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)

    def _start_once(self, deadline: float) -> None:
        w, pki, b = self.workdir, self.pki, bin_dir()
        w.mkdir(parents=True, exist_ok=True)
        for old in ("etcd-data", "pki"):  # every start is a fresh cluster
            shutil.rmtree(w / old, ignore_errors=True)
        _make_pki(pki)
        etcd_port, peer_port, api_port = _free_ports(3)
        self.server = f"https://127.0.0.1:{api_port}"
        _write_kubeconfig(self.kubeconfig, self.server, pki, "admin")
        _write_kubeconfig(w / "controller-manager.kubeconfig", self.server, pki, "controller-manager")
        atexit.register(self.stop)

        etcd_url, peer_url = f"https://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        self._spawn("etcd", [
            self._etcd() or "etcd", "--name=detstream", f"--data-dir={w / 'etcd-data'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=detstream={peer_url}",
            f"--cert-file={pki / 'server.crt'}", f"--key-file={pki / 'server.key'}",
            "--client-cert-auth", f"--trusted-ca-file={pki / 'ca.crt'}",
        ])
        self._wait(deadline, "etcd", lambda: b'"true"' in self._get(f"{etcd_url}/health", "etcd-client"))

        self._spawn("kube-apiserver", [
            str(b / "kube-apiserver"), "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}", "--insecure-port=0",
            f"--etcd-servers={etcd_url}", f"--etcd-cafile={pki / 'ca.crt'}",
            f"--etcd-certfile={pki / 'etcd-client.crt'}", f"--etcd-keyfile={pki / 'etcd-client.key'}",
            f"--tls-cert-file={pki / 'server.crt'}", f"--tls-private-key-file={pki / 'server.key'}",
            f"--client-ca-file={pki / 'ca.crt'}", "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-account-issuer={ISSUER}", f"--api-audiences={ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true", "--profiling=false",
            # the apiserver refuses 127.0.0.1 as the `kubernetes` Service's endpoint: don't manage it
            "--endpoint-reconciler-type=none",
            f"--cert-dir={w / 'apiserver-certs'}",
        ])
        self._wait(deadline, "kube-apiserver", lambda: self._get(f"{self.server}/readyz") == b"ok")

        self._spawn("kube-controller-manager", [
            str(b / "kube-controller-manager"), f"--kubeconfig={w / 'controller-manager.kubeconfig'}",
            "--port=0", "--secure-port=0",  # serve nothing: no fixed ports to collide on
            "--leader-elect=false", "--use-service-account-credentials=true",
            # the token controller: ServiceAccount token Secrets, needed by ServiceAccount admission
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false",
        ])
        # Ready when its controllers act: the default ServiceAccount exists and has its token Secret.
        self._wait(deadline, "kube-controller-manager", self._default_token_exists)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 cwd=self.workdir, preexec_fn=_die_with_parent)
        finally:
            log.close()
        self._procs.append((name, p))

    def _get(self, url: str, cert: str = "admin") -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(self.pki / f"{cert}.crt", self.pki / f"{cert}.key")
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
                return r.read()
        except (OSError, urllib.error.URLError):
            return b""

    def _default_token_exists(self) -> bool:
        body = self._get(f"{self.server}/api/v1/namespaces/default/serviceaccounts/default")
        return bool(body and json.loads(body).get("secrets"))

    def _wait(self, deadline: float, component: str, ready) -> None:
        while True:
            for name, p in self._procs:
                if p.poll() is not None:
                    log = self.workdir / (name + ".log")
                    raise ControlPlaneError(f"{name} exited with code {p.returncode}; tail of {log}:\n{_tail(log)}")
            if ready():
                return
            if time.monotonic() > deadline:
                log = self.workdir / f"{component}.log"
                raise ControlPlaneError(f"{component} not ready in time; tail of {log}:\n{_tail(log)}")
            time.sleep(0.25)

    def alive(self) -> list[str]:
        return [name for name, p in self._procs if p.poll() is None]


def serve(workdir: Path) -> int:
    """Start a control plane and keep it up until SIGTERM/SIGINT (for up.sh / down.sh)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for f in ("ready", "failed"):
        (workdir / f).unlink(missing_ok=True)
    (workdir / "serve.pid").write_text(f"{os.getpid()}\n")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    cp = ControlPlane(workdir)
    try:
        cp.start()
    except Exception as e:
        (workdir / "failed").write_text(f"{e}\n")
        raise
    (workdir / "ready").write_text(f"{cp.server}\n")
    print(f"[controlplane] up: {cp.server}, kubeconfig {cp.kubeconfig}", flush=True)
    try:
        while not stopping:
            if len(cp.alive()) < 3:
                print(f"[controlplane] a component died (alive: {cp.alive()}); see {workdir}/*.log", flush=True)
                return 1
            time.sleep(1)
        return 0
    finally:
        cp.stop()
        for f in ("ready", "serve.pid"):
            (workdir / f).unlink(missing_ok=True)
        print("[controlplane] stopped", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit(f"usage: {sys.argv[0]} serve WORKDIR")
    sys.exit(serve(Path(sys.argv[2])))
