"""detstream.services.sinks.electron_events: files written here, read back with stempy's own loader."""

import numpy as np
import pytest
import stempy.io as stio

from detstream.services.sinks.electron_events import ElectronEventsFile


def random_scan(seed, scan_shape, frame_shape, empty=()):
    rng = np.random.default_rng(seed)
    pixels = frame_shape[0] * frame_shape[1]
    events = {}
    for position in range(scan_shape[0] * scan_shape[1]):
        if position not in empty:
            chosen = rng.choice(pixels, rng.integers(0, min(400, pixels)), replace=False)
            events[position] = np.sort(chosen).astype(np.uint32)
    return events


def check_loaded(path, scan_shape, frame_shape, events, metadata=None):
    array = stio.load_electron_counts(path)
    assert tuple(array.scan_shape) == scan_shape
    assert tuple(array.frame_shape) == frame_shape
    assert array.data.shape == (scan_shape[0] * scan_shape[1], 1)
    for position in range(scan_shape[0] * scan_shape[1]):
        expected = events.get(position, np.empty(0, np.uint32))
        np.testing.assert_array_equal(array.data[position, 0], expected)
        assert array.data[position, 0].dtype == np.uint32
    if metadata is not None:
        assert array.metadata == metadata
    return array


def test_non_square_scan_round_trips_through_stempy(tmp_path):
    scan_shape, frame_shape = (3, 5), (576, 576)
    events = random_scan(1, scan_shape, frame_shape, empty={0, 6, 14})
    path = tmp_path / "scan.h5"
    writer = ElectronEventsFile(path, scan_shape, frame_shape, metadata={"scan": 7, "counting": {"background": 28.5}})
    for position in np.random.default_rng(2).permutation(list(events)):  # any order
        writer.write(int(position), events[position])
        assert not path.exists()
        assert (tmp_path / "scan.h5.partial").exists()
    assert writer.close() == path
    assert path.exists() and not (tmp_path / "scan.h5.partial").exists()
    array = check_loaded(path, scan_shape, frame_shape, events, {"scan": 7, "counting": {"background": 28.5}})

    # position p is scan index (p // cols, p % cols), and the pixel indices are row * frame_cols + col
    dense = array[1, 3]
    rows, cols = np.unravel_index(events[1 * 5 + 3], frame_shape)
    assert dense.shape == frame_shape and dense.sum() == len(rows)
    assert (dense[rows, cols] == 1).all()


def test_non_square_frames_and_equal_event_counts(tmp_path):
    # equal-length event arrays trip h5py's high-level vlen writer; frames non-square
    scan_shape, frame_shape = (4, 2), (6, 10)
    events = {p: np.array([p, p + 10, 59], np.uint32) for p in range(8)}
    path = tmp_path / "small.h5"
    writer = ElectronEventsFile(path, scan_shape, frame_shape)
    for position, ev in events.items():
        writer.write(position, ev)
    writer.close()
    array = check_loaded(path, scan_shape, frame_shape, events)
    assert array[3, 1][5, 9] == 1 and array[3, 1][0, 7] == 1  # position 7: pixels 7 = (0, 7) and 59 = (5, 9)


def test_blocks_are_written_as_they_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(ElectronEventsFile, "BLOCK", 4)
    scan_shape, frame_shape = (3, 7), (8, 8)
    events = random_scan(3, scan_shape, frame_shape, empty={2, 20})
    path = tmp_path / "blocks.h5"
    writer = ElectronEventsFile(path, scan_shape, frame_shape)
    for position in sorted(events, reverse=True):
        writer.write(position, events[position])
    # complete blocks (4-7 .. 16-19) went to the file and left memory; 0-3 and 20 wait for close
    assert all(len(writer._events[p]) == 0 for p in range(4, 20))
    assert all(len(writer._events[p]) == len(events[p]) for p in (0, 1, 3))
    assert sum(len(events[p]) for p in range(4, 20)) > 0
    writer.close()
    check_loaded(path, scan_shape, frame_shape, events)


def test_nothing_written_gives_empty_frames(tmp_path):
    path = ElectronEventsFile(tmp_path / "empty.h5", (2, 3), (576, 576)).close()
    check_loaded(path, (2, 3), (576, 576), {})


def test_abort_leaves_nothing(tmp_path):
    path = tmp_path / "aborted.h5"
    writer = ElectronEventsFile(path, (3, 5), (576, 576))
    writer.write(4, np.arange(10, dtype=np.uint32))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_context_manager_aborts_on_error(tmp_path):
    path = tmp_path / "ctx.h5"
    with pytest.raises(RuntimeError), ElectronEventsFile(path, (2, 2), (4, 4)) as writer:
        writer.write(0, [1, 2])
        raise RuntimeError("stage failed")
    assert list(tmp_path.iterdir()) == []
    with ElectronEventsFile(path, (2, 2), (4, 4)) as writer:
        writer.write(3, [1, 2])
    check_loaded(path, (2, 2), (4, 4), {3: np.array([1, 2], np.uint32)})


def test_bad_positions_are_rejected(tmp_path):
    writer = ElectronEventsFile(tmp_path / "bad.h5", (2, 2), (4, 4))
    writer.write(1, [3])
    with pytest.raises(ValueError):
        writer.write(1, [3])
    with pytest.raises(IndexError):
        writer.write(4, [3])
    writer.abort()
