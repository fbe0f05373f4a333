"""Live 4D-STEM images (detstream.services.results) against stempy on the same counted data and raw frames."""

from functools import partial

import h5py
import numpy as np
import pytest
import stempy.image as stim
import stempy.io as stio
from hypothesis import given, settings
from hypothesis import strategies as st

from detstream.services.results.geometry import DetectorGeometry, GeometryError, find_centre
from detstream.services.results.images import (
    COMPLETE,
    MISSING,
    PARTIAL,
    PENDING,
    RecomputeUnavailable,
    ScanImages,
    phase_from_com,
)
from detstream.services.results.reduction import FrameReducer, ScanPatterns, sum_dtype
from detstream.services.results.stem_file import write_stem_images

STEMPY_MASK_VALUE = 0xFFFF  # stempy sums its mask value per electron on counted data (image.h)


def simulated_events(scan_shape, size, centre, rng, empty=()):
    """Counted frames of a 4D-STEM scan: a bright disc (radius size/8) whose centre moves with the position
    (so COM and DPC vary), plus scattered electrons over the whole frame. uint32 linear indices, unique per frame."""
    rows, cols = np.indices((size, size))
    frames = []
    for p in range(scan_shape[0] * scan_shape[1]):
        if p in empty:
            frames.append(np.empty(0, np.uint32))
            continue
        shift = rng.normal(0, 1.0, 2)
        disc = np.flatnonzero((cols - centre[0] - shift[0]) ** 2 + (rows - centre[1] - shift[1]) ** 2 < (size / 8) ** 2)
        hits = np.concatenate([rng.choice(disc, min(len(disc), rng.integers(5, 30)), replace=False),
                               rng.integers(0, size * size, rng.integers(0, 15))])
        frames.append(np.unique(hits).astype(np.uint32))
    return frames


def sparse_array(frames, scan_shape, size):
    data = np.empty((len(frames), 1), object)
    for p, events in enumerate(frames):
        data[p, 0] = events
    return stio.SparseArray(data, scan_shape, (size, size))


def add_in_batches(images, frames, order, batch):
    for start in range(0, len(order), batch):
        chosen = order[start:start + batch]
        images.add_events(chosen, [len(frames[p]) for p in chosen],
                          np.concatenate([frames[p] for p in chosen] + [np.empty(0, np.uint32)]))


def assert_equals_stempy(images, sparse, centre, radii):
    expected = stim.create_stem_images(sparse, [r[0] for r in radii], [r[1] for r in radii], center=centre)
    for name, image in zip(images.geometry.names, expected):
        np.testing.assert_array_equal(images.array(name) * STEMPY_MASK_VALUE, image, err_msg=name)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), size=st.sampled_from([16, 32, 40]),
       seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 20), data=st.data())
def test_images_equal_stempy_in_any_arrival_order(rows, cols, size, seed, batch, data):
    rng = np.random.default_rng(seed)
    centre = (data.draw(st.integers(size // 4, 3 * size // 4)), data.draw(st.integers(size // 4, 3 * size // 4)))
    bright = data.draw(st.integers(1, size // 4))
    annuli = data.draw(st.lists(st.tuples(st.integers(0, size // 2), st.integers(1, size // 2)).filter(
        lambda a: a[0] < a[1]), max_size=3))
    empty = set(data.draw(st.lists(st.integers(0, rows * cols - 1), max_size=2)))
    frames = simulated_events((rows, cols), size, centre, rng, empty)
    sparse = sparse_array(frames, (rows, cols), size)

    images = ScanImages((rows, cols), (size, size), DetectorGeometry(bright, tuple(annuli), centre))
    add_in_batches(images, frames, rng.permutation(rows * cols), batch)

    assert_equals_stempy(images, sparse, centre, [(0, bright), *annuli])
    com = stim.com_sparse(sparse, replace_nans=False)
    np.testing.assert_allclose(images.array("com_x"), com[0], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(images.array("com_y"), com[1], rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(images.array("sum"), stim.calculate_sum_sparse(frames, (size, size)))
    dense = np.zeros((len(frames), size * size))
    for p, events in enumerate(frames):
        dense[p, events] = 1
    np.testing.assert_array_equal(images.array("max"), dense.max(axis=0).reshape(size, size))
    assert (images.array("status") == COMPLETE).all()
    if not empty:  # stempy's phase_from_com has no notion of a position without counts
        dpc = np.stack([images.array("dpc_x"), images.array("dpc_y")])
        np.testing.assert_allclose(dpc, com - np.asarray(centre, float)[:, None, None], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(images.array("idpc"), stim.phase_from_com(dpc), atol=1e-9)


def test_new_geometry_recomputes_the_whole_scan_so_far_and_what_comes_after():
    rng = np.random.default_rng(7)
    scan, size, centre = (12, 10), 48, (22, 25)
    frames = simulated_events(scan, size, centre, rng)
    order = rng.permutation(120)
    images = ScanImages(scan, (size, size), DetectorGeometry(6, ((8, 20),), centre))
    add_in_batches(images, frames, order[:70], 9)
    assert np.isnan(images.array("bright_field")).sum() == 50

    images.set_geometry(DetectorGeometry(4, ((5, 9), (9, 24)), (23, 24)))
    add_in_batches(images, frames, order[70:], 13)
    assert_equals_stempy(images, sparse_array(frames, scan, size), (23, 24), [(0, 4), (5, 9), (9, 24)])
    assert images.array_names[:3] == ["bright_field", "annular_dark_field_0", "annular_dark_field_1"]


def test_partial_lost_and_pending_positions():
    rng = np.random.default_rng(3)
    frames = simulated_events((4, 4), 32, (16, 16), rng)
    images = ScanImages((4, 4), (32, 32), DetectorGeometry(5, ((6, 14),)))
    images.add_events([0, 1], [len(frames[0]), len(frames[1])], np.concatenate(frames[:2]))
    images.add_events([5], [len(frames[5])], frames[5], status=PARTIAL)
    images.mark_lost([9, 10])
    status = images.array("status").ravel()
    assert list(status[[0, 1, 5, 9, 10, 2]]) == [COMPLETE, COMPLETE, PARTIAL, MISSING, MISSING, PENDING]
    bright = images.array("bright_field").ravel()
    assert np.isfinite(bright[[0, 1, 5]]).all() and np.isnan(np.delete(bright, [0, 1, 5])).all()
    assert np.isnan(images.array("com_x").ravel()[[9, 10, 2]]).all()
    progress = images.progress()
    assert (progress["complete"], progress["partial"], progress["lost"], progress["pending"]) == (2, 1, 2, 11)


def test_raw_frames_equal_stempy_and_refuse_a_new_geometry():
    rng = np.random.default_rng(11)
    frames = rng.poisson(0.4, (20, 24, 24)).astype(np.uint16)  # photon-counting-like raw frames
    images = ScanImages((4, 5), (24, 24), DetectorGeometry(4, ((3, 9),), (11, 13)))
    order = rng.permutation(20)
    for start in (0, 7, 15):
        chosen = order[start:start + {0: 7, 7: 8, 15: 5}[start]]
        images.add_frames(chosen, frames[chosen])
    expected = stim.create_stem_images(frames, [0, 3], [4, 9], scan_dimensions=(5, 4), center=(11, 13))
    for name, image in zip(images.geometry.names, expected):
        np.testing.assert_array_equal(images.array(name), image, err_msg=name)
    com = stim.com_dense(frames)
    np.testing.assert_allclose(images.array("com_x").ravel(), com[0])
    np.testing.assert_allclose(images.array("com_y").ravel(), com[1])
    np.testing.assert_array_equal(images.array("sum"), frames.sum(axis=0))
    np.testing.assert_array_equal(images.array("max"), frames.max(axis=0))
    assert images.pattern_frames == 20
    # the workers reduced the frames for the session's geometry; the writer has no pixels to apply another to
    version = images.version
    with pytest.raises(RecomputeUnavailable, match="reduced in the workers.*spec.liveView.geometry"):
        images.set_geometry(DetectorGeometry(2, ((2, 6),), (12, 12)))
    assert images.geometry.bright_field == 4 and images.version == version
    with pytest.raises(ValueError, match="same kind"):
        images.add_events([0], [1], [3])


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "float32"])
@pytest.mark.parametrize("sectors", [1, 4])
def test_a_worker_reduces_raw_frames_in_its_strips_as_numpy_on_the_whole_frame(dtype, sectors):
    """What a worker sends for raw frames (a record per frame, patterns per batch) gives the images a direct
    numpy computation on the whole frames gives: detector sums over the masks, COM, summed and maximum pattern."""
    rng = np.random.default_rng(5)
    rows, cols = 24, 32
    top = 60000.0 if dtype == "float32" else np.iinfo(dtype).max
    frames = (rng.random((12, rows, cols)) ** 8 * top).astype(dtype)
    frames[3] = 0  # a frame without counts: NaN COM
    geometry = DetectorGeometry(5, ((5, 9), (9.5, 15), (2, 12)), (13.5, 10))  # the last overlaps the others
    reducer = FrameReducer((rows, cols), geometry, dtype, sectors)
    images = ScanImages((3, 4), (rows, cols), geometry)
    for batch in np.array_split(rng.permutation(12), 3):
        patterns = ScanPatterns(reducer)
        records = []
        for position in batch:
            strips = np.hsplit(frames[position], sectors)  # the column strips a FRAME message carries
            records.append(patterns.add(strips, int(position), 0.0))
        images.add_reduced(batch, records)
        parts = patterns.take()
        assert not patterns.keys and not any(s.any() for s in patterns.sums)
        images.add_patterns(np.frombuffer(parts[0], sum_dtype(dtype)).reshape(rows, cols),
                            np.frombuffer(parts[1], dtype).reshape(rows, cols), len(batch))
        assert sorted(np.frombuffer(parts[2], np.uint64)) == sorted(batch)
    flat = frames.reshape(12, -1).astype(np.float64)
    # integer pixels are summed exactly; float ones in float64, in another order than numpy's
    equal = np.testing.assert_array_equal if dtype != "float32" else partial(np.testing.assert_allclose, rtol=1e-13)
    for name, mask in zip(geometry.names, geometry.masks((rows, cols))):
        equal(images.array(name).ravel(), flat[:, mask].sum(axis=1), err_msg=name)
    y, x = np.indices((rows, cols))
    with np.errstate(invalid="ignore"):
        com = np.stack([flat @ x.ravel(), flat @ y.ravel()]) / flat.sum(axis=1)
    np.testing.assert_allclose(np.stack([images.array("com_x").ravel(), images.array("com_y").ravel()]), com)
    assert np.isnan(images.array("com_x").ravel()[3])
    equal(images.array("sum"), frames.astype(np.float64).sum(axis=0))
    np.testing.assert_array_equal(images.array("max"), frames.max(axis=0))
    assert images.progress()["pattern_frames"] == 12


def test_past_keep_bytes_images_go_on_and_a_geometry_change_is_refused_by_name():
    rng = np.random.default_rng(5)
    frames = simulated_events((8, 8), 32, (16, 16), rng)
    sizes = np.array([len(f) for f in frames])
    budget = int(4 * sizes[:32].sum() + 8 * 32)  # exactly the first 32 positions' events and records
    images = ScanImages((8, 8), (32, 32), DetectorGeometry(5), keep_bytes=budget)
    add_in_batches(images, frames, np.arange(32), 8)
    assert images.recomputable and images.kept_bytes == budget
    images.set_geometry(DetectorGeometry(6))
    add_in_batches(images, frames, np.arange(32, 64), 8)
    assert not images.recomputable and images.kept_bytes == 0
    assert_equals_stempy(images, sparse_array(frames, (8, 8), 32), (16, 16), [(0, 6)])
    with pytest.raises(RecomputeUnavailable, match="keep_bytes"):
        images.set_geometry(DetectorGeometry(7))
    assert images.geometry.bright_field == 6


@pytest.mark.parametrize("geometry, field", [
    ({"annuli": []}, "bright_field"),
    ({"bright_field": -1}, "bright_field"),
    ({"bright_field": "big"}, "bright_field"),
    ({"bright_field": 4, "annuli": [[9, 3]]}, "annuli[0]"),
    ({"bright_field": 4, "annuli": [[1, 3], [2, float("nan")]]}, "annuli[1].outer"),
    ({"bright_field": 4, "annuli": [5]}, "annuli[0]"),
    ({"bright_field": 4, "centre": [1]}, "centre"),
    ({"bright_field": 4, "radius": 3}, "radius"),
])
def test_bad_geometry_names_the_field(geometry, field):
    with pytest.raises(GeometryError) as error:
        DetectorGeometry.from_dict(geometry)
    assert str(error.value).startswith(field)


def test_centre_outside_the_frame_is_refused():
    with pytest.raises(GeometryError, match="centre.*outside the 32x16"):
        ScanImages((2, 2), (16, 32), DetectorGeometry(4, centre=(40, 3)))


def test_bad_input_changes_nothing():
    images = ScanImages((2, 3), (16, 16), DetectorGeometry(4))
    for args, field in [(([6], [1], [0]), "positions"), (([0], [2], [0]), "counts"),
                        (([0], [1], [256]), "events"), (([0.5], [1], [0]), "positions")]:
        with pytest.raises(ValueError, match=field):
            images.add_events(*args)
    with pytest.raises(ValueError, match="status"):
        images.add_events([0], [1], [0], status=MISSING)
    with pytest.raises(ValueError, match="frames"):
        images.add_frames([0], np.zeros((1, 8, 8)))
    assert images.version == 0 and (images.array("status") == PENDING).all()


def test_centre_is_found_from_the_summed_pattern():
    rng = np.random.default_rng(2)
    frames = simulated_events((16, 16), 64, (27, 36), rng)
    images = ScanImages((16, 16), (64, 64), DetectorGeometry(8))
    add_in_batches(images, frames, np.arange(256), 64)
    x, y = images.found_centre()
    assert abs(x - 27) < 0.5 and abs(y - 36) < 0.5
    assert find_centre(np.zeros((8, 8))) is None


def test_phase_from_com_equals_stempy_with_rotation():
    com = np.random.default_rng(0).normal(size=(2, 9, 14))
    for theta, flip in [(0.0, False), (0.3, False), (1.1, True)]:
        np.testing.assert_allclose(phase_from_com(com, theta, flip), stim.phase_from_com(com, theta, flip), atol=1e-12)


def test_stem_images_file_layout(tmp_path):
    rng = np.random.default_rng(4)
    frames = simulated_events((5, 6), 32, (16, 16), rng)
    images = ScanImages((5, 6), (32, 32), DetectorGeometry(5, ((6, 14),), (16, 15)))
    add_in_batches(images, frames, np.arange(28), 10)
    images.mark_lost([28])  # 29 stays pending: written as lost
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as h5:
        write_stem_images(h5, images)
        with pytest.raises(FileExistsError, match="not overwritten"):
            write_stem_images(h5, images)
    with h5py.File(path, "r") as h5:
        stem = h5["stem"]
        assert list(stem["images"].attrs["names"]) == ["bright_field", "annular_dark_field_0"]
        attrs = stem["images"].attrs
        assert list(attrs["inner_radii"]) == [0, 6] and list(attrs["outer_radii"]) == [5, 14]
        np.testing.assert_array_equal(stem["images"][0], images.array("bright_field"))
        np.testing.assert_array_equal(stem["com"][1], images.array("com_y"))
        np.testing.assert_array_equal(stem["sum_pattern"][()], stim.calculate_sum_sparse(frames[:28], (32, 32)))
        status = stem["position_status"][()].ravel()
        assert (status[:28] == COMPLETE).all() and list(status[28:]) == [MISSING, MISSING]
        assert stem["images"].shape == (2, 5, 6) and stem["idpc"].shape == (5, 6)
        assert stem["max_pattern"].shape == (32, 32)


def test_several_frames_at_one_position_add_up_as_stempy_sums_them():
    rng = np.random.default_rng(9)
    first, second = (simulated_events((3, 4), 32, (15, 17), rng) for _ in range(2))
    data = np.empty((12, 2), object)
    for p in range(12):
        data[p] = [first[p], second[p]]
    sparse = stio.SparseArray(data, (3, 4), (32, 32))
    images = ScanImages((3, 4), (32, 32), DetectorGeometry(5, ((5, 12),), (15, 17)))
    both = [*range(12), 0, 1]  # a batch holding positions 0 and 1 twice
    frames = [*first, second[0], second[1]]
    images.add_events(both, [len(f) for f in frames], np.concatenate(frames))
    images.add_events(range(2, 12), [len(f) for f in second[2:]], np.concatenate(second[2:]))
    assert_equals_stempy(images, sparse, (15, 17), [(0, 5), (5, 12)])
    com = stim.com_sparse(sparse, replace_nans=False)
    np.testing.assert_allclose(np.stack([images.array("com_x"), images.array("com_y")]), com, rtol=1e-6)
