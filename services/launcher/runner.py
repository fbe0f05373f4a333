"""The local launcher: runs a session's plan as processes on 127.0.0.1.

It starts every stage, waits until all are healthy, starts the scan (sources last), follows each
stage's WatchStatus for the progress display, and when the writer has closed every scan, stops
them all. A stage that dies, a start-up that times out, or Ctrl-C stops everything that runs;
stage processes also die with the launcher itself (PR_SET_PDEATHSIG), so none is left behind.

A worker may be lost at any moment without failing the session, starting up included (its distributor
routes its blocks again to the others; all workers gone fails the session); once streaming, so may a
source that exits (its lanes close its scans by timeout and report the frames lost, then go on
with the next scan, or fail by `transport.onLoss`). Each such loss is reported (`incidents`).
A distributor or writer that exits fails the session at once, naming it. A stage
in state failed is not stopped: it exits by itself once it has served its failed state to
monitoring for $DETSTREAM_FAILED_LINGER_S seconds (see services/runtime/stage.py).
The peak resident memory (VmHWM) of every stage process is sampled and reported.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
from rich.markup import escape

from detstream.services.dataplane.security import KEYS_ENV, Keys
from detstream.services.dataplane.security import generate as generate_keys
from detstream.services.launcher.progress import Progress, Summary
from detstream.services.model.plan import START_ORDER, LocalNetwork, Plan, StagePlan, build_plan
from detstream.services.model.session import Session, read_manifest
from detstream.services.runtime.control import StageClient
from detstream.services.runtime.stage import FAILED_LINGER_ENV, STAGE_ENV, failed_linger_s
from detstream.services.sinks.output import accounting_file, existing_results, folder_problem, read_accounting
from detstream.v1.control_pb2 import FAILED, FINISHED, StageStatus

STOP_GRACE_S = 5.0
SPARE_ROLES = ("worker",)           # roles whose loss loses no data: survived at any moment, while one is left
POOL_ROLES = ("worker", "source")   # roles whose loss the session survives once streaming (a source's frames
                                    # are reported lost)
HUNG_S = 10.0                       # a stage whose status stream is silent this long is hung (at least)


class RunFailed(Exception):
    """The session cannot go on; the message says why."""


def free_ports(host: str = "127.0.0.1"):
    """Ports free now, drawn below the kernel's ephemeral range: a port the kernel hands out for
    outgoing connections (or binds to port 0) could be taken between the plan and the stage's bind."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    seen: set[int] = set()
    while True:
        port = rng.randrange(max(1024, low - 12000), low) if low > 2048 else 0
        if port in seen:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = s.getsockname()[1]
        seen.add(port)
        yield port


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class StageProcess:
    """One running stage: its process, its log, its control client and its latest status."""

    def __init__(self, stage: StagePlan, argv: list[str], log_path: Path, env: dict | None = None):
        self.stage = stage
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                                     preexec_fn=_die_with_parent)
        self.client: StageClient | None = None  # connected after every fork (see LocalSession.launch)
        self.status: StageStatus | None = None
        self.watcher: threading.Thread | None = None
        self.peak_rss = 0
        self.lost: str | None = None  # why this pool stage is gone, once it is
        self.status_at: float | None = None  # when the status stream last spoke

    def hung(self, limit: float) -> str | None:
        if self.status_at is None or self.proc.poll() is not None:
            return None
        silent = time.monotonic() - self.status_at
        if silent <= limit:
            return None
        return f"{self.stage.name} has not answered for {silent:.0f} s (hung: stopped, or stuck)"

    def sample(self) -> None:
        """Note the process's peak resident memory (VmHWM) while it is alive."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass  # gone, or not Linux

    def watch(self) -> None:
        self.status_at = time.monotonic()

        def follow():
            while self.proc.poll() is None:
                try:
                    for status in self.client.watch():
                        self.status = status
                        self.status_at = time.monotonic()
                except grpc.RpcError:
                    time.sleep(0.2)  # stopped (the launcher notices through the process), or a hiccup: again
                except ValueError:
                    return  # the launcher closed the channel
                else:
                    return  # the stage ended the stream: it is stopping
        self.watcher = threading.Thread(target=follow, name=f"watch-{self.stage.name}", daemon=True)
        self.watcher.start()

    def died(self) -> str | None:
        code = self.proc.poll()
        if code is None:
            return None
        message = self.status.message if self.status and self.status.message else self.log_tail()
        return f"{self.stage.name} exited with code {code}: {message}"

    def log_tail(self, lines: int = 3) -> str:
        self.log_file.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def failed(self) -> bool:
        """Alive in state failed: serving its metrics for a while before it exits by itself."""
        return self.proc.poll() is None and self.status is not None and self.status.state == FAILED

    @property
    def control(self) -> StageClient:
        """The stage's control client; LocalSession.launch connects it after the last fork."""
        if self.client is None:
            raise RuntimeError(f"{self.stage.name}: the control client is connected after launch()")
        return self.client

    def stop(self) -> None:
        if self.proc.poll() is None:
            if self.client is None:
                self.proc.terminate()
                return
            try:
                self.client.stop()
            except grpc.RpcError:
                self.proc.terminate()

    def reap(self, deadline: float) -> None:
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.client is not None:
            self.client.close()
        self.log_file.close()


class LocalSession:
    def __init__(self, session: Session, output: Path):
        self.session = session
        self.output = output
        self.run_dir = output / ".detstream" / session.name
        self.plan: Plan = build_plan(session, LocalNetwork(free_ports()))
        self.stages: list[StageProcess] = []
        self.keys: Keys | None = None
        self.incidents: list[str] = []  # the stages lost on the way, and why

    def launch(self) -> None:
        """Start the stage processes and connect to them."""
        self.spawn()
        self.connect()

    def spawn(self) -> None:
        """Start the stage processes (no gRPC yet: see connect)."""
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        plan_path = self.run_dir / "plan.json"
        plan_path.write_text(self.plan.to_json())
        env = {**STAGE_ENV, **os.environ}
        security = self.session.spec.security
        if security.data_plane != "plain" or security.control_plane != "insecure":
            keys = generate_keys(self.run_dir / "keys", self.plan, curve=security.data_plane == "curve",
                                 tls=security.control_plane == "mtls")
            env[KEYS_ENV] = str(keys.resolve())
            self.keys = Keys(keys)
        for stage in self.plan.stages:
            self.stages.append(StageProcess(stage, self.argv(stage), self.run_dir / "logs" / f"{stage.name}.log", env))

    def connect(self) -> None:
        """Open the control clients of the launched stages: only once every process of this
        launcher is started (gRPC must not be live while it forks: its fork handler aborts the child)."""
        for p in self.stages:
            p.client = self.client(p.stage)

    def argv(self, stage: StagePlan) -> list[str]:
        """The command that runs one stage of this session."""
        return [sys.executable, "-m", "detstream.services.launcher.cli", "stage", stage.role, "--plan",
                str(self.run_dir / "plan.json"), "--index", str(stage.index), "--output", str(self.output)]

    def client(self, stage: StagePlan, timeout: float = 5.0) -> StageClient:
        """A control client of one stage, with the launcher's certificate when the session uses mTLS."""
        credentials = None
        if self.session.spec.security.control_plane == "mtls":
            assert self.keys is not None, "launch() made the session's keys"
            credentials = self.keys.channel_credentials()
        return StageClient(f"127.0.0.1:{stage.ports['control']}", timeout, credentials)

    def check_alive(self, streaming: bool = False) -> list[str]:
        """Raise RunFailed if the session cannot go on; return the stages newly lost (also in `incidents`)."""
        lost = []
        for p in self.stages:
            if p.lost:
                continue
            p.sample()
            reason = p.died()
            if reason is None and p.status is not None and p.status.state == FAILED:
                reason = f"{p.stage.name} failed: {p.status.message}"
            if reason is None and p.stage.role not in POOL_ROLES:
                reason = p.hung(max(HUNG_S, 2 * self.session.spec.transport.worker_timeout_s))
            if reason is None:
                continue
            if p.stage.role not in SPARE_ROLES and not (streaming and p.stage.role in POOL_ROLES):
                raise RunFailed(reason)
            p.lost = reason
            lost.append(reason)
            self.incidents.append(reason)
        workers = [p for p in self.stages if p.stage.role == "worker"]
        if workers and all(p.lost for p in workers):
            raise RunFailed("every worker is gone: " + "; ".join(str(p.lost) for p in workers))
        return lost

    def wait_healthy(self) -> None:
        timeout = self.session.spec.transport.startup_timeout_s
        deadline = time.monotonic() + timeout
        waiting = list(self.stages)
        while waiting:
            self.check_alive()
            waiting = [p for p in waiting if not p.lost and not p.control.healthy()]
            if waiting and time.monotonic() > deadline:
                names = ", ".join(p.stage.name for p in waiting)
                raise RunFailed(f"not healthy after {timeout:g} s (spec.transport.startupTimeoutS): {names}")
            if waiting:
                time.sleep(0.1)

    def start(self) -> None:
        for role in START_ORDER:
            for p in self.stages:
                if p.stage.role == role and not p.lost:
                    try:
                        p.control.start()
                    except grpc.RpcError as exc:
                        self.check_alive()
                        if p.lost:
                            continue
                        raise RunFailed(f"{p.stage.name} refused Start: {exc.code().name}: {exc.details()}") from None
                    p.watch()

    def writer(self) -> StageProcess:
        return next(p for p in self.stages if p.stage.role == "writer")

    def finished(self) -> bool:
        status = self.writer().status
        return status is not None and status.state == FINISHED

    def lingering(self) -> list[StageProcess]:
        """The failed stages still serving their metrics (they exit by themselves)."""
        return [p for p in self.stages if p.failed()]

    def stop(self) -> None:
        for p in self.stages:
            p.sample()
        lingering = self.lingering()
        for p in self.stages:
            if p not in lingering:
                p.stop()
        deadline = time.monotonic() + STOP_GRACE_S + (failed_linger_s() if lingering else 0.0)
        for p in self.stages:
            p.reap(deadline)


def preflight(session: Session, output: Path, report: Path | None) -> list[str]:
    """What is wrong with the paths of the command line, found before anything starts."""
    results = output / session.spec.output.path
    problem = folder_problem(results)
    if problem:
        within = f" (spec.output.path {session.spec.output.path})" if session.spec.output.path else ""
        return [f"--output {output}{within}: {problem}; give a folder this user can write"]
    problems = []
    existing = existing_results(results, session.name, session.spec.scan.count)
    if existing:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        names = ", ".join(p.name for p in existing[:3]) + more
        problems.append(f"--output {output}: {names} in {results} would be overwritten (an earlier run of session "
                        f"{session.name}); give another --output folder, or move the files away")
    if report is not None:
        problem = f"{report} is a folder" if report.is_dir() else folder_problem(report.parent)
        if problem:
            problems.append(f"--report {report}: {problem}; give a file in a folder this user can write")
    return problems


def going_on(progress: Progress, lost: list[str]) -> None:
    for reason in lost:
        progress.say(f"[yellow]detstream: {escape(reason)}; the session goes on without it[/]")


def run_session(manifest: Path, output: Path, report: Path | None, quiet: bool = False) -> int:
    session = read_manifest(manifest)
    problems = preflight(session, output, report)
    for problem in problems:
        print(f"detstream run: {problem}", file=sys.stderr)
    if problems:
        return 2
    local = LocalSession(session, output)
    progress = Progress(session, quiet=quiet)
    failure = None
    t0 = time.monotonic()
    with ExitStack() as stack:
        stack.callback(local.stop)
        try:
            local.launch()
            progress.say(f"session {session.name}: {len(local.stages)} stages starting "
                         f"(logs in {local.run_dir / 'logs'})")
            local.wait_healthy()
            url = local.plan.live_url()
            if url:  # also with --quiet (no progress display): the one line a user needs while it runs
                print(f"detstream: live view of session {session.name} at {url}", file=sys.stderr, flush=True)
            local.start()
            if session.spec.source.kind == "external":
                ingest = [local.plan.endpoint("distributor", lane, "route") for lane in range(session.spec.lanes)]
                progress.say(f"waiting for {session.spec.source.replicas} external source(s): "
                             f"detstream stage source --manifest {manifest} "
                             + " ".join(f"--connect {e}" for e in ingest))
            going_on(progress, local.incidents)  # lost while starting
            t0 = time.monotonic()
            with progress.live():
                while not local.finished():
                    going_on(progress, local.check_alive(streaming=True))
                    progress.update(local.stages)
                    time.sleep(0.25)
            local.writer().status = local.writer().control.status()
        except RunFailed as exc:
            failure = str(exc)
            lingering = ", ".join(p.stage.name for p in local.lingering())
            if lingering:
                progress.say(f"waiting up to {failed_linger_s():g} s for {lingering} to exit: a failed stage "
                             f"serves its metrics for that long so that monitoring sees it ({FAILED_LINGER_ENV})")
        except KeyboardInterrupt:
            failure = "interrupted (Ctrl-C)"
    writer = next((p.status for p in local.stages if p.stage.role == "writer"), None)
    closed = read_accounting(accounting_file(output / session.spec.output.path, session.name))
    summary = Summary.of(session, writer, time.monotonic() - t0, failure, stages=local.stages,
                         incidents=local.incidents, closed=closed)
    progress.show(summary)
    if report:
        try:
            report.write_text(summary.to_json())
        except OSError as exc:  # checked before the start, so only a disk filled since then
            print(f"detstream run: --report {report}: cannot be written: {exc.strerror}", file=sys.stderr)
            return 1
    return summary.exit_code
