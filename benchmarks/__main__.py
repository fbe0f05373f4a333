"""Every benchmark, one after the other: `python -m benchmarks` (what `make bench` runs).

    python -m benchmarks [NAME ...]          e.g. python -m benchmarks pipeline turnaround

Each prints one line per figure and writes benchmarks/results/NAME.json; a benchmark that fails
is reported and the others still run (exit status 1 then). Settings are chosen so that the whole
run takes 4 to 11 minutes on 2 cores (idle to loaded); each benchmark takes its own options when run alone
(`python -m benchmarks.NAME --help`). What the figures mean and what they were on the machines
they ran on: benchmarks/README.md.
"""

from __future__ import annotations

import sys
import time
import traceback
from importlib import import_module

# name -> arguments for `make bench` (each module's main(argv))
BENCHMARKS = {
    "pipeline": [],        # 1. framework overhead: detstream noop session vs bare pyzmq, one-hop ceiling
    "counting": ["--frames", "200", "--repeats", "2"],  # 2. electron counting vs stempy, per core
    "turnaround": [],      # 3. last frame out of the source -> counted HDF5 complete
    "scaling": [],         # 4. workers 1, 2, 4 (credits) and lanes 1, 2
    "memory": [],          # 5. RSS per stage flat over the stream, bytes held within the limits
    "files": [],           # 6. streaming vs the file-based way, same scan, same machine
    "operator": [],        # 7. kubectl apply -> children, 1 and 20 sessions, real control plane
    "ingest": ["--images", "1000"],  # DECTRIS DCU -> session vs a bare receive-and-decode loop; 1, 2, 4 sources
    "curve": ["--messages", "1000", "--repeats", "1"],  # CURVE encryption cost, socket and session
    "soak": ["--minutes", "0.5", "--interval", "5"],  # continuous stream: growth and accounting (short here)
    "dataplane": ["--frames", "1024", "--repeats", "2"],  # data-plane shapes in bare pyzmq (the full-rate design)
    "reduction": ["--frames", "128", "--repeats", "3"],  # a worker's compiled reduction of raw frames vs numpy
    "live": ["--repeats", "1"],  # live results on / off, and the live view's delay behind the source
    "tomo": ["--size", "128", "--angles", "181"],  # tomo-fbp sessions vs astra after the scan (README: 256, 361)
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    t0 = time.monotonic()
    for name in names:
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            result = import_module(f"benchmarks.{name}").main(BENCHMARKS[name])
            if isinstance(result, int) and result != 0:
                failed.append(name)
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"== {name}: {time.monotonic() - started:.0f} s", flush=True)
    print(f"== all: {time.monotonic() - t0:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
