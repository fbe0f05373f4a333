"""Electron counting throughput: detstream Counter (one core) against stempy 3.x on the same frames.

    python -m benchmarks.counting [--frames 400] [--repeats 3] [--densities 0.001,0.024,0.16,0.5]

Frames: 576x576 uint16, float dark reference (~N(100, 4)), a pedestal of 20 counts with Gaussian noise (sigma 3),
~300 electrons per frame (each a small charge cloud of 1-5 pixels, 30-400 counts) and 3 X-ray hits (3000-9000).
The noise stays above the dark: stempy's threshold estimate breaks (ValueError) on frames below the dark
because the samples wrap around as uint16.

Measured, in this order, each the best of --repeats runs:
  ours            Counter.count over the in-memory frames, process pinned to one core
  ours sectors    Counter.count_sectors over the frames as 4 column strips of 576x144 (as they come off the wire)
  stempy frame    stempy.image.electron_count_frame in a Python loop, pinned to one core
  stempy reader   stempy's C++ counting loop (_image.electron_count with ElectronCountOptionsClassic, what
                  stempy.image.electron_count runs for non-threaded readers) over a PyReader on the in-memory
                  frames, pinned to one core.  NB this path subtracts the float dark before truncating
                  (v = trunc(frame - dark)) where electron_count_frame and the threaded readers (and detstream)
                  compute frame - trunc(dark), so its events are checked on a second run with an integer dark
  stempy 1 thread stempy.image.electron_count on a SectorThreadedMultiPassReader (backend "multi-pass") with
                  threads=1 over 4D Camera v5 sector files in a temporary directory (page cache), pinned to one
                  core; includes stempy's threshold estimate from 1 sampled frame (number_of_samples=1, a few ms)
  stempy threaded the same with the reader's default threads (0 -> hardware concurrency), no pinning
(stempy 3.6.0's other threaded reader, backend "thread" / SectorThreadedReader, segfaults in electron_count on
these files, while its plain SectorReader and the multi-pass reader read them correctly.)
The single-thread baseline is the fastest of the three single-core stempy paths.  Events are checked to be
identical: the in-memory paths use thresholds from detstream's calculate_thresholds, the sector-file paths
stempy's own (from the returned metadata), applied to our Counter for the check.

Density sweep (--densities): frames of uniform noise below the background threshold with the given fraction
of pixels between the thresholds (values 41-999 over a dark of whole numbers, thresholds 40.5 / 900), 40 frames
each; ours (Counter.count, pinned) against the faster of the two single-core in-memory stempy paths (frame loop,
C++ reader loop), events checked identical. Counting costs grow with the pixels in range; this shows where.
Timings are printed and written to benchmarks/results/counting.json; nothing asserts on them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from detstream.services.plugins.counting import Counter, calculate_thresholds
except ImportError:  # run as a file from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from services.counting import Counter, calculate_thresholds

import stempy
import stempy.image as stim
import stempy.io as stio
from stempy import _image

SHAPE = (576, 576)
RESULTS = Path(__file__).resolve().parent / "results" / "counting.json"


def make_frames(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dark = rng.normal(100, 4, SHAPE).clip(60, 140).astype(np.float32)
    base = np.trunc(dark)
    frames = np.empty((n, *SHAPE), np.uint16)
    cloud = np.array([(0, 0), (0, 1), (1, 0), (0, -1), (-1, 0)])
    for frame in frames:
        values = base + 20 + rng.normal(0, 3, SHAPE)
        hits = rng.integers(1, SHAPE[0] - 1, (rng.poisson(300), 2))
        charge = rng.uniform(30, 400, len(hits))
        for (dr, dc), share in zip(cloud, (1.0, 0.3, 0.25, 0.2, 0.15)):
            np.add.at(values, (hits[:, 0] + dr, hits[:, 1] + dc), charge * share)
        xrays = rng.integers(0, SHAPE[0], (3, 2))
        values[xrays[:, 0], xrays[:, 1]] += rng.uniform(3000, 9000, 3)
        frame[...] = values.clip(base, 65535)
    return dark, frames


def write_sector_files(directory: Path, frames: np.ndarray, scan_shape: tuple[int, int]) -> list[str]:
    """4D Camera format version 5: one file per module, a record per frame: uint32 scan number, uint32 frame
    number, uint16 scan width, scan height, x, y; then rows 144*m .. 144*m+143 of the frame."""
    rows, cols = scan_shape
    record = np.dtype([("scan", "<u4"), ("frame", "<u4"), ("dims", "<u2", 2), ("xy", "<u2", 2),
                       ("data", "<u2", (144, 576))])
    paths = []
    for module in range(4):
        records = np.zeros(len(frames), record)
        records["scan"] = 1
        records["frame"] = np.arange(1, len(frames) + 1)
        records["dims"] = (cols, rows)
        positions = np.arange(len(frames))
        records["xy"] = np.column_stack([positions % cols, positions // cols])
        records["data"] = frames[:, 144 * module : 144 * (module + 1), :]
        path = directory / f"data_scan0000000001_module{module}.data"
        records.tofile(path)
        paths.append(str(path))
    return paths


def best_of(repeats: int, run):
    """(best seconds, result of the last run)"""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def pinned(run):
    """run() with the process restricted to one core (the first it may use)."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        return run()
    finally:
        os.sched_setaffinity(0, allowed)


def stempy_reader_count(frames, dark, thresholds, scan_shape):
    reader = stio.PyReader(frames, list(range(len(frames))), scan_shape[::-1], 32, len(frames))
    options = _image.ElectronCountOptionsClassic()
    options.dark_reference = dark
    options.background_threshold = thresholds.background
    options.x_ray_threshold = thresholds.xray
    options.scan_dimensions = scan_shape[::-1]
    data = _image.electron_count(reader.begin(), reader.end(), options)
    return [np.asarray(position[0]) for position in data.data]


def stempy_sector_count(files, dark, threads):
    reader = stio.reader(files, stio.FileVersion.VERSION5, backend="multi-pass", threads=threads)
    return stim.electron_count(reader, darkreference=dark, number_of_samples=1, threshold_num_blocks=1)


def density_frames(density: float, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(integer-valued float32 dark, n frames) with `density` of the pixels between the thresholds 40.5 / 900."""
    rng = np.random.default_rng(seed)
    dark = np.trunc(rng.uniform(90, 110, SHAPE)).astype(np.float32)
    values = rng.integers(0, 35, (n, *SHAPE))
    hits = rng.random((n, *SHAPE)) < density
    values[hits] = rng.integers(41, 1000, np.count_nonzero(hits))
    return dark, (values + dark.astype(np.int64)).astype(np.uint16)


def density_row(density: float, thresholds, repeats: int, n: int) -> dict:
    """One row of the density sweep: frames per second of ours and of stempy's faster path."""
    dark, frames = density_frames(density, n)
    counter = Counter(dark, thresholds, SHAPE)
    ours_s, ours = pinned(lambda: best_of(repeats, lambda: [counter.count(f) for f in frames]))
    frame_s, theirs = pinned(lambda: best_of(repeats, lambda: [stim.electron_count_frame(
        f, darkreference=dark, background_threshold=thresholds.background,
        xray_threshold=thresholds.xray).data[0, 0] for f in frames]))
    reader_s, read = pinned(lambda: best_of(
        repeats, lambda: stempy_reader_count(frames, dark, thresholds, (n // 20, 20))))
    identical = all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(ours, theirs, read))
    stempy_fps = n / min(frame_s, reader_s)
    return {"density": density, "events_per_frame": float(np.mean([len(e) for e in ours])),
            "ours_fps": n / ours_s, "stempy_fps": stempy_fps, "stempy_path": "frame" if frame_s <= reader_s
            else "reader", "ratio": (n / ours_s) / stempy_fps, "identical": identical}


def density_sweep(densities: list[float], repeats: int, n: int = 40) -> list[dict]:
    """Ours against stempy's fastest single-core in-memory path at each density (see the module docstring)."""
    thresholds = Counter(None, (40.5, 900.0), SHAPE).thresholds
    rows = [density_row(density, thresholds, repeats, n) for density in densities]
    print("density  events/frame  ours frames/s  stempy frames/s (path)  ours/stempy  identical")
    for r in rows:
        print(f"{r['density']:7.3f}  {r['events_per_frame']:12.0f}  {r['ours_fps']:13.1f}  {r['stempy_fps']:15.1f} "
              f"({r['stempy_path']:<6})  {r['ratio']:10.2f}x  {r['identical']}")
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=400, help="number of frames (multiple of 20)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--densities", default="0.001,0.024,0.16,0.5",
                        help="fractions of pixels between the thresholds for the sweep ('' to skip it)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n = args.frames - args.frames % 20
    scan_shape = (n // 20, 20)

    dark, frames = make_frames(n)
    thresholds = calculate_thresholds(frames[:: max(1, n // 40)][:40], dark)
    counter = Counter(dark, thresholds, SHAPE)
    strips = [[np.ascontiguousarray(s) for s in np.split(f, 4, axis=1)] for f in frames]
    fps, identical, notes = {}, {}, {}

    seconds, ours = pinned(lambda: best_of(args.repeats, lambda: [counter.count(f) for f in frames]))
    fps["ours"] = n / seconds
    seconds, ours_strips = pinned(lambda: best_of(args.repeats, lambda: [counter.count_sectors(s) for s in strips]))
    fps["ours sectors"] = n / seconds
    identical["ours sectors"] = all(np.array_equal(a, b) for a, b in zip(ours, ours_strips))
    strips.clear()  # frees the copies before the next measurement
    del ours_strips

    def frame_loop():
        return [stim.electron_count_frame(f, darkreference=dark, background_threshold=thresholds.background,
                                          xray_threshold=thresholds.xray).data[0, 0] for f in frames]

    seconds, theirs = pinned(lambda: best_of(args.repeats, frame_loop))
    fps["stempy frame"] = n / seconds
    identical["stempy frame"] = all(np.array_equal(a, b) for a, b in zip(ours, theirs))

    seconds, _ = pinned(lambda: best_of(args.repeats,
                                        lambda: stempy_reader_count(frames, dark, thresholds, scan_shape)))
    fps["stempy reader"] = n / seconds
    integer_dark = np.trunc(dark)  # where the two dark conventions agree
    theirs = stempy_reader_count(frames, integer_dark, thresholds, scan_shape)
    check = Counter(integer_dark, thresholds, SHAPE)
    identical["stempy reader"] = all(np.array_equal(check.count(f), b) for f, b in zip(frames, theirs))
    notes["stempy reader"] = "events compared with an integer dark: this path computes trunc(frame - dark)"

    with tempfile.TemporaryDirectory(prefix="detstream-bench-") as tmp:
        files = write_sector_files(Path(tmp), frames, scan_shape)
        for name, threads, pin in (("stempy 1 thread", 1, True), ("stempy threaded", 0, False)):
            run = functools.partial(best_of, args.repeats, functools.partial(stempy_sector_count, files, dark, threads))
            seconds, array = pinned(run) if pin else run()
            fps[name] = n / seconds
            meta = array.metadata["electron_counting"]
            check = Counter(dark, (meta["background_threshold"], meta["x_ray_threshold"]), SHAPE)
            identical[name] = tuple(array.scan_shape) == scan_shape and all(
                np.array_equal(check.count(f), array.data[p, 0]) for p, f in enumerate(frames))
            notes[name] = {"background_threshold": meta["background_threshold"],
                           "xray_threshold": meta["x_ray_threshold"],
                           "events_per_frame": float(np.mean([len(e) for e in array.data[:, 0]]))}

    cores = len(os.sched_getaffinity(0))
    single = max(("stempy frame", "stempy reader", "stempy 1 thread"), key=fps.get)
    ratios = {
        "ours / stempy single-thread": fps["ours"] / fps[single],
        "ours / stempy threaded": fps["ours"] / fps["stempy threaded"],
        "ours / stempy threaded per core": fps["ours"] / (fps["stempy threaded"] / cores),
        "ours sectors / stempy single-thread": fps["ours sectors"] / fps[single],
    }
    print(f"{n} frames {SHAPE[0]}x{SHAPE[1]}, {np.mean([len(e) for e in ours]):.0f} events/frame, "
          f"thresholds {thresholds.background:.2f} / {thresholds.xray:.2f}, {cores} cores, stempy {stempy.__version__}")
    for name, value in fps.items():
        ratio = fps["ours"] / value
        same = "" if name == "ours" else f"  events identical: {identical[name]}"
        same += " (integer dark)" if name == "stempy reader" else ""
        print(f"{name:<16} {value:9.1f} frames/s   ours/this = {ratio:6.2f}x{same}")
    print(f"stempy single-thread baseline = {single}")
    for name, value in ratios.items():
        print(f"{name:<36} {value:6.2f}x")

    densities = [float(d) for d in args.densities.split(",") if d.strip()]
    sweep = density_sweep(densities, args.repeats) if densities else []

    result = {
        "density_sweep": sweep,
        "frames": n, "frame_shape": SHAPE, "scan_shape": scan_shape, "repeats": args.repeats, "cores": cores,
        "thresholds": thresholds._asdict(), "events_per_frame": float(np.mean([len(e) for e in ours])),
        "fps": fps, "identical": identical, "single_thread_baseline": single, "ratios": ratios,
        "notes": notes, "stempy": stempy.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
