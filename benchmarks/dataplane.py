"""Data-plane shapes measured in bare pyzmq (the full-rate issue chose `direct`), same run.

    python -m benchmarks.dataplane [--frames 2048] [--repeats 3] [--workers 2] [--batch 16]
                                   [--source-only] [--source-against REV]

Every shape moves the same 576x576 uint16 frames (4 sectors) from detstream's simulator, each stage
a process (benchmarks/bare.py):
  one hop        PUSH -> PULL of whole ready frames, tcp and ipc: the transport ceiling
  staged         wire version 1's shape: source -> aggregator -> distributor -> workers -> writer, a
                 sector per message (the shape before issue 15, kept as the comparison)
  direct         sources -> the worker that takes the frame -> writer, BATCH frames per message;
                 the writer gets the frames back (as the noop plugin returns them) or only a receipt
                 per block (as a plugin whose results are small: counting, virtual images)
Printed per shape: frames/s, its fraction of the best one hop, and the CPU time per frame over all
processes and per role (on 2 cores, CPU per frame is what limits throughput).

Also the source's own work, the ZeroMQ send left out: the CPU time per frame of a `simulator` source
(one replica, 4 sectors) yielding SOURCE_FRAMES frames, and its CPU time to start, with this checkout's
code and with that of revision REV (`--source-against`, default SOURCE_BEFORE: the simulator that drew
every frame's events as it sent it), each in a process of its own, alternated; printed as before / now.
`--source-only` measures that alone. Results: benchmarks/results/dataplane.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import bare
from benchmarks.report import ROOT, Report, gbps
from benchmarks.revision import checkout

FRAME_BYTES = 576 * 576 * 2
SOURCE_FRAMES = 8192
SOURCE_BEFORE = "160043f"  # the last revision whose simulator drew each frame's events as it sent it


def shapes(frames: int, workers: int, batch: int) -> dict[str, bare.Topology]:
    """The shapes compared, by name."""
    def direct(**kw) -> bare.Topology:
        return bare.Topology(frames=frames, workers=workers, direct=True, **kw)
    return {
        "staged, wire v1 (tcp, 3 data hops + result)": bare.Topology(frames=frames, workers=workers),
        "direct, frames back, batch 1 (tcp)": direct(batch=1),
        f"direct, frames back, batch {batch} (tcp)": direct(batch=batch),
        f"direct, frames back, batch {batch} (ipc)": direct(batch=batch, transport="ipc"),
        f"direct, receipts, batch {batch} (tcp)": direct(batch=batch, full_result=False),
        f"direct, receipts, batch {batch} (ipc)": direct(batch=batch, full_result=False, transport="ipc"),
    }


def source_work(frames: int) -> dict:
    """The `simulator` source kind's own work in this process, nothing sent: CPU seconds to start (the
    constructor) and CPU ms per frame to yield `frames` frames (576x576 uint16, 4 sectors, one replica,
    default simulator settings), with whichever detstream this process imports."""
    from detstream.services.model.session import load_session
    from detstream.services.sources import source_class
    doc = {"apiVersion": "detstream.io/v1alpha1", "kind": "StreamingSession", "metadata": {"name": "source"},
           "spec": {"scan": {"rows": frames // 64, "cols": 64}, "plugin": {"name": "noop"}}}
    spec = load_session(doc).spec
    started = time.process_time()
    source = source_class("simulator")(spec, 0)
    ready = time.process_time()
    for _ in source:
        pass
    return {"start_s": ready - started, "ms_per_frame": (time.process_time() - ready) / frames * 1e3}


def source_work_of(path: str | None, frames: int) -> dict:
    """`source_work` in a new process importing detstream from `path` (from revision.checkout) or, None, this
    checkout's."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(([path] if path else []) + [str(ROOT)]))
    code = f"import json; from benchmarks.dataplane import source_work; print(json.dumps(source_work({frames})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def source_figure(report: Report, against: str, repeats: int) -> None:
    """The simulator source's own work per frame, now and at revision `against`, alternated: best of each."""
    runs: dict[str, list[dict]] = {"before": [], "now": []}
    with checkout(against) as old:
        for _ in range(repeats):
            runs["before"].append(source_work_of(old, SOURCE_FRAMES))
            runs["now"].append(source_work_of(None, SOURCE_FRAMES))
    best = {name: min(r["ms_per_frame"] for r in rounds) for name, rounds in runs.items()}
    start = {name: min(r["start_s"] for r in rounds) for name, rounds in runs.items()}
    report.figure("source", f"simulator source's own work (no send), {SOURCE_FRAMES} frames: before ({against}) "
                  f"{best['before'] * 1e3:.1f} us/frame, now {best['now'] * 1e3:.1f} us/frame: before / now = "
                  f"{best['before'] / best['now']:.0f}x; start-up {start['before']:.2f} s -> {start['now']:.2f} s",
                  before_ms_per_frame=best["before"], now_ms_per_frame=best["now"],
                  ratio=best["before"] / best["now"], start_s=start, rounds=runs)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dataplane", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="frames per message in the batched shapes")
    parser.add_argument("--source-only", action="store_true", help="measure the simulator source's own work alone")
    parser.add_argument("--source-against", metavar="REV", default=SOURCE_BEFORE,
                        help="the revision whose simulator source is the baseline")
    args = parser.parse_args(argv)
    report = Report("dataplane", frames=args.frames, repeats=args.repeats, workers=args.workers, batch=args.batch,
                    source_frames=SOURCE_FRAMES, source_against=args.source_against)
    source_figure(report, args.source_against, args.repeats)
    if args.source_only:
        return report.save()
    hop = {"tcp": [], "ipc": []}
    runs: dict[str, list[dict]] = {name: [] for name in shapes(args.frames, args.workers, args.batch)}
    for _ in range(args.repeats):  # rounds alternate the shapes, so that the load of the moment hits all alike
        for transport in hop:
            hop[transport].append(args.frames / bare.one_hop(args.frames, copy=False, transport=transport)["seconds"])
        for name, topology in shapes(args.frames, args.workers, args.batch).items():
            r = bare.run(topology)
            per_role: dict[str, float] = {}
            for process, seconds in r["cpu"].items():
                role = process.rsplit("-", 1)[0]
                per_role[role] = per_role.get(role, 0.0) + seconds / args.frames * 1e3
            runs[name].append({"fps": args.frames / r["seconds"], "cpu_ms": sum(per_role.values()), "roles": per_role})
    ceiling = max(max(v) for v in hop.values())
    report.figure("one_hop", f"one hop: tcp {max(hop['tcp']):,.0f}, ipc {max(hop['ipc']):,.0f} frames/s "
                  f"(ceiling {gbps(ceiling, 1, FRAME_BYTES):.2f} GB/s)", tcp=max(hop["tcp"]), ipc=max(hop["ipc"]))
    for name, rounds in runs.items():
        fps = max(r["fps"] for r in rounds)
        least = min(rounds, key=lambda r: r["cpu_ms"])
        roles = ", ".join(f"{role} {ms:.2f}" for role, ms in least["roles"].items())
        report.figure(name, f"{name}: {fps:,.0f} frames/s, {fps / ceiling:.2f} of one hop, CPU {least['cpu_ms']:.2f} "
                      f"ms/frame ({roles})", fps=fps, of_one_hop=fps / ceiling, cpu_ms_per_frame=least["cpu_ms"],
                      rounds=rounds)
    return report.save()


if __name__ == "__main__":
    main()
