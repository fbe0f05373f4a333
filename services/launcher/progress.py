"""What `detstream run` shows: live per-stage rates while streaming, and the closing summary.

On a terminal the display is a live table; elsewhere (CI, pipes) a plain line every few
seconds. The summary is also the `--report` JSON, with stable keys.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from detstream.services.dataplane.accounting import frames_so_far, scan_record
from detstream.services.plugins import session_bands
from detstream.v1.control_pb2 import StageState

PLAIN_EVERY_S = 5.0
RATE_WINDOW_S = 2.0  # rates are averaged over this much of a stage's time (4 status intervals)
# Frames into and out of each stage; a distributor's are the frames it routed (their pixels go past it).
COLUMNS = ("stage", "state", "in\n(frames)", "out\n(frames)", "out/s\n(frames)", "GB/s out", "in flight", "rejected")


def console() -> Console:
    """stderr; off a terminal (CI, pipes) lines are never wrapped and tables get room for paths."""
    out = Console(stderr=True, soft_wrap=True)
    return out if out.is_terminal else Console(stderr=True, soft_wrap=True, width=240)


class Rate:
    """A stage's send rate over the last RATE_WINDOW_S of its own clock, from its status samples.

    Stages send their status every 0.5 s and the launcher looks every 0.25 s: dividing by the
    launcher's interval would read every other look as 0 and the next as twice the rate. So
    the rate is the change of the stage's counters over the change of its own elapsed time,
    across the samples of a window a few status intervals long: steady.
    """

    def __init__(self):
        self.samples: deque[tuple[float, int, int]] = deque()  # (elapsed_s, frames_out, bytes_out)

    def add(self, elapsed_s: float, frames: int, nbytes: int) -> None:
        """A status sample; one the stage sent already (same elapsed time) is ignored."""
        if self.samples and elapsed_s <= self.samples[-1][0]:
            return
        self.samples.append((elapsed_s, frames, nbytes))
        while len(self.samples) > 2 and elapsed_s - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()

    def _per_second(self, column: int) -> float:
        if len(self.samples) < 2:
            return 0.0
        first, last = self.samples[0], self.samples[-1]
        return (last[column] - first[column]) / (last[0] - first[0])

    @property
    def fps(self) -> float:
        return self._per_second(1)

    @property
    def gbps(self) -> float:
        return self._per_second(2) / 1e9


class Progress:
    def __init__(self, session, quiet: bool = False):
        self.session = session
        self.quiet = quiet
        self.console = console()
        self.rates: dict[str, Rate] = {}
        # Routed by slice every worker takes its band of every frame: the workers' sum over the bands is frames.
        self.bands = session_bands(session.spec).count
        self._live: Live | None = None
        self._last_plain = 0.0

    def say(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    @contextmanager
    def live(self):
        if self.quiet or not self.console.is_terminal:
            yield
            return
        with Live(console=self.console, refresh_per_second=4, transient=True) as live:
            self._live = live
            try:
                yield
            finally:
                self._live = None

    def update(self, stages) -> None:
        now = time.monotonic()
        for p in stages:
            if p.status is not None:
                self.rates.setdefault(p.stage.name, Rate()).add(p.status.elapsed_s, p.status.frames_out,
                                                                p.status.bytes_out)
        if self._live is not None:
            self._live.update(self.table(stages))
        elif not self.quiet and now - self._last_plain > PLAIN_EVERY_S:
            self._last_plain = now
            self.console.print(self.line(stages))

    def totals(self, stages) -> tuple[int, int, int, int]:
        """frames written, expected so far, in flight, lost (from the writer and distributors)."""
        writer = next((p.status for p in stages if p.stage.role == "writer" and p.status), None)
        written, lost = frames_so_far(writer) if writer else (0, 0)
        in_flight = sum(p.status.in_flight for p in stages if p.status and p.stage.role == "distributor")
        expected = self.session.spec.scan.frames * self.session.spec.scan.count
        return written, expected, in_flight, lost

    def line(self, stages) -> str:
        written, expected, in_flight, lost = self.totals(stages)
        worker_fps = sum(r.fps for n, r in self.rates.items() if n.startswith("worker")) / self.bands
        gbps = sum(r.gbps for n, r in self.rates.items() if n.startswith("source"))
        return (f"written {written}/{expected} frames, {worker_fps:,.0f} frames/s through workers, "
                f"{gbps:.2f} GB/s from sources, {in_flight} in flight, {lost} lost")

    def table(self, stages) -> Table:
        table = Table(title=f"detstream session {self.session.name}", caption=self.line(stages))
        for column in COLUMNS:
            table.add_column(column, justify="left" if column in ("stage", "state") else "right")
        for p in stages:
            s, r = p.status, self.rates.get(p.stage.name, Rate())
            if s is None:
                table.add_row(p.stage.name, "starting", *[""] * 6)
                continue
            table.add_row(p.stage.name, StageState.Name(s.state).lower(), f"{s.frames_in:,}", f"{s.frames_out:,}",
                          f"{r.fps:,.0f}", f"{r.gbps:.2f}", f"{s.in_flight}", f"{s.rejected}")
        return table

    def show(self, summary: Summary) -> None:
        table = Table(title=f"session {summary.session}: " + ("OK" if summary.ok else "FAILED"))
        for column in ("scan", "expected", "written", "partial", "lost", "duplicates", "unaccounted", "file"):
            table.add_column(column, justify="left" if column == "file" else "right")
        for s in summary.scans:
            table.add_row(*(str(s[k]) for k in ("scan", "expected", "written", "partial", "lost", "duplicates",
                                                "unaccounted", "file")))
        out = self.console
        if summary.scans:
            out.print(table)
        volumes = [(s["scan"], s["volume"]) for s in summary.scans if "volume" in s]
        if volumes:
            out.print(volume_table(volumes))
        out.print(f"{summary.frames_per_second:,.0f} frames/s, {summary.throughput_gbps:.3f} GB/s, "
                  f"{summary.duration_s:.2f} s")
        if summary.dropped:
            out.print(f"[yellow]{summary.dropped} frames dropped by the sources (spec.transport.onFull: drop); "
                      f"they are counted above as lost or partial[/]")
        for incident in summary.incidents:
            out.print(f"[yellow]lost while streaming: {escape(incident)}[/]")
        if summary.failure:
            out.print(f"[bold red]detstream: {escape(summary.failure)}[/]")
        elif not summary.ok:
            out.print("[bold red]detstream: not every frame is accounted for[/]")


VOLUME_COLUMNS = ("projections_expected", "projections_used", "projections_lost", "slices_missing", "complete")


def volume_table(volumes: Sequence[tuple[int, dict]]) -> Table:
    """A tomography scan's volume accounting (the `volume` of its record: projections expected = used + lost, the
    slices missing, complete), per (scan, volume)."""
    table = Table(title="volumes")
    for column in ("scan", *VOLUME_COLUMNS):
        table.add_column(column.replace("_", " "), justify="right")
    for scan, volume in volumes:
        table.add_row(str(scan), *(str(volume[k]).lower() for k in VOLUME_COLUMNS))
    return table


@dataclass
class Summary:
    session: str
    scans: list[dict] = field(default_factory=list)
    throughput_gbps: float = 0.0
    frames_per_second: float = 0.0
    duration_s: float = 0.0
    failure: str | None = None
    ok: bool = False
    dropped: int = 0                                   # frames the sources dropped (transport.onFull: drop)
    incidents: list[str] = field(default_factory=list)  # pool stages lost while streaming, and why
    stages: dict[str, dict] = field(default_factory=dict)  # name -> {"peak_rss_bytes", "exit_code"}

    @classmethod
    def of(cls, session, writer_status, duration: float, failure: str | None, stages=(),
           incidents=(), closed: Sequence[dict] = ()) -> Summary:
        """`closed`: every closed scan, from the writer's accounting file (its status lists only the last few)."""
        scans = list(closed)
        for s in (writer_status.scans if writer_status else []):
            if not s.complete:
                scans.append(scan_record(s))
        written = sum(s["written"] for s in scans)
        duration = max(duration, 1e-9)
        accounted = (len(scans) == session.spec.scan.count
                     and all(s["complete"] and s["unaccounted"] == 0 for s in scans))
        per_stage = {p.stage.name: {"peak_rss_bytes": p.peak_rss, "exit_code": p.proc.returncode}
                     for p in stages}
        dropped = sum(p.status.dropped for p in stages if p.status is not None and p.stage.role == "source")
        return cls(session=session.name, scans=scans,
                   throughput_gbps=written * session.spec.detector.frame_bytes / duration / 1e9,
                   frames_per_second=written / duration, duration_s=duration, failure=failure,
                   ok=failure is None and accounted, dropped=dropped, incidents=list(incidents), stages=per_stage)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)
