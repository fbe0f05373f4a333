"""Streaming against files: the same scan counted the file-based way and the streaming way.

    python -m benchmarks.files [--scan 32] [--workers 2] [--rate 250] [--repeats 1] [--no-fsync]

Both start from nothing and end with the same counted HDF5 file (stempy's electron_events
layout, the same events, checked); the clock runs from the first frame to the file complete.
Measured twice: with frames as fast as the simulator makes them (the machine is the limit: on a
small machine both ways compete for the same cores), and at a detector's rate (RATE frames/s,
as a camera delivers them: acquisition takes as long either way, what differs is what comes
after the last frame).
  streaming  a detstream session: simulator source => WORKERS workers counting electrons (blocks
             routed by a distributor) => writer; no raw file anywhere
  files      the way it is done without streaming, on the same machine, as fast as it goes:
             1. acquisition: the same simulator writes each frame's 4 sectors to 4 raw files
                (one per 4D Camera receiver: a 16-byte record header, then the sector), fsync'ed
             2. transfer: the files are copied to the folder the counting reads (fsync'ed); at a
                facility this is a network copy to the compute centre, here the cheapest one there is
             3. counting: WORKERS processes read the copied files and count the frames, the parent
                writes the HDF5 file
The ratio files / streaming is the figure (the published system reports up to 14x, with a real
network transfer and a parallel file system in the file path; here both paths share one
machine and its page cache, the best case for files). --no-fsync leaves the raw files to the page
cache. Results: benchmarks/results/files.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from benchmarks.report import Report
from benchmarks.sessions import COUNTING, THRESHOLDS, SessionRun, manifest
from detstream.services.model.session import Detector
from detstream.services.model.session import Simulator as SimulatorSettings
from detstream.services.plugins.counting import Counter, Thresholds
from detstream.services.sinks.electron_events import ElectronEventsFile
from detstream.services.sources.simulator import Simulator

ROWS, COLS, SECTORS, WIDTH = 576, 576, 4, 144
RECORD = np.dtype([("scan", "<u4"), ("frame", "<u4"), ("position", "<u4"), ("sector", "<u4"),
                   ("data", "<u2", (ROWS, WIDTH))])


def paced(n: int, rate: float):
    """0 .. n-1 as a detector delivers frames: the k-th not before k / `rate` seconds after the first (frames/s;
    0: all at once)."""
    t0 = time.monotonic()
    for k in range(n):
        if rate:
            time.sleep(max(0.0, t0 + k / rate - time.monotonic()))
        yield k


def sync(path: Path) -> None:
    """Make the file at `path` durable (fsync), as a file handed on must be."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def acquire(folder: Path, frames: int, fsync: bool, rate: float) -> list[Path]:
    """The 4 receivers' raw files: one record per frame, header + sector; `rate` frames/s at most."""
    sim = Simulator(SimulatorSettings(), Detector())
    paths = [folder / f"scan0000_module{s}.data" for s in range(SECTORS)]
    files = [open(p, "wb", buffering=0) for p in paths]
    try:
        for frame in paced(frames, rate):
            for s, f in enumerate(files):
                f.write(np.array([0, frame, frame, s], "<u4").tobytes())
                f.write(sim.sector(0, frame, s).data)
        if fsync:
            for f in files:
                os.fsync(f.fileno())
    finally:
        for f in files:
            f.close()
    return paths


def transfer(paths: list[Path], folder: Path, fsync: bool) -> list[Path]:
    out = []
    for p in paths:
        target = folder / p.name
        shutil.copyfile(p, target)
        if fsync:
            sync(target)
        out.append(target)
    return out


def _count_chunk(task) -> list[np.ndarray]:
    paths, start, stop = task
    records = [np.memmap(p, RECORD, mode="r") for p in paths]
    sim_dark = _count_chunk.dark
    counter = Counter(sim_dark, Thresholds(*THRESHOLDS), (ROWS, COLS))
    return [counter.count_sectors([r["data"][i] for r in records]) for i in range(start, stop)]


def _init(dark):
    _count_chunk.dark = dark


def count(paths: list[Path], side: int, out: Path, pool) -> None:
    frames, chunk = side * side, 64
    tasks = [([str(p) for p in paths], a, min(frames, a + chunk)) for a in range(0, frames, chunk)]
    f = ElectronEventsFile(out, (side, side), (ROWS, COLS))
    position = 0
    for events in pool.imap(_count_chunk, tasks):
        for e in events:
            f.write(position, e)
            position += 1
    f.close()


def file_way(folder: Path, side: int, fsync: bool, rate: float, pool) -> dict:
    (folder / "acquisition").mkdir(parents=True)
    (folder / "compute").mkdir()
    t0 = time.monotonic()
    paths = acquire(folder / "acquisition", side * side, fsync, rate)
    t1 = time.monotonic()
    copied = transfer(paths, folder / "compute", fsync)
    t2 = time.monotonic()
    count(copied, side, folder / "compute" / "files-scan0000.h5", pool)
    t3 = time.monotonic()
    return {"seconds": t3 - t0, "acquisition_s": t1 - t0, "transfer_s": t2 - t1, "counting_s": t3 - t2,
            "file": str(folder / "compute" / "files-scan0000.h5")}


def stream_way(folder: Path, side: int, workers: int, rate: float) -> dict:
    doc = manifest("files", scan={"rows": side, "cols": side}, workers={"replicas": workers},
                   source={"rate": rate}, plugin=COUNTING)
    with SessionRun(doc, folder) as run:
        result = run.stream()
    (account,) = result["writer"].scans
    if account.written != side * side:
        raise RuntimeError(f"streaming wrote {account.written} of {side * side} frames")
    return {"seconds": result["seconds"], "file": account.file}


def same_events(a: str, b: str) -> bool:
    with h5py.File(a) as fa, h5py.File(b) as fb:
        x, y = fa["electron_events/frames"][:], fb["electron_events/frames"][:]
    return len(x) == len(y) and all(np.array_equal(np.sort(p), np.sort(q)) for p, q in zip(x, y))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.files", description=__doc__.split("\n")[0])
    parser.add_argument("--scan", type=int, default=32, help="a SCAN x SCAN scan (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="counting processes of both ways (default 2)")
    parser.add_argument("--rate", type=float, default=250.0, help="a detector's frames/s (default 250)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-fsync", dest="fsync", action="store_false")
    args = parser.parse_args(argv)
    frames = args.scan * args.scan
    report = Report("files", scan=[args.scan, args.scan], frames=frames, workers=args.workers, fsync=args.fsync,
                    rate=args.rate, repeats=args.repeats)
    dark = Simulator(SimulatorSettings(), Detector()).dark
    runs = []
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.workers, initializer=_init, initargs=(dark,)) as pool:
        for _ in range(args.repeats):
            for rate in (0.0, args.rate):
                with tempfile.TemporaryDirectory(prefix="detstream-bench-") as tmp:
                    f = file_way(Path(tmp) / "files", args.scan, args.fsync, rate, pool)
                    s = stream_way(Path(tmp) / "stream", args.scan, args.workers, rate)
                    identical = same_events(f["file"], s["file"])
                runs.append({"rate": rate, "files": f, "streaming": s, "ratio": f["seconds"] / s["seconds"],
                             "identical": identical})
    for rate, name, how in ((0.0, "", "as fast as the machine goes"), (args.rate, "_at_rate",
                                                                        f"at {args.rate:g} frames/s")):
        mine = [r for r in runs if r["rate"] == rate]
        best_f = min(mine, key=lambda r: r["files"]["seconds"])["files"]
        best_s = min(r["streaming"]["seconds"] for r in mine)
        ratio = best_f["seconds"] / best_s
        report.figure(f"streaming{name}", f"{how}: streaming: {args.scan}x{args.scan} scan ({frames} frames) counted "
                      f"into HDF5 in {best_s:.2f} s from the first frame", seconds=best_s)
        report.figure(f"files{name}", f"{how}: files: {best_f['seconds']:.2f} s (acquisition to raw files "
                      f"{best_f['acquisition_s']:.2f} s, transfer {best_f['transfer_s']:.2f} s, counting pass "
                      f"{best_f['counting_s']:.2f} s)", **best_f)
        report.figure(f"ratio{name}", f"{how}: files / streaming = {ratio:.2f} (published system: up to 14x); "
                      f"same events: {all(r['identical'] for r in mine)}", ratio=ratio,
                      median_ratio=statistics.median(r["ratio"] for r in mine),
                      identical=all(r["identical"] for r in mine))
    report.extra["runs"] = runs
    return report.save()


if __name__ == "__main__":
    main()
