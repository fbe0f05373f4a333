"""The 4D Camera simulator: its bank of pre-rendered frames is the per-frame rendering, handed out as
read-only views, and its ground truth is what the pixels hold."""

import numpy as np
import pytest
import zmq

from detstream.services.model.session import Detector, load_session
from detstream.services.model.session import Simulator as Settings
from detstream.services.sources import Frame, source_class
from detstream.services.sources.simulator import SCAN_STRIDE, Simulator, dark_reference

from helpers import manifest

DETECTOR = Detector(rows=40, cols=48, sectors=4)
DISTINCT = 5


def simulator(**settings) -> Simulator:
    return Simulator(Settings(**{"seed": 3, "distinct_frames": DISTINCT, "electrons_per_frame": 12, **settings}),
                     DETECTOR)


def test_every_frame_is_the_per_frame_rendering_of_its_bank_frame_repeating_with_period_k():
    sim = simulator()
    for scan in (0, 1, 2):
        for frame in range(3 * DISTINCT):
            index = sim.index(scan, frame)
            assert index == (frame + SCAN_STRIDE * scan) % DISTINCT
            for s in range(DETECTOR.sectors):
                np.testing.assert_array_equal(sim.sector(scan, frame, s), sim.render(index, s))
            np.testing.assert_array_equal(sim.frame(scan, frame), sim.frame(scan, frame + DISTINCT))
            np.testing.assert_array_equal(sim.truth(scan, frame), sim.truth(scan, frame + DISTINCT))
    frames = [sim.frame(0, f).tobytes() for f in range(DISTINCT)]
    assert len(set(frames)) == DISTINCT  # K distinct frames, not fewer
    assert sim.frame(1, 0).tobytes() != frames[0]  # scans start at different bank frames
    # A bank frame depends on the seed and its index only: a smaller bank holds the same first frames.
    np.testing.assert_array_equal(simulator(distinct_frames=2).frame(0, 1), sim.frame(0, 1))
    np.testing.assert_array_equal(sim.dark, dark_reference(3, 40, 48, 100.0))  # the dark reference is unchanged


def test_the_truth_is_what_the_pixels_hold():
    """Frame minus the same seed's noise alone (no electrons) is signal exactly on the 3x3 crosses of the
    truth's events, each a strict local maximum of it; an X-ray hit destroys the events next to it."""
    noise = simulator(electrons_per_frame=0, xray_probability=0)
    for xray in (0.0, 1.0):
        sim = simulator(xray_probability=xray)
        for frame in range(DISTINCT):
            signal = sim.frame(0, frame).astype(np.int64) - noise.frame(0, frame)
            truth = sim.truth(0, frame)
            assert truth.dtype == np.uint32 and np.all(np.diff(truth.astype(np.int64)) > 0)
            hits = np.flatnonzero(signal >= 1000)
            assert len(hits) == xray
            crosses = set()
            for r, c in zip(*np.unravel_index(truth, signal.shape)):
                crosses |= {(r, c), (r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)}
                around = signal[r - 1:r + 2, c - 1:c + 2].ravel()
                assert np.sum(around >= signal[r, c]) == 1, (frame, r, c)  # a strict local maximum
            touched = set(zip(*np.nonzero(signal)))
            assert crosses <= touched
            # the rest: the X-ray hit and the crosses of the events it destroyed, all next to it
            xrays = list(zip(*np.unravel_index(hits, signal.shape)))
            for r, c in touched - crosses:
                assert any(abs(r - hr) <= 2 and abs(c - hc) <= 2 for hr, hc in xrays)


def test_sectors_are_read_only_views_of_the_bank():
    sim = simulator()
    first = sim.sector(0, 1, 2)
    again = sim.sector(0, 1 + DISTINCT, 2)
    assert first.flags.c_contiguous and not first.flags.writeable and first.shape == (40, 12)
    assert np.shares_memory(first, again) and np.shares_memory(first, sim.bank[2])  # no copy per frame
    with pytest.raises(ValueError, match="read-only"):
        first[0, 0] = 1
    with pytest.raises(ValueError, match="read-only"):
        np.asarray(again).reshape(-1)[5] += 1


def test_a_replica_renders_only_its_sectors_and_they_are_the_frames_own():
    spec = load_session(manifest(detector={"rows": 16, "cols": 24, "sectors": 4}, scan={"rows": 2, "cols": 5},
                                 source={"replicas": 3, "simulator": {"distinctFrames": 4}})).spec
    whole = Simulator(spec.source.simulator, spec.detector)
    source = source_class("simulator")(spec, 1)
    assert list(source.simulator.bank) == [1]  # replica 1 of 3 has sector 1 alone, and renders it alone
    frames = [item for item in source if isinstance(item, Frame)]
    assert len(frames) == 10
    for item in frames:
        assert [s for s, _ in item.sectors] == [1]
        (_, pixels), = item.sectors
        assert isinstance(pixels, zmq.Frame)   # the bank's, every time it is sent (no copy)
        assert pixels is source.sector(item.scan, item.frame, 1)
        np.testing.assert_array_equal(np.frombuffer(pixels, "<u2").reshape(16, 6),
                                      whole.sector(item.scan, item.frame, 1))
