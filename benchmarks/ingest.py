"""Ingest: how fast a session takes images from a DECTRIS DCU, against a bare receive-and-decode loop.

    python -m benchmarks.ingest [--images 2000] [--replicas 1 2 4] [--messages FOLDER]

The `detstream dcu` stand-in serves one series of --images recorded EIGER2 images (514 x 1030 uint16,
bitshuffle + LZ4 as the detector compressed them; ../shared/data/dectris-stream2, cycled) to

- bare: `bare_ingest` (services/sources/dectris/ingest.py) in this process: receive and decompress (the
  first channel, as the source does), nothing else: the ceiling of any stream v2 client in Python;
- detstream: a session with a `dectris` source (noop plugin, 1 worker, frames counted and not kept), timed by
  the writer from Start to the scan's close, with 1, 2, 4 source replicas on the one DCU.

Printed: frames/s and GB/s (decompressed) of each, the ratio of one source replica's session to bare (target
>= 0.8: the source adds little to the decode), and how the session scales with replicas (each decodes the
images it gets; on a machine with fewer cores than processes the cores are the ceiling: the session's other
stages move every frame too). And the CPU seconds per image of the source processes against bare's, which
the load of a shared machine does not change: what a source costs beyond the decode.
Results: benchmarks/results/ingest.json.
Run it as `OMP_NUM_THREADS=1 python -m benchmarks.ingest` for a like-for-like figure: the stages start with
one OpenMP thread (runtime.stage.STAGE_ENV), and the bare loop runs in this process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import ROOT, Report, gbps
from benchmarks.sessions import SessionRun, manifest
from detstream.services.sources.dectris.ingest import bare_ingest

DATA = ROOT.parent / "shared" / "data" / "dectris-stream2" / "r500k_bm_bslz4_16bit"
SHAPE = (514, 1030)


def stand_in(messages: Path, images: int, clients: int) -> tuple[subprocess.Popen, str]:
    """`detstream dcu` serving one series of `images` on a free port, once `clients` are connected."""
    dcu = subprocess.Popen([sys.executable, "-m", "detstream.services.launcher.cli", "dcu", "--messages",
                            str(messages), "--images", str(images), "--bind", "tcp://127.0.0.1:*", "--wait-clients",
                            str(clients)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = dcu.stdout.readline()
    if " on " not in line:
        raise RuntimeError(f"detstream dcu did not start: {line}{dcu.stderr.read()}")
    return dcu, line.split(" on ")[1].split()[0]


def bare(messages: Path, images: int) -> tuple[float, float, float]:
    """frames/s, GB/s and CPU seconds per image of bare_ingest."""
    dcu, address = stand_in(messages, images, 1)
    cpu = time.process_time()
    took = bare_ingest(address, ends=1, channel="")   # one channel, as the source decodes
    cpu = time.process_time() - cpu
    dcu.wait(60)
    if took.images != images:
        raise RuntimeError(f"bare ingest took {took.images} of {images} images")
    return took.images_per_s, took.gb_per_s, cpu / images


def session(messages: Path, images: int, replicas: int, frame_bytes: int) -> tuple[float, float, float]:
    """frames/s, GB/s and the source processes' CPU seconds per image of a session."""
    dcu, address = stand_in(messages, images, replicas)
    doc = manifest("ingest", scan={"rows": images // 10, "cols": 10},
                   detector={"rows": SHAPE[0], "cols": SHAPE[1], "sectors": 1, "dtype": "uint16"},
                   source={"kind": "dectris", "replicas": replicas, "dectris": {"address": address}},
                   workers={"replicas": 1}, plugin={"name": "noop"})
    try:
        with tempfile.TemporaryDirectory(prefix="detstream-bench-") as tmp, SessionRun(doc, Path(tmp)) as run:
            result = run.stream()
    finally:
        dcu.wait(60)
    if result["writer"].frames_in != images:
        raise RuntimeError(f"the session wrote {result['writer'].frames_in} of {images} images")
    fps = images / result["seconds"]
    cpu = sum(seconds for name, seconds in result["cpu"].items() if name.startswith("source-"))
    return fps, gbps(images, result["seconds"], frame_bytes), cpu / images


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the series, a multiple of 10 "
                                                                  "(default 2000)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--messages", type=Path, default=DATA, help=f"recorded messages (default {DATA})")
    args = parser.parse_args(argv)
    report = Report("ingest", images=args.images, replicas=args.replicas, messages=str(args.messages))
    frame_bytes = SHAPE[0] * SHAPE[1] * 2
    fps, rate, cpu = bare(args.messages, args.images)
    report.figure("bare", f"bare receive + decode: {fps:.0f} frames/s, {rate:.2f} GB/s decompressed, "
                  f"{cpu * 1e3:.2f} ms CPU per image", fps=fps, gbps=rate, cpu_per_image=cpu)
    first = None
    for replicas in args.replicas:
        got, got_rate, got_cpu = session(args.messages, args.images, replicas, frame_bytes)
        first = first or got
        report.figure(f"session{replicas}", f"session, {replicas} source replica(s): {got:.0f} frames/s, "
                      f"{got_rate:.2f} GB/s; {got / fps:.2f} x bare, {got / first:.2f} x 1 replica; sources "
                      f"{got_cpu * 1e3:.2f} ms CPU per image, bare/sources {cpu / got_cpu:.2f}",
                      fps=got, gbps=got_rate, ratio_to_bare=got / fps, ratio_to_one=got / first,
                      cpu_per_image=got_cpu, cpu_ratio=cpu / got_cpu)
    return report.save()


if __name__ == "__main__":
    main()
