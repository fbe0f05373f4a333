"""Turnaround: from the last frame leaving the source to the counted HDF5 file closed and complete.

    python -m benchmarks.turnaround [--scan 64] [--rate 250] [--scans 2]

A counting session (electron-counting with fixed thresholds, 2 workers, 1 lane) streams --scans scans
from its simulator source at --rate frames/s (below what the pipeline processes, so it keeps up; the lag
printed says whether it did). The clock starts when the source has handed a scan's last message (its
END_OF_SCAN, after the last block) to ZeroMQ, which its log line "scan N: ... frames sent" stamps, and
stops when the scan's file appears under its final name (the writer writes NAME.partial and renames it
once complete). Both are read on the wall clock, to the millisecond.

Baselines in the same run: the scan's acquisition time at that rate (turnaround / acquisition),
and the time this process takes to write and close the same events into the same HDF5 layout
directly (the floor of any writer). The published streaming system: a median 4 s for 128x128
scans and 96 s for 1024x1024. Target here: under 1 s for 64x64. Results:
benchmarks/results/turnaround.json.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

from benchmarks.report import Report
from benchmarks.sessions import COUNTING, THRESHOLDS, SessionRun, manifest
from detstream.services.model.session import Detector
from detstream.services.model.session import Simulator as SimulatorSettings
from detstream.services.plugins.counting import Counter, Thresholds
from detstream.services.sinks.electron_events import ElectronEventsFile
from detstream.services.sources.simulator import Simulator


def scan_sent(log: Path, scan: int, timeout: float) -> float:
    """When the source logged that it sent scan `scan`'s last message (wall clock, seconds)."""
    pattern = re.compile(rf"^(\S+ \S+) INFO detstream\.source-0: scan {scan}: \d+ frames sent", re.M)
    deadline = time.monotonic() + timeout
    while not (found := pattern.search(log.read_text(errors="replace"))):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the source did not send scan {scan} within {timeout:g} s")
        time.sleep(0.01)
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def wait_for(path: Path, timeout: float) -> float:
    """When `path` appeared (wall clock, seconds)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.001)
    return time.time()


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
                   source={"rate": args.rate}, plugin=COUNTING)
    sim = Simulator(SimulatorSettings(), Detector())
    results = []
    with tempfile.TemporaryDirectory(prefix="detstream-bench-") as tmp:
        with SessionRun(doc, Path(tmp)) as run:
            log = run.local.run_dir / "logs" / "source-0.log"
            writer = run.local.writer().client
            run.local.start()
            for scan in range(args.scans):
                t_last = scan_sent(log, scan, 120)
                written = next((s.written for s in writer.status().scans if s.scan == scan), 0)
                t_file = wait_for(Path(tmp) / f"turnaround-scan{scan:04d}.h5", 120)
                results.append({"scan": scan, "turnaround_s": t_file - t_last,
                                "acquisition_s": rows * cols / args.rate, "lag_frames": rows * cols - written})
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
