"""A 4D Camera simulator: sparse electron events on a noisy dark background, with ground truth.

Frames cost nothing to make while streaming: the simulator renders a bank of `distinctFrames` (K)
complete frames, events included, when it starts, and hands out each sector as a read-only view
of it (no copy, no random draw per frame). So frames repeat with period K: frame f of scan s is
bank frame (f + SCAN_STRIDE * s) mod K (scans start at different bank frames, so a frame put in
another scan's place shows). Drawing a frame's events and noise costs ~1-5 ms, which would cap a
source far below the pipeline; a bank of a few tens of frames is enough for counting, thresholds
and benchmarks (the electron-counting plugin samples 40 frames by default).

Every frame is a pure function of (seed, distinctFrames, scan, frame), and so is its ground truth
(`truth`). Each sector of a bank frame has its own random stream, so a source replica renders just
its own sectors; the events have theirs, so the same seed with no electrons gives the noise alone.

`SimulatorSource` is the `simulator` source kind (spec.source.simulator holds its settings). It yields each
bank sector as the same `zmq.Frame` every time: ZeroMQ shares one message by reference count, where a buffer
sent zero-copy is tracked by pyzmq at every send (~3 us of the stage's thread per sector, and work in pyzmq's
garbage-collector thread; `python -m benchmarks.pipeline` shows the source's CPU per frame).
"""

from __future__ import annotations

import numpy as np
import zmq

from detstream.services.model.schema import FieldError
from detstream.services.sources import GridSource

SCAN_STRIDE = 40503   # bank frames between the starts of consecutive scans (odd: every offset mod 2^n)
BANK_BYTES = 512 << 20  # most a source replica's bank may hold (a source pod's default memory limit is 1Gi)
SHARE = 0.15          # fraction of an electron's signal its 4 neighbours each receive
_SPREAD = ((0, 0, 1.0), (-1, 0, SHARE), (1, 0, SHARE), (0, -1, SHARE), (0, 1, SHARE))
XRAY_COUNTS = 6000.0  # an X-ray hit: far above the X-ray threshold


def dark_reference(seed: int, rows: int, cols: int, level: float) -> np.ndarray:
    """The simulated detector's dark reference (float32), what a dark acquisition would average to."""
    rng = np.random.default_rng([seed, 0xDA4C])
    return np.clip(rng.normal(level, level * 0.05, (rows, cols)), 0, None).astype(np.float32)


def bank_bytes(detector, sectors: int, distinct_frames: int) -> int:
    """Bytes of a bank of `distinct_frames` frames of `sectors` sectors of `detector` (spec.detector)."""
    return distinct_frames * sectors * detector.rows * (detector.cols // detector.sectors) * \
        np.dtype(detector.dtype).itemsize


class Simulator:
    """Frames of a simulated 4D Camera: `sim` the spec.source.simulator settings, `detector` spec.detector,
    `sectors` the sector numbers to render (default: all; `sector` and `frame` need theirs rendered).

    Renders the bank at construction: distinctFrames x len(sectors) sectors, ~1 ms of CPU each at
    576x144, held read-only (`bank_bytes`)."""

    def __init__(self, sim, detector, sectors=None):
        self.sim = sim
        self.rows, self.cols, self.sectors = detector.rows, detector.cols, detector.sectors
        self.dtype = np.dtype(detector.dtype)
        self.width = self.cols // self.sectors
        self.distinct = sim.distinct_frames
        self.dark = dark_reference(sim.seed, self.rows, self.cols, sim.dark_level)
        self.top = np.iinfo(self.dtype).max if self.dtype.kind == "u" else np.finfo(self.dtype).max
        mine = range(self.sectors) if sectors is None else sectors
        # per sector: its strips of every bank frame, (distinct, rows, width) C-contiguous
        self.bank = {s: np.empty((self.distinct, self.rows, self.width), self.dtype) for s in mine}
        for index in range(self.distinct):
            deposits = self._frame_deposits(index)
            for s, strips in self.bank.items():
                strips[index] = self.render(index, s, deposits)
        for strips in self.bank.values():
            strips.flags.writeable = False  # sent zero-copy, again and again: nothing may write them

    def index(self, scan: int, frame: int) -> int:
        """The bank frame that frame `frame` of scan `scan` shows (0 .. distinctFrames-1)."""
        return (frame + SCAN_STRIDE * scan) % self.distinct

    def sector(self, scan: int, frame: int, sector: int) -> np.ndarray:
        """One sector (rows x cols/sectors, C-contiguous, read-only) of the frame: a view of the bank."""
        return self.bank[sector][(frame + SCAN_STRIDE * scan) % self.distinct]

    def frame(self, scan: int, frame: int) -> np.ndarray:
        """The whole frame (rows x cols, a new array); needs every sector rendered."""
        return np.hstack([self.sector(scan, frame, s) for s in range(self.sectors)])

    def truth(self, scan: int, frame: int) -> np.ndarray:
        """Linear pixel indices (uint32, ascending) of the electron events put into the frame."""
        rows, cols, _, xray_at = self._events(self.index(scan, frame))
        idx = rows * self.cols + cols
        if xray_at >= 0:  # a hit on or next to an event destroys that event
            xr, xc = divmod(xray_at, self.cols)
            idx = idx[(np.abs(rows - xr) > 1) | (np.abs(cols - xc) > 1)]
        return np.sort(idx).astype(np.uint32)

    def render(self, index: int, sector: int, deposits: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
        """Sector `sector` of bank frame `index`, drawn afresh (a new writable array): its own read noise
        on the dark reference plus pedestal, rounded to the dtype as a detector reads it, then the
        events' counts added (`deposits`: `_frame_deposits(index)`, worked out once for all sectors)."""
        rows, cols, counts = self._frame_deposits(index) if deposits is None else deposits
        lo = sector * self.width
        rng = np.random.default_rng([self.sim.seed, 0xBA4C, index, sector])
        noise = self.dark[:, lo:lo + self.width] + self.sim.pedestal + \
            rng.normal(0.0, self.sim.noise_sigma, (self.rows, self.width))
        out = np.clip(np.rint(noise), 0, self.top).astype(self.dtype)
        inside = (cols >= lo) & (cols < lo + self.width)
        at = rows[inside] * self.width + (cols[inside] - lo)
        flat = out.reshape(-1)
        flat[at] = np.clip(np.rint(flat[at] + counts[inside]), 0, self.top)
        return out

    def _events(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Rows, columns and signals of bank frame `index`'s electron events, and its X-ray hit's linear
        index (-1: none)."""
        rng = np.random.default_rng([self.sim.seed, 0xE7E7, index])
        n = rng.poisson(self.sim.electrons_per_frame)
        # Keep centres off the frame border so every neighbour exists; centres of one frame are
        # kept at least 3 pixels apart so each one is a strict local maximum (countable truth).
        rows = rng.integers(1, self.rows - 1, n)
        cols = rng.integers(1, self.cols - 1, n)
        keep = _spread(rows, cols)
        rows, cols = rows[keep], cols[keep]
        signal = rng.normal(self.sim.electron_signal, self.sim.electron_signal * 0.1, rows.size).clip(1)
        xray = rng.random() < self.sim.xray_probability
        xray_at = int(rng.integers(0, self.rows * self.cols)) if xray else -1
        return rows, cols, signal, xray_at

    def _frame_deposits(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row, column and summed counts of every pixel of bank frame `index` that receives signal."""
        rows, cols, signal, xray_at = self._events(index)
        r = np.concatenate([rows + dr for dr, _, _ in _SPREAD])
        c = np.concatenate([cols + dc for _, dc, _ in _SPREAD])
        counts = np.concatenate([signal * share for _, _, share in _SPREAD])
        if xray_at >= 0:
            xr, xc = divmod(xray_at, self.cols)
            r, c, counts = np.append(r, xr), np.append(c, xc), np.append(counts, XRAY_COUNTS)
        pixel, where = np.unique(r * self.cols + c, return_inverse=True)
        summed = np.bincount(where, weights=counts, minlength=pixel.size)
        return pixel // self.cols, pixel % self.cols, summed


def _spread(rows: np.ndarray, cols: np.ndarray, gap: int = 3) -> np.ndarray:
    """Mask keeping the first of any events closer than `gap` pixels (Chebyshev distance): an event
    is dropped when an earlier event that is kept lies that close."""
    keep = np.ones(rows.size, dtype=bool)
    if rows.size < 2:
        return keep
    near = (np.abs(rows[:, None] - rows[None, :]) < gap) & (np.abs(cols[:, None] - cols[None, :]) < gap)
    near = np.triu(near, 1)          # near[j, i]: j comes before i
    for i in np.flatnonzero(near.any(axis=0)):   # the few events with an earlier neighbour, in order
        keep[i] = not (keep & near[:, i]).any()
    return keep


class SimulatorSource(GridSource):
    """The `simulator` source kind: frames from `Simulator`, with spec.source.simulator's settings; each
    replica renders the bank of its own sectors only."""

    summary = "the built-in 4D Camera simulator"

    @classmethod
    def check(cls, spec):
        detector, replicas = spec.detector, spec.source.replicas
        # electron events are drawn with their 3x3 neighbourhood inside the frame
        problems = [FieldError(f"spec.detector.{axis}", f"must be >= 3 with the simulator source (an electron "
                               f"event spreads over 3x3 pixels); got {getattr(detector, axis)}")
                    for axis in ("rows", "cols") if getattr(detector, axis) < 3]
        distinct = spec.source.simulator.distinct_frames
        held = bank_bytes(detector, -(-detector.sectors // replicas), distinct)  # the busiest replica's
        if held > BANK_BYTES:
            problems.append(FieldError("spec.source.simulator.distinctFrames", (
                f"{distinct} frames of {detector.rows}x{detector.cols} {detector.dtype} would hold "
                f"{held / 2**20:,.0f} MiB in a source replica (at most {BANK_BYTES >> 20} MiB): lower it to "
                f"{distinct * BANK_BYTES // held} or less, or raise spec.source.replicas")))
        return problems

    def __init__(self, spec, replica):
        super().__init__(spec, replica)
        self.simulator = Simulator(spec.source.simulator, spec.detector, self.sectors)
        self.bank = {s: [zmq.Frame(strip) for strip in strips] for s, strips in self.simulator.bank.items()}

    def sector(self, scan: int, frame: int, sector: int) -> zmq.Frame:
        """The sector's pixels as the bank frame's one zmq.Frame (see the module)."""
        return self.bank[sector][self.simulator.index(scan, frame)]
