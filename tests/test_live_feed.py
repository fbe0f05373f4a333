"""The writer's live results of raw frames (services/results/feed.py): the workers' records placed, their patterns
merged only when no frame in them could be counted twice, and a scan waiting for its patterns before it closes."""

import numpy as np
import pytest

from detstream.services.dataplane.wire import frame_key
from detstream.services.model.session import load_session
from detstream.services.results.feed import PATTERN_WAIT_S, LiveResults
from detstream.services.results.reduction import FrameReducer, ScanPatterns

from helpers import manifest

SHAPE = (32, 32)


@pytest.fixture
def live():
    spec = load_session(manifest("feed", scan={"rows": 2, "cols": 4}, plugin={"name": "noop"},
                                 detector={"rows": 32, "cols": 32, "sectors": 2, "dtype": "uint16"})).spec
    results = LiveResults(spec, "frames", "127.0.0.1", 0, list)
    yield results
    results.stop()


def test_a_pattern_with_a_frame_taken_from_another_worker_is_left_out(live):
    frames = np.random.default_rng(4).poisson(3.0, (8, *SHAPE)).astype(np.uint16)
    reducer = FrameReducer(SHAPE, live.geometry, np.uint16, 2)
    patterns = {"worker-0": ScanPatterns(reducer), "worker-1": ScanPatterns(reducer)}

    def result(worker, frame, taken=True):
        """A worker reduces `frame`; the writer takes its result unless it is a duplicate."""
        record = patterns[worker].add(np.hsplit(frames[frame], 2), frame_key(0, frame), 0.0)
        if taken:
            assert live.add(0, (2, 4), frame, [record.tobytes()], False, worker, frame_key(0, frame))

    def pattern(worker):
        assert live.add_pattern(worker, 0, patterns[worker].take()) is None

    for frame in range(4):
        result("worker-0", frame)
    pattern("worker-0")
    result("worker-0", 4)
    assert live.settling(0, now=100.0)  # frame 4's pattern is still to come
    # frame 4 re-sent to worker-1 (worker-0 was declared dead, but its result had come): a duplicate
    result("worker-1", 4, taken=False)
    result("worker-1", 5)
    pattern("worker-1")  # holds frame 4 a second time: left out, and frame 5 with it
    pattern("worker-0")
    for frame in (6, 7):
        result("worker-1", frame)
    assert live.settling(0, now=100.0 + PATTERN_WAIT_S / 2)
    assert not live.settling(0, now=100.0 + PATTERN_WAIT_S)  # a worker that died never sends its last one
    pattern("worker-1")
    assert not live.settling(0, now=0.0)
    images = live.close_scan(0, np.array([], int), {})
    assert images.pattern_frames == 7
    np.testing.assert_array_equal(images.array("sum"), np.delete(frames, 5, axis=0).sum(axis=0))
    np.testing.assert_array_equal(images.array("max"), np.delete(frames, 5, axis=0).max(axis=0))
    # the images have every frame taken, once
    mask = live.geometry.masks(SHAPE)[0]
    np.testing.assert_array_equal(images.array("bright_field").ravel(),
                                  frames.reshape(8, -1)[:, mask].sum(axis=1))


def test_records_and_patterns_of_the_wrong_size_are_refused(live):
    assert not live.add(0, (2, 4), 0, [b"\0" * 8], False, "worker-0", 0)
    assert not live.add(0, (2, 4), 0, [b"\0" * 40, b"x"], False, "worker-0", 0)
    assert live.add_pattern("worker-0", 0, [b"\0" * 10, b"\0" * 2048, b""]) == "size"
    assert live.add_pattern("worker-0", 0, [b"\0" * 4096, b"\0" * 2048, b"\0" * 3]) == "size"
    assert live.scans == {} and not live.pending
