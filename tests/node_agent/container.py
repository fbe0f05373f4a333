"""One container of a pod, run as a local process, as a kubelet and a container runtime would.

- The image is this checkout's Dockerfile: its ENTRYPOINT, CMD, WORKDIR and ENV (last stage) are
  read from it; its installed program is the venv the agent runs from (first on PATH).
- Command and args follow the container runtime's rules (`command` replaces ENTRYPOINT and drops
  CMD; `args` replaces CMD) and the kubelet's `$(VAR)` expansion.
- Environment: the image's ENV, HOSTNAME, then `env` (values, downward-API fieldRefs, ConfigMap and
  Secret keys) and `envFrom`. A reference that cannot be resolved leaves the container waiting in
  CreateContainerConfigError, as on a cluster.
- Volumes are folders of the pod (see pod.py). The process cannot see them at their mountPath, so
  every argument, env value and the working directory that names a path under a mountPath is
  rewritten to the volume's folder (`--plan /etc/detstream/plan.json` becomes
  `--plan PODDIR/volumes/plan/plan.json`); TMPDIR points at a volume mounted at /tmp. Nothing else
  is translated: a path the manifests do not mount stays as it is, and is not there.
- The process runs in its own mount namespace where the pod's hosts file is bind-mounted over
  /etc/hosts (the kubelet manages each pod's /etc/hosts too) and the pod's own folder over /run
  (= /var/run), holding the volumes mounted under it at their real paths: the ServiceAccount token
  volume that ServiceAccount admission adds (/var/run/secrets/kubernetes.io/serviceaccount), which
  client libraries read there. It runs in its own process group and dies with the agent
  (PR_SET_PDEATHSIG).
- KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT name the API server, as the kubelet's do.
- restartPolicy with the kubelet's back-off (the first restart at once, then 10 s, 20 s, ... 300 s,
  shown as waiting CrashLoopBackOff), exit codes (128+signal), termination messages
  (FallbackToLogsOnError: the log's last 80 lines / 2048 bytes).
- Readiness and liveness probes (exec, httpGet, tcpSocket) with their delays, periods, timeouts
  and thresholds; an exec probe runs with the container's environment in a namespace like its.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from .node import now

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
BACKOFF_S, BACKOFF_MAX_S, BACKOFF_RESET_S = 10.0, 300.0, 600.0
LOG_TAIL_LINES, LOG_TAIL_BYTES = 80, 2048

log = logging.getLogger("node-agent")

_libc = ctypes.CDLL(None, use_errno=True)  # resolved here: a forked child must not load libraries
_prctl, _unshare, _mount = _libc.prctl, _libc.unshare, _libc.mount
PR_SET_PDEATHSIG, CLONE_NEWNS, CLONE_NEWUSER = 1, 0x00020000, 0x10000000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000


class ConfigError(Exception):
    """The container cannot be created as specified (CreateContainerConfigError)."""


def image_config(dockerfile: Path = ROOT / "Dockerfile") -> dict:
    """ENTRYPOINT, CMD, WORKDIR and ENV of the Dockerfile's last stage (exec forms only)."""
    lines = re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines()
    last = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    image = {"entrypoint": [], "cmd": [], "workdir": "/", "env": {}}
    for line in lines[last:]:
        word, _, rest = line.strip().partition(" ")
        word = word.upper()
        if word in ("ENTRYPOINT", "CMD"):
            image[word.lower()] = json.loads(rest)
        elif word == "WORKDIR":
            image["workdir"] = rest.strip()
        elif word == "ENV":
            image["env"].update(item.split("=", 1) for item in shlex.split(rest))
    image["env"]["PATH"] = f"{VENV_BIN}:/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
    return image


IMAGE = image_config()


def expand(text: str, env: dict) -> str:
    """The kubelet's $(VAR) expansion: defined variables are replaced, $$ escapes, others stay."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class Paths:
    """Rewrites paths under a mountPath to the volume's folder on this machine."""

    def __init__(self, mounts: dict[str, Path]):
        self.mounts = sorted(mounts.items(), key=lambda m: -len(m[0]))

    def path(self, text: str) -> str:
        for mount, host in self.mounts:
            mount = mount.rstrip("/") or "/"
            if text == mount or text.startswith(mount + "/"):
                return str(host) + text[len(mount):]
        return text

    def arg(self, text: str) -> str:
        """A whole argument, or the value of `--flag=/path`."""
        if text.startswith("/"):
            return self.path(text)
        flag, eq, value = text.partition("=")
        return flag + eq + self.path(value) if eq and value.startswith("/") else text


def in_pod_namespace(hosts_file: Path, run_dir: Path):
    """preexec_fn: die with the agent; own mount namespace with the pod's hosts file on /etc/hosts and
    the pod's own /run (where the volumes mounted under /run and /var/run are: the ServiceAccount's)."""
    hosts = str(hosts_file).encode()
    run = str(run_dir).encode(), os.path.realpath("/var/run").encode()
    uid, gid, root = os.getuid(), os.getgid(), os.geteuid() == 0

    def setup():
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if _unshare(CLONE_NEWNS if root else CLONE_NEWNS | CLONE_NEWUSER):
            raise OSError(ctypes.get_errno(), "unshare (a mount namespace for the pod's /etc/hosts)")
        if not root:  # an unprivileged user namespace: keep our own ids inside it
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        if _mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None):
            raise OSError(ctypes.get_errno(), "mount (a private mount namespace)")
        for source, target in ((hosts, b"/etc/hosts"), run):
            if _mount(source, target, None, MS_BIND, None):
                raise OSError(ctypes.get_errno(), f"mount (the pod's {target.decode()})")
    return setup


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class Run:
    """One start of a container: its process and what the probes found."""

    def __init__(self, argv: list[str], env: dict, cwd: str, log_path: Path, pod_namespace):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=pod_namespace)
        self.started_at = now()
        self.ended = threading.Event()      # set by the agent's loop when it sees the exit
        self.ready = False
        self.unhealthy = ""                 # why the liveness probe failed
        self.stopping = False

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds (in a thread: never blocks)."""
        if self.stopping:
            return
        self.stopping = True

        def kill():
            self.signal(signal.SIGTERM)
            if not self.ended.wait(grace):
                self.signal(signal.SIGKILL)
        threading.Thread(target=kill, daemon=True, name=f"stop-{self.proc.pid}").start()


class Container:
    def __init__(self, pod, spec: dict):
        self.pod = pod
        self.spec = spec
        self.name = spec["name"]
        self.run: Run | None = None
        self.restarts = 0
        self.ever_started = False
        self.waiting = ("ContainerCreating", "")
        self.last: dict | None = None        # lastState.terminated
        self.terminated: dict | None = None  # state.terminated (no restart coming)
        self.next_start = 0.0
        self.backoff = 0.0
        self.backoff_at = 0.0

    # -- what to run -------------------------------------------------------------------------------
    def environment(self) -> dict:
        pod = self.pod
        # the kubelet's: where the API server is (kube-proxy would route the `kubernetes` Service there)
        env = {**IMAGE["env"], "HOSTNAME": pod.hostname, "HOME": str(pod.root), **pod.agent.api_service_env()}
        for source in self.spec.get("envFrom") or []:
            ref = source.get("configMapRef") or source.get("secretRef")
            data = pod.key_source("configMap" if "configMapRef" in source else "secret", ref["name"],
                                  optional=ref.get("optional", False))
            env.update({source.get("prefix", "") + k: v for k, v in data.items()})
        for var in self.spec.get("env") or []:
            if "value" in var or "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[var["name"]] = pod.field(source["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in source or "secretKeyRef" in source:
                kind = "configMap" if "configMapKeyRef" in source else "secret"
                ref = source[kind + "KeyRef"]
                data = pod.key_source(kind, ref["name"], optional=ref.get("optional", False))
                if ref["key"] not in data and not ref.get("optional"):
                    raise ConfigError(f"couldn't find key {ref['key']} in {kind} {pod.namespace}/{ref['name']}")
                if ref["key"] in data:
                    env[var["name"]] = data[ref["key"]]
            else:
                raise ConfigError(f"env {var['name']}: {', '.join(source)} is not supported by the test node agent")
        # Paths the pod's spec gives are rewritten to its volumes; the image's own variables are not
        # (PATH names this machine's venv, which may itself lie under a mount path such as /tmp).
        env = {k: v if IMAGE["env"].get(k) == v else pod.paths.path(v) for k, v in env.items()}
        if "TMPDIR" not in env and pod.paths.path("/tmp") != "/tmp":
            env["TMPDIR"] = pod.paths.path("/tmp")
        return env

    def argv(self, env: dict) -> list[str]:
        command = self.spec.get("command") or IMAGE["entrypoint"]
        args = self.spec.get("args") if "args" in self.spec or self.spec.get("command") else IMAGE["cmd"]
        argv = [self.pod.paths.arg(expand(a, env)) for a in [*command, *(args or [])]]
        if not argv:
            raise ConfigError("no command specified")
        return argv

    def cwd(self) -> str:
        workdir = self.pod.paths.path(self.spec.get("workingDir") or IMAGE["workdir"])
        return workdir if Path(workdir).is_dir() else str(self.pod.root)

    # -- the loop ---------------------------------------------------------------------------------
    def sync(self) -> None:
        """Called by the agent's loop: notice an exit, restart by the policy and back-off."""
        run = self.run
        if run is not None:
            if run.proc.poll() is None:
                if run.unhealthy and not run.stopping:
                    self.pod.event("Killing", f"Container {self.name} failed liveness probe, will be restarted",
                                   warning=False)
                    run.stop(self.grace())
                return
            self.exited(run)
        if self.pod.terminating or self.terminated is not None or time.monotonic() < self.next_start:
            return
        self.start()

    def exited(self, run: Run) -> None:
        run.ended.set()
        run.signal(signal.SIGKILL)  # whatever else the container started goes with it
        code = exit_code(run.proc.returncode)
        self.record(code, "Completed" if code == 0 else "Error", self.termination_message(run, code),
                    run.started_at)
        log.info("pod %s container %s exited with code %d", self.pod.name, self.name, code)

    def record(self, code: int, reason: str, message: str, started_at: str) -> None:
        self.run = None
        state = {"exitCode": code, "reason": reason, "startedAt": started_at, "finishedAt": now()}
        if message:
            state["message"] = message
        policy = self.pod.spec.get("restartPolicy", "Always")
        if self.pod.terminating or policy == "Never" or (policy == "OnFailure" and code == 0):
            self.terminated = state
            return
        self.last = state
        t = time.monotonic()
        if self.backoff and t - self.backoff_at > BACKOFF_RESET_S:
            self.backoff = 0.0
        self.next_start = t + self.backoff
        if self.backoff:
            pod = self.pod
            self.waiting = ("CrashLoopBackOff", f"back-off {self.backoff:.0f}s restarting failed container="
                                                f"{self.name} pod={pod.name}_{pod.namespace}({pod.uid})")
            pod.event("BackOff", "Back-off restarting failed container", warning=True)
        self.backoff = min(BACKOFF_MAX_S, 2 * self.backoff) if self.backoff else BACKOFF_S
        self.backoff_at = t

    def start(self) -> None:
        pod = self.pod
        try:
            env = self.environment()
            argv = self.argv(env)
        except ConfigError as exc:
            if self.waiting != ("CreateContainerConfigError", str(exc)):
                pod.event("Failed", f"Error: {exc}", warning=True)
            self.waiting = ("CreateContainerConfigError", str(exc))
            self.next_start = time.monotonic() + 2
            return
        restarted = self.ever_started
        self.ever_started = True
        if restarted:
            self.restarts += 1
        started_at = now()
        try:
            self.run = Run(argv, env, self.cwd(), pod.root / "logs" / self.name / f"{self.restarts}.log",
                           pod.namespace_setup())
        except (OSError, subprocess.SubprocessError) as exc:
            message = (f'exec: "{argv[0]}": executable file not found in $PATH' if isinstance(exc, FileNotFoundError)
                       else f"{argv[0]}: {exc}")
            pod.event("Failed", f"Error: {message}", warning=True)
            self.record(128, "StartError", message, started_at)
            return
        log.info("pod %s container %s started (pid %d): %s", pod.name, self.name, self.run.proc.pid, shlex.join(argv))
        pod.event("Started", f"Started container {self.name}", warning=False)
        for kind in ("readiness", "liveness"):
            if self.spec.get(f"{kind}Probe"):
                threading.Thread(target=self.probe_loop, args=(self.run, kind, self.spec[f"{kind}Probe"], env),
                                 daemon=True, name=f"{kind}-{pod.name}").start()
        if not self.spec.get("readinessProbe"):
            self.run.ready = True

    def stop(self, grace: float) -> None:
        if self.run is not None:
            self.run.stop(grace)

    def grace(self) -> float:
        return float(self.pod.spec.get("terminationGracePeriodSeconds", 30))

    def termination_message(self, run: Run, code: int) -> str:
        """FallbackToLogsOnError: the end of the log when the container failed (no message file here)."""
        if self.spec.get("terminationMessagePolicy") != "FallbackToLogsOnError" or code == 0:
            return ""
        data = run.log_path.read_bytes()[-LOG_TAIL_BYTES:]
        return b"\n".join(data.splitlines()[-LOG_TAIL_LINES:]).decode(errors="replace")

    # -- probes -----------------------------------------------------------------------------------
    def probe_loop(self, run: Run, kind: str, spec: dict, env: dict) -> None:
        period, failures_allowed = spec.get("periodSeconds", 10), spec.get("failureThreshold", 3)
        successes_needed = spec.get("successThreshold", 1)
        if run.ended.wait(spec.get("initialDelaySeconds", 0)):
            return
        successes = failures = 0
        while not run.ended.is_set() and not run.stopping:
            ok, output = self.probe(spec, env)
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            if run.ended.is_set() or run.stopping:
                return
            if kind == "readiness":
                if ok and successes >= successes_needed:
                    run.ready = True
                elif not ok and failures >= failures_allowed:
                    if run.ready or failures == failures_allowed:
                        self.pod.event("Unhealthy", f"Readiness probe failed: {output}", warning=True)
                    run.ready = False
            elif not ok and failures >= failures_allowed:
                self.pod.event("Unhealthy", f"Liveness probe failed: {output}", warning=True)
                run.unhealthy = output or "liveness probe failed"
                return
            run.ended.wait(period)

    def probe(self, spec: dict, env: dict) -> tuple[bool, str]:
        timeout = spec.get("timeoutSeconds", 1)
        try:
            if "exec" in spec:
                argv = [self.pod.paths.arg(a) for a in spec["exec"]["command"]]
                proc = subprocess.Popen(argv, env=env, cwd=self.cwd(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=self.pod.namespace_setup())
                try:
                    out, _ = proc.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate()
                    return False, f"command timed out after {timeout}s"
                return proc.returncode == 0, out.decode(errors="replace").strip()[-300:]
            if "httpGet" in spec:
                get = spec["httpGet"]
                url = (f"{get.get('scheme', 'HTTP').lower()}://{get.get('host') or self.pod.ip}:"
                       f"{self.port(get['port'])}{get.get('path', '/')}")
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return 200 <= resp.status < 400, f"HTTP {resp.status}"
            if "tcpSocket" in spec:
                tcp = spec["tcpSocket"]
                socket.create_connection((tcp.get("host") or self.pod.ip, self.port(tcp["port"])), timeout).close()
                return True, ""
            return False, f"probe {sorted(spec)} is not supported by the test node agent"
        except (OSError, ValueError) as exc:
            return False, str(exc)

    def port(self, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        return next(p["containerPort"] for p in self.spec.get("ports", []) if p.get("name") == port)

    # -- what the API server is told --------------------------------------------------------------
    def status(self) -> dict:
        out = {"name": self.name, "image": self.spec.get("image", ""), "imageID": "", "restartCount": self.restarts,
               "ready": bool(self.run and self.run.ready and not self.run.stopping), "started": self.run is not None}
        if self.run is not None:
            out["containerID"] = f"process://{self.run.proc.pid}"
            out["state"] = {"running": {"startedAt": self.run.started_at}}
        elif self.terminated is not None:
            out["state"] = {"terminated": self.terminated}
        else:
            out["state"] = {"waiting": {"reason": self.waiting[0], **({"message": self.waiting[1]}
                                                                      if self.waiting[1] else {})}}
        if self.last is not None:
            out["lastState"] = {"terminated": self.last}
        return out

    @property
    def alive(self) -> bool:
        return self.run is not None
