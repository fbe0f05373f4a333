"""Memory: the resident memory of every stage stays flat over a long stream, and what the stages
hold stays within the limits the session configures.

    python -m benchmarks.memory [--scans 4] [--scan 32] [--interval 0.1]

A `noop` session (--sources simulator sources, 1 lane, 2 workers, default high-water mark and credits)
streams --scans scans of --scan x --scan 576x576 frames back to back, as fast as it goes, while
this process samples every stage's resident memory (VmRSS) and the distributor's frames in flight (routed
to a worker, not yet acknowledged by the writer).

Printed per stage:
  growth   the largest RSS over the whole run against the largest over its first quarter
           (4x the frames): a leak or a queue that grows with the frames shows as a ratio above 1
  held     the largest RSS while streaming minus the RSS just before the stream started (what the
           stage held at most: queued messages, frames in flight, buffers), against the bound
           the session's settings put on it (high-water marks x message sizes, credits x frame
           size; see `bounds()`)
and the distributor's frames in flight at most against workers x credits. Results:
benchmarks/results/memory.json. benchmarks.soak streams for minutes (python -m benchmarks.soak).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.processes import memory
from benchmarks.report import Report
from benchmarks.sessions import SessionRun, manifest

SECTOR = 576 * 144 * 2
FRAME = 4 * SECTOR
MB = 1 << 20


def bounds(hwm: int, credits: int, workers: int, window: int, lanes: int = 1, sources: int = 1) -> dict[str, int]:
    """Bytes each stage may hold by the session's limits, plus the message it has in hand and the one being
    received. A source keeps at most `window` frames (its share of each) until the writer has them; its send
    queues hold those same buffers (zero-copy). A lane routes a worker at most `credits` frames, so that bounds
    what waits in the worker's receive queue and its assembly. A distributor handles small messages only.
    A noop result is a small record (live view off: empty), so the writer's queues hold little."""
    hand = 2 * FRAME
    return {
        "source": window * FRAME // sources + hand,                  # its window of frames
        "distributor": hand,                                         # no pixel data
        "worker": lanes * credits * FRAME + hand,                    # frames routed to it, queued or assembling
        "writer": workers * hwm * FRAME + hand,                      # receive queue per worker (generous)
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--scan", type=int, default=32, help="scans of SCAN x SCAN frames (default 32)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("--sources", type=int, default=1,
                        help="source processes (default 1); each keeps its share of every frame in its window")
    args = parser.parse_args(argv)
    frames = args.scans * args.scan * args.scan
    doc = manifest("memory", scan={"rows": args.scan, "cols": args.scan, "count": args.scans},
                   source={"replicas": args.sources})
    report = Report("memory", frames=frames, scans=args.scans, scan=[args.scan, args.scan], sources=args.sources)
    samples = []
    with tempfile.TemporaryDirectory(prefix="detstream-bench-") as tmp, SessionRun(doc, Path(tmp)) as run:
        spec = run.local.session.spec
        limits = bounds(spec.transport.high_water_mark, spec.workers.credits, spec.workers.replicas,
                        spec.transport.source_window_frames, sources=args.sources)
        pids = run.pids
        before = {name: memory(pid)[0] for name, pid in pids.items()}
        distributor = next(p.client for p in run.local.stages if p.stage.role == "distributor")
        writer = run.local.writer().client

        def sample(elapsed):
            samples.append({"t": elapsed, "written": writer.status().frames_in,
                            "in_flight": distributor.status().in_flight,
                            "rss": {name: memory(pid)[0] for name, pid in pids.items()}})

        result = run.stream(every=args.interval, sample=sample)
        sample(result["seconds"])
    if result["writer"].frames_in != frames:
        raise RuntimeError(f"wrote {result['writer'].frames_in} of {frames} frames")
    quarter = [s for s in samples if s["written"] <= frames / 4] or samples[:1]
    ok = True
    for name in sorted(before):
        role = name.rsplit("-", 1)[0]
        early = max(s["rss"][name] for s in quarter)
        peak = max(s["rss"][name] for s in samples)
        held = peak - before[name]
        ok &= held <= limits[role]
        report.figure(name, f"{name}: RSS {before[name] / MB:.0f} MB idle, {early / MB:.0f} MB at most over the first "
                      f"quarter, {peak / MB:.0f} MB over all {frames} frames (x{peak / early:.3f}); held at most "
                      f"{held / MB:.1f} MB, bound {limits[role] / MB:.1f} MB", idle=before[name], early=early,
                      peak=peak, growth=peak / early, held=held, bound=limits[role])
    in_flight = max(s["in_flight"] for s in samples)
    allowed = spec.workers.replicas * spec.workers.credits
    report.figure("in_flight", f"distributor: at most {in_flight} frames in flight, limit {allowed} "
                  f"(workers x credits)", max=in_flight, limit=allowed)
    ok = ok and in_flight <= allowed
    report.figure("within", f"every stage within its bound: {ok}", ok=ok)
    report.extra["samples"] = samples[:: max(1, len(samples) // 200)]
    return report.save()


if __name__ == "__main__":
    main()
