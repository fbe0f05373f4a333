"""What live results cost the data plane, and how far the live view is behind the detector.

    python -m benchmarks.live [--frames 1024] [--repeats 2] [--rate 200] [--viewers 10]

Measured, alternated in rounds (the machine is shared: only ratios within a run mean something):
  throughput  the same session with spec.liveView on and off: a 4D-STEM counting session (electron-counting
              on simulated 576x576 frames: the writer adds each turn's events to the live images) and a noop
              session (raw frames: each worker reduces its frames to records and patterns, the writer places
              them), timed from the sources' Start to the writer's end; ratio on / off (target >= 0.95)
  viewers     the counting session with the view on, with --viewers viewers reading the page's event stream and,
              on each new version of the latest scan, fetching every array the page fetches (`Viewer`, threads of
              this process: a browser's requests, not its drawing), and one viewer that connects and never reads,
              against none; ratio with / without (target >= 0.95), and what the viewers fetched
  delay       a counting session at a detector's pace (--rate frames/s), its source's sent count and the live
              view's arrived positions (GET /api/scans, what the page reads) sampled together every 20 ms:
              for each frame number n, the time from the source having sent n frames to the view showing n
              positions (median and 95th percentile; the sampling adds up to 20 ms)
Results: benchmarks/results/live.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from benchmarks.report import Report
from benchmarks.sessions import COUNTING, SessionRun, manifest
from detstream.services.results.client import LiveClient

SAMPLE_S = 0.02


def session_doc(frames: int, plugin: dict, live: bool, rate: float = 0.0) -> dict:
    cols = 32
    return manifest("live", scan={"rows": max(1, frames // cols), "cols": cols}, plugin=plugin,
                    source={"rate": rate}, liveView={"enabled": live})


def throughput(doc: dict) -> dict:
    """frames/s of one session, and its CPU ms a frame: `plane` (every stage but the workers), `workers`."""
    frames = doc["spec"]["scan"]["rows"] * doc["spec"]["scan"]["cols"]
    with tempfile.TemporaryDirectory(prefix="detstream-bench-") as tmp, SessionRun(doc, Path(tmp)) as run:
        result = run.stream()
    if result["writer"].frames_in != frames:
        raise RuntimeError(f"wrote {result['writer'].frames_in} of {frames} frames")
    workers = sum(seconds for name, seconds in result["cpu"].items() if name.startswith("worker"))
    return {"fps": frames / result["seconds"], "workers": workers / frames * 1e3,
            "plane": (sum(result["cpu"].values()) - workers) / frames * 1e3}


class Viewer(threading.Thread):
    """What the page asks of the live view at `url`: its event stream, and on each event whose latest scan has a
    new version every array of that scan but "max" (live.html's `refresh`); `reading=False`: a viewer that
    connects and never reads. Ends with the stream (the session's end)."""

    def __init__(self, url: str, reading: bool = True):
        super().__init__(daemon=True)
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path
        self.reading = reading
        self.events = self.arrays = self.bytes = 0

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=60)

    def run(self) -> None:
        self.stream = self.connection()   # kept on the viewer: open until the viewer goes, read or not
        self.stream.request("GET", self.path + "api/events")
        response = self.stream.getresponse()
        if not self.reading:
            return
        arrays, version = self.connection(), None
        for line in response:
            if not line.startswith(b"data:"):
                continue
            self.events += 1
            scans = json.loads(line[5:])["scans"]
            if not scans or scans[-1]["progress"]["version"] == version:
                continue
            scan, version = scans[-1], scans[-1]["progress"]["version"]
            for name in (n for n in scan["arrays"] if n != "max"):
                try:
                    arrays.request("GET", f"{self.path}api/scans/{scan['id']}/arrays/{name}?version={version}")
                    self.bytes += len(arrays.getresponse().read())
                except (OSError, http.client.HTTPException):
                    return  # the session ended: the server stopped
                self.arrays += 1


def with_viewers(doc: dict, count: int) -> dict:
    """frames/s of a session with the view on and `count` reading viewers (and one that never reads, if any); the
    writer's CPU ms a frame (it serves the view) and this process's (the viewers' own, which browsers would spend
    elsewhere); what the viewers read."""
    frames = doc["spec"]["scan"]["rows"] * doc["spec"]["scan"]["cols"]
    with tempfile.TemporaryDirectory(prefix="detstream-bench-") as tmp, SessionRun(doc, Path(tmp)) as run:
        url = run.local.plan.live_url()
        LiveClient(url, timeout=10).scans()  # the view answers before the viewers come
        viewers = [Viewer(url) for _ in range(count)] + [Viewer(url, reading=False)] * bool(count)
        here = time.process_time()   # this process: the viewer threads (and the run's own polling)
        for viewer in viewers:
            viewer.start()
        result = run.stream()
    for viewer in viewers:
        viewer.join(10)
    writer = sum(seconds for name, seconds in result["cpu"].items() if name.startswith("writer"))
    return {"fps": frames / result["seconds"], "writer_ms": writer / frames * 1e3,
            "here_ms": (time.process_time() - here) / frames * 1e3,
            "events": sum(v.events for v in viewers), "arrays": sum(v.arrays for v in viewers),
            "megabytes": sum(v.bytes for v in viewers) / 1e6}


def delay(frames: int, rate: float) -> dict:
    """Seconds from the source having sent n frames to the live view showing n positions, over n."""
    doc = session_doc(frames, COUNTING, True, rate)
    samples: list[tuple[float, int, int]] = []
    with tempfile.TemporaryDirectory(prefix="detstream-bench-") as tmp, SessionRun(doc, Path(tmp)) as run:
        client = LiveClient(run.local.plan.live_url(), timeout=5)

        def sample(_elapsed):
            sent = run.status("source-0").frames_out   # frames the source has taken from the detector
            scans = client.scans()
            shown = sum(s["progress"]["complete"] + s["progress"]["partial"] for s in scans)
            samples.append((time.monotonic(), sent, shown))
        run.stream(every=SAMPLE_S, sample=sample)
    t, sent, shown = (np.array(column) for column in zip(*samples))
    levels = np.arange(1, min(sent.max(), shown.max()) + 1)
    first_sent = t[np.searchsorted(sent, levels)]   # counts only grow: first sample at or above each level
    first_shown = t[np.searchsorted(shown, levels)]
    lag = first_shown - first_sent
    return {"median_s": float(np.median(lag)), "p95_s": float(np.percentile(lag, 95)), "max_s": float(lag.max()),
            "frames": int(levels.size), "samples": len(samples)}


def viewers_figure(report: Report, frames: int, count: int, repeats: int) -> None:
    """The counting session with the view on, with `count` viewers (+1 not reading) and with none, alternated."""
    watched = []
    for _ in range(repeats):
        r = {n: with_viewers(session_doc(frames, COUNTING, True), n) for n in (count, 0)}
        watched.append(r)
        print(f"live:   {count} viewers: {r[count]['fps']:,.0f} frames/s, none {r[0]['fps']:,.0f} frames/s; writer "
              f"CPU ms a frame {r[count]['writer_ms']:.3f} / {r[0]['writer_ms']:.3f}; they read {r[count]['events']} "
              f"events, {r[count]['arrays']} arrays ({r[count]['megabytes']:.0f} MB)", flush=True)
    seen_fps, alone_fps = (max(r[n]["fps"] for r in watched) for n in (count, 0))
    seen_ms, alone_ms = (min(r[n]["writer_ms"] for r in watched) for n in (count, 0))
    viewers_ms = min(r[count]["here_ms"] - r[0]["here_ms"] for r in watched)
    median = statistics.median(r[count]["fps"] / r[0]["fps"] for r in watched)
    report.figure("viewers", f"counting, live on: {count} viewers (+1 not reading) {seen_fps:,.0f} / none "
                  f"{alone_fps:,.0f} frames/s = {seen_fps / alone_fps:.2f} (best of each; median of rounds "
                  f"{median:.2f}; target >= 0.95); the writer's CPU ms a frame {seen_ms:.3f} / {alone_ms:.3f}; "
                  f"the viewers' own (on the same cores here) {viewers_ms:.3f}",
                  with_fps=seen_fps, without_fps=alone_fps, ratio=seen_fps / alone_fps, writer_ms_with=seen_ms,
                  writer_ms_without=alone_ms, viewers_ms=viewers_ms,
                  rounds=[{str(k): v for k, v in r.items()} for r in watched])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1024, help="frames per session (a multiple of 32)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (on, off) per plugin")
    parser.add_argument("--rate", type=float, default=200.0, help="frames/s of the paced session (delay)")
    parser.add_argument("--viewers", type=int, default=10, help="viewers reading the live view (viewers)")
    args = parser.parse_args(argv)
    frames = max(32, args.frames - args.frames % 32)
    report = Report("live", frames=frames, repeats=args.repeats, rate=args.rate, viewers=args.viewers)
    rounds: dict[str, list[dict]] = {"counting": [], "noop": []}
    for _ in range(args.repeats):
        for name, plugin in (("counting", COUNTING), ("noop", {"name": "noop"})):
            r = {state: throughput(session_doc(frames, plugin, state == "on")) for state in ("on", "off")}
            r["ratio"] = r["on"]["fps"] / r["off"]["fps"]
            rounds[name].append(r)
            print(f"live:   {name}: on {r['on']['fps']:,.0f} frames/s, off {r['off']['fps']:,.0f} frames/s, ratio "
                  f"{r['ratio']:.2f}; CPU ms a frame, plane {r['on']['plane']:.3f} / {r['off']['plane']:.3f}, "
                  f"workers {r['on']['workers']:.3f} / {r['off']['workers']:.3f}", flush=True)
    for name, what in (("counting", "electron counting (events)"), ("noop", "noop (raw frames)")):
        best = {state: {key: (max if key == "fps" else min)(r[state][key] for r in rounds[name])
                        for key in ("fps", "plane", "workers")} for state in ("on", "off")}
        on, off = best["on"], best["off"]
        median = statistics.median(r["ratio"] for r in rounds[name])
        report.figure(name, f"{what}: live on {on['fps']:,.0f} / off {off['fps']:,.0f} frames/s = "
                      f"{on['fps'] / off['fps']:.2f} (best of each; median of rounds {median:.2f}; target >= 0.95)",
                      on_fps=on["fps"], off_fps=off["fps"], ratio=on["fps"] / off["fps"],
                      median_round_ratio=median, rounds=rounds[name])
        report.figure(f"{name}_cpu", f"{what}: CPU ms a frame (best of each), data plane {on['plane']:.3f} on / "
                      f"{off['plane']:.3f} off = {on['plane'] / off['plane']:.2f}; workers {on['workers']:.3f} on, "
                      f"{off['workers']:.3f} off; the whole session off / on = "
                      f"{(off['plane'] + off['workers']) / (on['plane'] + on['workers']):.2f}",
                      plane_ratio=on["plane"] / off["plane"], on_ms=on, off_ms=off)
    if args.viewers:
        viewers_figure(report, frames, args.viewers, args.repeats)
    d = delay(frames, args.rate)
    report.figure("delay", f"live view behind the source at {args.rate:g} frames/s: median {d['median_s']:.3f} s, "
                  f"95th percentile {d['p95_s']:.3f} s, max {d['max_s']:.3f} s over {d['frames']} frames "
                  f"(sampled every {SAMPLE_S * 1e3:.0f} ms; target <= 1 s)", **d)
    return report.save()


if __name__ == "__main__":
    main()
