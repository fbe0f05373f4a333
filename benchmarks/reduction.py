"""What a worker's reduction of a raw frame for the live view costs (services/results/reduction.py).

    python -m benchmarks.reduction [--frames 256] [--repeats 5] [--against REV]

576x576 uint16 frames as 4 read-only column strips (as a worker receives them), more frames than the caches
hold, a bright-field disc and two annuli, one core. Measured, alternated in rounds, best of each:
  reduction   `ScanPatterns.add`: the frame's record (detector sums, total, moments) and the scan's summed and
              maximum patterns, in one compiled pass
  numpy       the same results as numpy writes them: each strip as float64, the masks and [1, x, y] as one
              matrix product, the pattern's add and maximum (checked equal to the reduction's)
  one pass    one numpy pass over each strip: np.maximum into the maximum pattern, the least any numpy way costs
  REV         with --against: the reduction of git revision REV, before it was compiled (numpy passes:
              `FrameReducer.record` then `ScanPatterns.add`), e.g. 070778d
Results: benchmarks/results/reduction.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.report import ROOT, Report
from detstream.services.results.geometry import DetectorGeometry
from detstream.services.results.reduction import FrameReducer, ScanPatterns, sum_dtype

SHAPE, SECTORS = (576, 576), 4
GEOMETRY = DetectorGeometry(40, ((60, 120), (130, 250)))


def strips_of(frames: np.ndarray) -> list[list[np.ndarray]]:
    """Each frame's column strips as read-only arrays over their own buffers, as a worker's views of its parts."""
    width = SHAPE[1] // SECTORS
    return [[np.frombuffer(np.ascontiguousarray(f[:, s * width:(s + 1) * width]).tobytes(), f.dtype)
             .reshape(SHAPE[0], width) for s in range(SECTORS)] for f in frames]


class NumpyReduction:
    """The same record and patterns in numpy: per strip a float64 copy, one matrix product with the detectors'
    masks and [1, x, y], the summed pattern's add and the maximum."""

    def __init__(self):
        rows, cols = SHAPE
        width = cols // SECTORS
        y, x = np.indices(SHAPE)
        weights = np.concatenate([GEOMETRY.masks(SHAPE).reshape(-1, rows, cols),
                                  np.stack([np.ones(SHAPE), x, y])]).astype(np.float64)
        self.weights = [np.ascontiguousarray(weights[:, :, s * width:(s + 1) * width].reshape(len(weights), -1).T)
                        for s in range(SECTORS)]
        self.sums = [np.zeros((rows, width), sum_dtype(np.uint16)) for _ in range(SECTORS)]
        self.maxima = [np.zeros((rows, width), np.uint16) for _ in range(SECTORS)]

    def add(self, strips: list[np.ndarray]) -> np.ndarray:
        record = np.zeros(self.weights[0].shape[1])
        for strip, weights, total, maximum in zip(strips, self.weights, self.sums, self.maxima):
            record += strip.astype(np.float64).ravel() @ weights
            np.add(total, strip, out=total)
            np.maximum(maximum, strip, out=maximum)
        return record


def reduction_at(rev: str):
    """`reduce(strips)` of revision `rev`'s services/results/reduction.py (the API before the compiled pass: a
    FrameReducer's `record`, then ScanPatterns' `add`)."""
    source = subprocess.run(["git", "show", f"{rev}:services/results/reduction.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reduction_at.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("reduction_at", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    reducer = module.FrameReducer(SHAPE, GEOMETRY, np.uint16, SECTORS)
    patterns = module.ScanPatterns(reducer)

    def reduce(strips):
        patterns.add(strips, 0, 0.0)
        return reducer.record(strips)
    return reduce


def per_frame(frames: list[list[np.ndarray]], reduce) -> float:
    start = time.perf_counter()
    for strips in frames:
        reduce(strips)
    return (time.perf_counter() - start) / len(frames)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reduction", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=256, help="frames per round (256: 170 MB, past the caches)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of each way")
    parser.add_argument("--against", metavar="REV", help="also time the reduction of git revision REV")
    args = parser.parse_args(argv)
    report = Report("reduction", frames=args.frames, repeats=args.repeats, against=args.against)
    rng = np.random.default_rng(0)
    frames = strips_of(rng.poisson(20.0, (args.frames, *SHAPE)).astype(np.uint16))
    patterns, numpy_way = ScanPatterns(FrameReducer(SHAPE, GEOMETRY, np.uint16, SECTORS)), NumpyReduction()
    fused = [patterns.add(strips, 0, 0.0) for strips in frames[:8]]
    reference = [numpy_way.add(strips) for strips in frames[:8]]
    np.testing.assert_array_equal(np.stack(fused), np.stack(reference))
    for mine, theirs in zip((*patterns.sums, *patterns.maxima), (*numpy_way.sums, *numpy_way.maxima)):
        np.testing.assert_array_equal(mine, theirs)
    maxima = [np.zeros_like(s) for s in frames[0]]

    def one_pass(strips):
        for strip, maximum in zip(strips, maxima):
            np.maximum(maximum, strip, out=maximum)

    ways = {"reduction": lambda strips: patterns.add(strips, 0, 0.0), "numpy": numpy_way.add, "one pass": one_pass}
    if args.against:
        ways[args.against] = reduction_at(args.against)
        np.testing.assert_array_equal(ways[args.against](frames[0]), reference[0])
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, reduce in ways.items():
            times[name].append(per_frame(frames, reduce))
    best = {name: min(values) for name, values in times.items()}
    report.figure("reduction", f"ms a frame, best of {args.repeats}: "
                  + ", ".join(f"{name} {value * 1e3:.3f}" for name, value in best.items()),
                  **{f"{name.replace(' ', '_')}_ms": value * 1e3 for name, value in best.items()})
    ratios = {name: best["reduction"] / value for name, value in best.items() if name != "reduction"}
    report.figure("ratios", "reduction / " + "; reduction / ".join(f"{name} = {r:.2f}" for name, r in ratios.items()),
                  **{f"vs_{name.replace(' ', '_')}": r for name, r in ratios.items()})
    return report.save()


if __name__ == "__main__":
    main()
