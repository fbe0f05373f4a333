"""Soak: one session streaming continuously, scans back to back, watched for growth and loss.

    python -m benchmarks.soak --minutes 10 [--rate 300] [--scan 32] [--detector 576] [--interval 10]

The 4D Camera simulator (--detector x --detector frames, 4 sectors, 2 sources) streams scans of
--scan x --scan frames back to back at --rate frames/s through 2 lanes and 3 workers counting
electrons into one HDF5 file per scan, for --minutes. Every --interval seconds it prints the
throughput over the interval, the resident memory of every stage and the accounting so far; at
the end, per stage the peak resident memory and its growth (median RSS over the last third of
the run minus the median over the second third: after warm-up, a leak or a growing queue shows
as growth that scales with the run, while the frames a worker holds for a source that lags
the others, at most rate x frameTimeoutS, come and go), and the accounting of every scan. Results go to
benchmarks/results/soak.json (or --json). Exit status 0 when every frame is written (none lost,
none unaccounted, no duplicate) and no stage grew by more than --max-growth-mb.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import processes
from detstream.services.launcher.runner import LocalSession, RunFailed
from detstream.services.model.session import load_session

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"


def in_flight(port: int) -> float:
    """A stage's detstream_in_flight_frames (a worker: frames it holds, assembling, processing or queued),
    from its metrics endpoint."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "detstream_in_flight_frames")


def manifest(args) -> dict:
    frames = args.scan * args.scan
    count = max(1, math.ceil(args.minutes * 60 * args.rate / frames))
    return {"apiVersion": "detstream.io/v1alpha1", "kind": "StreamingSession", "metadata": {"name": "soak"},
            "spec": {"scan": {"rows": args.scan, "cols": args.scan, "count": count},
                     "detector": {"rows": args.detector, "cols": args.detector, "sectors": 4},
                     "source": {"replicas": 2, "rate": args.rate, "simulator": {"seed": 3}},
                     "lanes": 2, "workers": {"replicas": 3},
                     "plugin": {"name": "electron-counting",
                                "params": {"dark": "simulated", "backgroundThreshold": 32, "xrayThreshold": 50}},
                     "transport": {"endOfScanTimeoutS": 30, "workerTimeoutS": 10}}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to stream (default 10)")
    parser.add_argument("--rate", type=float, default=300.0, help="frames/s the sources send (default 300)")
    parser.add_argument("--scan", type=int, default=32, help="scans of SCAN x SCAN frames (default 32)")
    parser.add_argument("--detector", type=int, default=576, help="frames of DETECTOR x DETECTOR pixels (default 576)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--max-growth-mb", type=float, default=32.0,
                        help="largest growth of a stage's memory after warm-up that still passes (default 32)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write the results (default {RESULTS})")
    parser.add_argument("--keep", type=Path, help="keep the session's files (logs, HDF5) in this folder")
    args = parser.parse_args(argv)

    session = load_session(manifest(args))
    spec = session.spec
    total = spec.scan.frames * spec.scan.count
    out = args.keep or Path(tempfile.mkdtemp(prefix="detstream-soak-"))
    local = LocalSession(session, out)
    samples, failure = [], None
    print(f"soak: {spec.scan.count} scans of {spec.scan.rows}x{spec.scan.cols} frames of "
          f"{args.detector}x{args.detector} at {args.rate:g} frames/s (~{args.minutes:g} min), files in {out}",
          flush=True)
    try:
        local.launch()
        local.wait_healthy()
        local.start()
        t0 = last_t = time.monotonic()
        last_written = 0
        next_sample = t0 + args.interval
        while not local.finished():
            local.check_alive(streaming=True)
            time.sleep(0.25)
            now = time.monotonic()
            if now < next_sample:
                continue
            next_sample += args.interval
            writer = local.writer().status
            written = sum(s.written for s in writer.scans) if writer else 0
            memory = {p.stage.name: processes.memory(p.proc.pid)[0] for p in local.stages}
            waiting = {p.stage.name: in_flight(p.stage.ports["metrics"]) for p in local.stages
                       if p.stage.role == "worker"}
            sample = {"t": round(now - t0, 2), "written": written,
                      "frames_per_second": (written - last_written) / (now - last_t),
                      "lost": sum(s.lost for s in writer.scans) if writer else 0,
                      "scans_closed": sum(s.complete for s in writer.scans) if writer else 0, "rss": memory,
                      "worker_frames_held": waiting}
            samples.append(sample)
            last_t, last_written = now, written
            print(f"{sample['t']:7.0f} s  {written:>9,}/{total:,} written  "
                  f"{sample['frames_per_second']:7.0f} frames/s  "
                  f"{sample['scans_closed']} scans closed  lost {sample['lost']}  "
                  f"pending {'/'.join(f'{v:.0f}' for v in waiting.values())}  RSS MB "
                  + " ".join(f"{n}={m / 1e6:.0f}" for n, m in memory.items()), flush=True)
        duration = time.monotonic() - t0
        final = local.writer().client.status()
        peaks = {p.stage.name: processes.memory(p.proc.pid)[1] for p in local.stages}
    except RunFailed as exc:
        failure, duration, final, peaks = str(exc), 0.0, None, {}
    finally:
        local.stop()
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    scans = [{"scan": s.scan, "expected": s.expected, "written": s.written, "partial": s.partial, "lost": s.lost,
              "duplicates": s.duplicates, "complete": s.complete} for s in (final.scans if final else [])]
    written = sum(s["written"] for s in scans)
    lost = sum(s["lost"] for s in scans)
    unaccounted = (sum(s["expected"] - s["written"] - s["lost"] for s in scans)
                   + total - sum(s["expected"] for s in scans))
    growth = {}
    third = len(samples) // 3
    if third:
        for name in samples[0]["rss"]:
            middle = statistics.median(s["rss"][name] for s in samples[third:2 * third])
            last = statistics.median(s["rss"][name] for s in samples[2 * third:])
            growth[name] = last - middle
    ok = (failure is None and len(scans) == spec.scan.count and written == total and lost == 0 and unaccounted == 0
          and all(s["duplicates"] == 0 for s in scans) and all(g <= args.max_growth_mb * 1e6 for g in growth.values()))
    result = {"minutes": args.minutes, "rate": args.rate, "scan": [args.scan, args.scan], "scans": spec.scan.count,
              "detector": [args.detector, args.detector], "cores": os.cpu_count(), "machine": platform.machine(),
              "duration_s": duration, "frames_expected": total, "frames_written": written, "frames_lost": lost,
              "unaccounted": unaccounted, "frames_per_second": written / duration if duration else 0.0,
              "gbps": written * spec.detector.frame_bytes / duration / 1e9 if duration else 0.0,
              "peak_rss_bytes": peaks, "rss_growth_bytes": growth, "samples": samples, "scan_accounts": scans,
              "failure": failure, "ok": ok}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"soak {'OK' if ok else 'FAILED'}: {written:,}/{total:,} frames written in {duration:.0f} s "
          f"({result['frames_per_second']:,.0f} frames/s, {result['gbps']:.3f} GB/s), lost {lost}, "
          f"unaccounted {unaccounted}" + (f"; {failure}" if failure else ""))
    for name in peaks:
        print(f"  {name:15s} peak RSS {peaks[name] / 1e6:6.0f} MB, growth after warm-up "
              f"{growth.get(name, 0) / 1e6:+6.1f} MB")
    print(f"results in {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
