"""Turnaround: from the last frame leaving the source to the counted HDF5 file closed and complete.

    python -m benchmarks.turnaround [--scan 64] [--rate 250] [--scans 2]

A counting session (electron-counting with fixed thresholds, 2 workers, 1 lane) takes its frames
from an outside source: this process, sending the 4D Camera simulator's sectors through the
session's ingest address at --rate frames/s (below what the pipeline processes, so it keeps up;
the lag printed says whether it did). The clock starts when the scan's last message (its
END_OF_SCAN, after the last sector) has been handed to ZeroMQ, and stops when the scan's file
appears under its final name (the writer writes NAME.partial and renames it once complete).
--scans scans are sent back to back; each has its own file and turnaround.

Baselines in the same run: the scan's acquisition time at that rate (turnaround / acquisition),
and the time this process takes to write and close the same events into the same HDF5 layout
directly (the floor of any writer). The published streaming system: a median 4 s for 128x128
scans and 96 s for 1024x1024. Target here: under 1 s for 64x64. Results:
benchmarks/results/turnaround.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import zmq

from benchmarks.report import Report
from benchmarks.sessions import COUNTING, THRESHOLDS, SessionRun, manifest
from detstream.services.dataplane.wire import END_OF_SCAN, SECTOR, Header, Outbox
from detstream.services.model.session import Detector
from detstream.services.model.session import Simulator as SimulatorSettings
from detstream.services.plugins.counting import Counter, Thresholds
from detstream.services.sinks.electron_events import ElectronEventsFile
from detstream.services.sources.simulator import Simulator


def send_scan(out: Outbox, sim: Simulator, scan: int, rows: int, cols: int, rate: float) -> float:
    """Send one scan paced at `rate` frames/s; the time its last message was handed to ZeroMQ."""
    t0 = time.monotonic()
    sent = 0
    for frame in range(rows * cols):
        delay = t0 + frame / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for sector in range(4):
            out.send(Header(kind=SECTOR, scan=scan, frame=frame, position=frame, sector=sector, shape=[576, 144],
                            dtype="<u2", scan_rows=rows, scan_cols=cols), [sim.sector(scan, frame, sector)])
            sent += 1
    out.send(Header(kind=END_OF_SCAN, scan=scan, expected=rows * cols, sent=sent, scan_rows=rows, scan_cols=cols))
    return time.monotonic()


def wait_for(path: Path, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.001)
    return time.monotonic()


def floor_seconds(sim: Simulator, rows: int, cols: int, folder: Path) -> float:
    """Write the scan's events into the stempy layout and close the file, in this process."""
    counter = Counter(sim.dark, Thresholds(*THRESHOLDS), (576, 576))
    events = [counter.count(sim.frame(0, p)) for p in range(rows * cols)]
    t0 = time.monotonic()
    f = ElectronEventsFile(folder / "floor.h5", (rows, cols), (576, 576))
    for p, e in enumerate(events):
        f.write(p, e)
    f.close()
    return time.monotonic() - t0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.turnaround", description=__doc__.split("\n")[0])
    parser.add_argument("--scan", type=int, default=64, help="scans of SCAN x SCAN frames (default 64)")
    parser.add_argument("--rate", type=float, default=250.0, help="frames/s sent (default 250)")
    parser.add_argument("--scans", type=int, default=2, help="scans sent back to back (default 2)")
    args = parser.parse_args(argv)
    rows = cols = args.scan
    report = Report("turnaround", scan=[rows, cols], rate=args.rate, scans=args.scans)
    doc = manifest("turnaround", scan={"rows": rows, "cols": cols, "count": args.scans},
                   source={"kind": "external", "replicas": 1},
                   plugin=COUNTING)
    sim = Simulator(SimulatorSettings(), Detector())
    results = []
    with tempfile.TemporaryDirectory(prefix="detstream-bench-") as tmp:
        with SessionRun(doc, Path(tmp)) as run:
            run.local.start()
            ctx = zmq.Context()
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, 16)
            push.connect(run.local.plan.endpoint("aggregator", 0, "ingest"))
            out = Outbox(push, "bench-source")
            writer = run.local.writer().client
            try:
                for scan in range(args.scans):
                    t_first = time.monotonic()
                    t_last = send_scan(out, sim, scan, rows, cols, args.rate)
                    written = writer.status().frames_in - scan * rows * cols
                    t_file = wait_for(Path(tmp) / f"turnaround-scan{scan:04d}.h5", 120)
                    results.append({"scan": scan, "turnaround_s": t_file - t_last, "acquisition_s": t_last - t_first,
                                    "lag_frames": rows * cols - written})
            finally:
                push.close(linger=0)
                ctx.term()
            accounts = list(writer.status().scans)
        floor = floor_seconds(sim, rows, cols, Path(tmp))
    for a in accounts:
        if a.written != rows * cols:
            raise RuntimeError(f"scan {a.scan}: {a.written} of {rows * cols} frames written")
    for r in results:
        report.note(f"scan {r['scan']}: turnaround {r['turnaround_s']:.3f} s after {r['acquisition_s']:.1f} s of "
                    f"acquisition; {r['lag_frames']} frames not yet written when the last one left the source")
    turnaround = statistics.median(r["turnaround_s"] for r in results)
    acquisition = statistics.median(r["acquisition_s"] for r in results)
    report.figure("turnaround", f"{rows}x{cols} scan at {args.rate:g} frames/s: counted file complete "
                  f"{turnaround:.3f} s "
                  f"after the last frame left the source (median of {len(results)}; target < 1 s; published: 4 s "
                  f"median for 128x128)", seconds=turnaround, runs=results)
    report.figure("of_acquisition", f"turnaround / acquisition time = {turnaround / acquisition:.3f} "
                  f"({acquisition:.1f} s acquisition)", ratio=turnaround / acquisition, acquisition_s=acquisition)
    report.figure("floor", f"writing and closing the same events directly: {floor:.3f} s; turnaround / that = "
                  f"{turnaround / floor:.1f}", seconds=floor, ratio=turnaround / floor)
    return report.save()


if __name__ == "__main__":
    main()
