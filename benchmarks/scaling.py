"""Scaling: throughput as workers grow (credits keep every worker busy) and as lanes grow (no
single process is a ceiling).

    python -m benchmarks.scaling [--service-ms 40] [--frames-per-worker 150] [--lane-frames 2048]

Workers: a session whose plugin (`bench-sleep`, benchmarks/plugins.py) takes a fixed --service-ms
per frame and almost no CPU, with 1, 2 and 4 workers. N workers should do N times the work of one
when the distribution keeps them all busy: the figure is efficiency = rate(N) / (N x rate(1)),
both measured in this run (target >= 0.9). The service time keeps 4 workers well below the
transport ceiling (benchmarks.pipeline) so that the distribution is what is measured.

Lanes: the `noop` session with 1 and 2 lanes (as many sources as lanes, 2 workers). More lanes
add distributors; blocks of frames are split among them by block number. Printed: the rate
of each, and the CPU share of the busiest process against the whole session's (a process at one
full core would be a ceiling; on a machine with fewer cores than processes, the cores are).
Results: benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.report import Report, gbps
from benchmarks.sessions import SessionRun, bench_plugins, manifest

FRAME_BYTES = 576 * 576 * 2


def run(doc: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="detstream-bench-") as tmp, SessionRun(doc, Path(tmp)) as session:
        result = session.stream()
    frames = doc["spec"]["scan"]["rows"] * doc["spec"]["scan"]["cols"]
    if result["writer"].frames_in != frames:
        raise RuntimeError(f"wrote {result['writer'].frames_in} of {frames} frames")
    result["fps"] = frames / result["seconds"]
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--service-ms", type=float, default=40.0, help="service time per frame (default 40)")
    parser.add_argument("--frames-per-worker", type=int, default=150, help="frames per run and worker (default 150)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--lanes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--lane-frames", type=int, default=2048, help="frames per lanes run (default 2048)")
    args = parser.parse_args(argv)
    report = Report("scaling", service_ms=args.service_ms, frames_per_worker=args.frames_per_worker,
                    workers=args.workers, lanes=args.lanes, lane_frames=args.lane_frames)

    rates = {}
    with bench_plugins():
        for n in args.workers:
            frames = args.frames_per_worker * n
            doc = manifest("scaling", scan={"rows": frames // 10, "cols": 10}, workers={"replicas": n},
                           plugin={"name": "bench-sleep", "params": {"serviceS": args.service_ms / 1e3}})
            r = run(doc)
            rates[n] = r["fps"]
            print(f"scaling:   {n} worker(s): {r['fps']:.1f} frames/s", flush=True)
    one = rates[min(rates)] / min(rates)
    ideal = 1e3 / args.service_ms
    report.figure("workers_1", f"1 worker: {one:.1f} frames/s (ideal {ideal:.1f} at {args.service_ms:g} ms per frame: "
                  f"{one / ideal:.2f} of it)", fps=one, ideal=ideal)
    for n, fps in rates.items():
        if n == min(rates):
            continue
        eff = fps / (n * one)
        report.figure(f"workers_{n}", f"{n} workers: {fps:.1f} frames/s = {eff:.2f} x {n} x the 1-worker rate "
                      f"(target >= 0.9)", fps=fps, efficiency=eff)

    lanes = {}
    for n in args.lanes:
        cols = 64
        doc = manifest("lanes", scan={"rows": max(1, args.lane_frames // cols), "cols": cols}, lanes=n,
                       source={"replicas": n}, workers={"replicas": 2}, plugin={"name": "noop"})
        r = run(doc)
        busiest = max(r["cpu"], key=r["cpu"].get)
        lanes[n] = {"fps": r["fps"], "busiest": busiest, "busiest_cores": r["cpu"][busiest] / r["seconds"],
                    "session_cores": sum(r["cpu"].values()) / r["seconds"],
                    "cores_by_process": {k: v / r["seconds"] for k, v in r["cpu"].items()}}
    first = lanes[min(lanes)]["fps"]
    for n, lane in lanes.items():
        fps = lane["fps"]
        report.figure(f"lanes_{n}", f"{n} lane(s), {n} source(s): {fps:,.0f} frames/s, "
                      f"{gbps(fps, 1, FRAME_BYTES):.2f} GB/s ({fps / first:.2f} x 1 lane); busiest process "
                      f"{lane['busiest']} at {lane['busiest_cores']:.2f} core, the session at "
                      f"{lane['session_cores']:.2f} cores", **lane, ratio=fps / first)
    return report.save()


if __name__ == "__main__":
    main()
