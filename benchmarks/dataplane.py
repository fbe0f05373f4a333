"""Data-plane shapes measured in bare pyzmq before building one (the full-rate issue), same run.

    python -m benchmarks.dataplane [--frames 2048] [--repeats 3] [--workers 2] [--batch 16]

Every shape moves the same 576x576 uint16 frames (4 sectors) from detstream's simulator, each stage
a process (benchmarks/bare.py):
  one hop        PUSH -> PULL of whole ready frames, tcp and ipc: the transport ceiling
  today          source -> aggregator -> distributor -> workers -> writer, a sector per message
  direct         sources -> the worker that takes the frame -> writer, BATCH frames per message;
                 the writer gets the frames back (as the noop plugin returns them) or only a receipt
                 per block (as a plugin whose results are small: counting, virtual images)
Printed per shape: frames/s, its fraction of the best one hop, and the CPU time per frame over all
processes and per role (on 2 cores, CPU per frame is what limits throughput).
Results: benchmarks/results/dataplane.json.
"""

from __future__ import annotations

import argparse

from benchmarks import bare
from benchmarks.report import Report, gbps

FRAME_BYTES = 576 * 576 * 2


def shapes(frames: int, workers: int, batch: int) -> dict[str, bare.Topology]:
    """The shapes compared, by name."""
    def direct(**kw) -> bare.Topology:
        return bare.Topology(frames=frames, workers=workers, direct=True, **kw)
    return {
        "today (tcp, 3 data hops + result)": bare.Topology(frames=frames, workers=workers),
        "direct, frames back, batch 1 (tcp)": direct(batch=1),
        f"direct, frames back, batch {batch} (tcp)": direct(batch=batch),
        f"direct, frames back, batch {batch} (ipc)": direct(batch=batch, transport="ipc"),
        f"direct, receipts, batch {batch} (tcp)": direct(batch=batch, full_result=False),
        f"direct, receipts, batch {batch} (ipc)": direct(batch=batch, full_result=False, transport="ipc"),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dataplane", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="frames per message in the batched shapes")
    args = parser.parse_args(argv)
    report = Report("dataplane", frames=args.frames, repeats=args.repeats, workers=args.workers, batch=args.batch)
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
