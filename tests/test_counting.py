"""detstream.services.plugins.counting against stempy itself (stempy.image.electron_count_frame,
stempy's calculate_thresholds)."""

import numpy as np
import pytest
import stempy.image as stim
import stempy.io as stio
from hypothesis import given, settings
from hypothesis import strategies as st
from stempy import _image

from detstream.services.plugins.counting import Counter, Thresholds, calculate_thresholds, fit_thresholds

SHAPE = (576, 576)
SECTOR_EDGES = (144, 288, 432)


def stempy_count(frame, dark, thresholds):
    """stempy's events for one frame: a 1x1-scan SparseArray whose only entry holds ascending uint32 linear
    indices row * cols + col (the frame is passed as (cols, rows) 'dimensions' internally)."""
    array = stim.electron_count_frame(
        frame, darkreference=dark, background_threshold=thresholds.background, xray_threshold=thresholds.xray
    )
    assert array.scan_shape == (1, 1) and tuple(array.frame_shape) == frame.shape
    return array.data[0, 0]


def sectors(frame, edges=SECTOR_EDGES):
    return [np.ascontiguousarray(s) for s in np.split(frame, edges, axis=1)]


def counters(dark, thresholds, shape):
    """A Counter held to each way of finding maxima: sparse (candidates' neighbours) and dense (whole frame)."""
    sparse, dense = Counter(dark, thresholds, shape), Counter(dark, thresholds, shape)
    sparse.dense_fraction, dense.dense_fraction = 2.0, 0.0
    return sparse, dense


def assert_same(frame, dark, thresholds):
    expected = stempy_count(frame, dark, thresholds)
    for counter in counters(dark, thresholds, frame.shape):
        got = counter.count(frame)
        assert got.dtype == np.uint32
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(counter.count_sectors(sectors(frame)), expected)
    return expected


def frame_from(values, dark16):
    """The uint16 frame whose dark-subtracted value (as stempy computes it) is `values`."""
    return ((values + dark16) & 0xFFFF).astype(np.uint16)


@pytest.fixture(scope="module")
def scene():
    """A 576x576 frame (dark + noise, some pixels below the dark) with hand-placed features; values are
    the dark-subtracted values stempy sees.  Thresholds: background 30, X-ray 400 (exact integers)."""
    rng = np.random.default_rng(1234)
    dark = rng.uniform(80, 120, SHAPE).astype(np.float32)
    dark16 = np.trunc(dark).astype(np.int64)
    v = np.rint(rng.normal(0, 6, SHAPE)).astype(np.int64)  # about half below the dark: wraps to ~65530
    f = {}
    # single hits on both sides of every sector boundary
    for i, edge in enumerate(SECTOR_EDGES):
        for col in (edge - 1, edge):
            f[f"edge{col}"] = (20 + 10 * i + 5 * (col - edge), col)
    # hits straddling a boundary: higher one wins, equal ones cancel
    v[100, 143], v[100, 144] = 120, 90
    v[110, 287], v[110, 288] = 90, 120
    v[120, 431], v[120, 432] = 77, 77
    for row, col in f.values():
        v[row, col] = 150
    corners = [(0, 0), (0, 575), (575, 0), (575, 575), (0, 300), (575, 200), (250, 0), (260, 575)]
    for row, col in corners:
        v[row, col] = 200
    v[300, 300], v[300, 301] = 55, 55  # tie in a row
    v[310, 300], v[311, 301] = 66, 66  # tie on a diagonal
    v[320, 320], v[321, 320] = 1000, 100  # X-ray hit above its neighbour: dropped, neighbour counts
    v[330, 330], v[330, 331] = 400, 60  # exactly at the X-ray threshold: dropped
    v[340, 340] = 399  # just below the X-ray threshold
    v[350, 350] = 30  # exactly at the background threshold: dropped
    v[360, 360] = 31  # just above
    v[370, 370], v[370, 371] = 30, 31  # 31 beats a pixel zeroed at the threshold
    sparse = rng.integers(0, SHAPE[0] * SHAPE[1], 300)  # a few hundred ordinary electrons
    v.flat[sparse] += rng.integers(40, 250, sparse.size)
    return dark, dark16, v, corners


def idx(row, col):
    return row * SHAPE[1] + col


def test_hand_placed_features_match_stempy(scene):
    dark, dark16, v, corners = scene
    events = set(assert_same(frame_from(v, dark16), dark, Thresholds(30.0, 400.0)).tolist())
    assert {idx(r, c) for r, c in corners} <= events
    assert {idx(100, 143), idx(110, 288), idx(321, 320), idx(340, 340), idx(360, 360), idx(370, 371)} <= events
    for rc in [(100, 144), (110, 287), (120, 431), (120, 432), (300, 300), (300, 301), (310, 300), (311, 301),
               (320, 320), (330, 330), (350, 350)]:
        assert idx(*rc) not in events, rc
    for i, edge in enumerate(SECTOR_EDGES):
        assert {idx(20 + 10 * i - 5, edge - 1), idx(20 + 10 * i, edge)} <= events


@pytest.mark.parametrize("thresholds", [Thresholds(30.5, 399.5), Thresholds(29.999, 400.001), Thresholds(-3.0, 70000.0),
                                        Thresholds(0.0, 65535.0), Thresholds(200.0, 150.0)])
def test_other_thresholds_match_stempy(scene, thresholds):
    dark, dark16, v, _ = scene
    assert_same(frame_from(v, dark16), dark, thresholds)


def test_without_dark_matches_stempy(scene):
    _, _, v, corners = scene
    frame = frame_from(np.abs(v), 0)
    events = set(assert_same(frame, None, Thresholds(30.0, 400.0)).tolist())
    assert {idx(r, c) for r, c in corners} <= events


def test_realistic_frames_match_stempy():
    rng = np.random.default_rng(7)
    dark = rng.normal(100, 4, SHAPE).astype(np.float32)
    counter = Counter(dark, Thresholds(28.7, 1800.0), SHAPE)
    for _ in range(8):
        frame = dark + rng.normal(0, 7, SHAPE)
        hits = rng.integers(0, frame.size, 400)
        frame.flat[hits] += rng.uniform(30, 400, hits.size)
        frame.flat[hits[:3]] += 5000  # X-ray hits
        frame = frame.clip(0, 65535).astype(np.uint16)
        expected = stempy_count(frame, dark, counter.thresholds)
        assert len(expected) > 100
        np.testing.assert_array_equal(counter.count(frame), expected)
        np.testing.assert_array_equal(counter.count_sectors(sectors(frame)), expected)


def test_frames_of_any_density_match_stempy():
    """From sparse (0.1% of pixels between the thresholds) to half the frame, one Counter switching ways."""
    rng = np.random.default_rng(11)
    dark = rng.uniform(90, 110, SHAPE).astype(np.float32)
    thresholds = Thresholds(40.5, 900.0)
    counter = Counter(dark, thresholds, SHAPE)
    for density in (0.001, 0.5, 0.024, 0.16, 0.001, 0.05):
        values = rng.integers(0, 35, SHAPE)
        hits = rng.random(SHAPE) < density
        values[hits] = rng.integers(41, 1000, np.count_nonzero(hits))
        frame = frame_from(values, np.trunc(dark).astype(np.int64))
        expected = stempy_count(frame, dark, thresholds)
        np.testing.assert_array_equal(counter.count(frame), expected, err_msg=f"density {density}")
        np.testing.assert_array_equal(counter.count_sectors(sectors(frame)), expected, err_msg=f"density {density}")


def test_counter_reuses_buffers_between_frames(scene):
    dark, dark16, v, _ = scene
    counter = Counter(dark, Thresholds(30.0, 400.0), SHAPE)
    first = counter.count(frame_from(v, dark16))
    counter.count(frame_from(np.zeros_like(v), dark16))
    np.testing.assert_array_equal(counter.count_sectors(sectors(frame_from(v, dark16))), first)


def test_shape_errors():
    counter = Counter(None, Thresholds(1, 10), (4, 6))
    with pytest.raises(ValueError):
        counter.count(np.zeros((6, 4), np.uint16))
    with pytest.raises(ValueError):
        counter.count_sectors([np.zeros((4, 2), np.uint16)] * 2)
    with pytest.raises(ValueError):
        counter.count_sectors([np.zeros((1, 3), np.uint16)] * 2)


@st.composite
def small_cases(draw):
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    top = draw(st.sampled_from([6, 40, 65535]))  # small ranges make ties and threshold hits likely
    frame = np.array(draw(st.lists(st.integers(0, top), min_size=rows * cols, max_size=rows * cols)), np.uint16)
    frame = frame.reshape(rows, cols)
    dark = None
    if draw(st.booleans()):
        dark = np.array(draw(st.lists(st.floats(0, 30, width=32), min_size=rows * cols, max_size=rows * cols)),
                        np.float32).reshape(rows, cols)
    level = st.one_of(st.integers(-2, 45).map(float), st.floats(-2, 45), st.just(70000.0))
    edges = sorted(draw(st.sets(st.integers(1, cols - 1), max_size=3))) if cols > 1 else []
    return frame, dark, Thresholds(draw(level), draw(level)), edges


@settings(max_examples=400, deadline=None)
@given(small_cases())
def test_small_random_frames_match_stempy(case):
    frame, dark, thresholds, edges = case
    expected = stempy_count(frame, dark, thresholds)
    for counter in counters(dark, thresholds, frame.shape):
        np.testing.assert_array_equal(counter.count(frame), expected)
        np.testing.assert_array_equal(counter.count_sectors(sectors(frame, edges)), expected)


# --- thresholds --------------------------------------------------------------------------------------------


def stempy_thresholds(frames, dark, number_of_samples, background_sigma=4.0, xray_sigma=10.0):
    """What stempy.image.electron_count computes for a reader: _image.calculate_thresholds over the blocks,
    drawing `number_of_samples` frames at random (with replacement) from them."""
    n = len(frames)
    block = stio.PyReader(frames, list(range(n)), (n, 1), n, n).read()._block
    args = [[block]] + ([dark] if dark is not None else []) + [number_of_samples, background_sigma, xray_sigma]
    return _image.calculate_thresholds(*args)


def sample_frames(seed, n=2, pedestal=20):
    """Frames that never drop below the dark (stempy's threshold code cannot cope with wrapped samples)."""
    rng = np.random.default_rng(seed)
    dark = rng.uniform(90, 110, SHAPE).astype(np.float32)
    frames = np.trunc(dark) + pedestal + rng.normal(0, 4, (n, *SHAPE))
    frames = frames.clip(np.trunc(dark))
    for frame in frames:
        hits = rng.integers(0, frame.size, 500)
        frame.flat[hits] += rng.uniform(40, 300, hits.size)
    return dark, frames.astype(np.uint16)


def assert_thresholds_equal(ours, theirs):
    assert ours.xray == theirs.xray_threshold  # same samples, same summation order: bit-identical
    # stempy's Eigen Levenberg-Marquardt stops short of the optimum (xtol = ftol = 1.5e-8): up to ~2e-5 relative
    assert ours.background == pytest.approx(theirs.background_threshold, rel=5e-5)


@pytest.mark.parametrize("with_dark", [True, False])
@pytest.mark.parametrize("copies", [1, 3])
def test_thresholds_of_one_frame_match_stempy(with_dark, copies):
    dark, frames = sample_frames(5, n=1)
    dark = dark if with_dark else None
    theirs = stempy_thresholds(frames, dark, copies)  # one frame to draw from: `copies` copies of it
    assert_thresholds_equal(calculate_thresholds(np.repeat(frames, copies, axis=0), dark), theirs)


@pytest.mark.parametrize("with_dark", [True, False])
def test_thresholds_of_drawn_frames_match_stempy(with_dark):
    dark, frames = sample_frames(6, n=2)
    dark = dark if with_dark else None
    draws = [(0, 0), (0, 1), (1, 0), (1, 1)]
    ours = {draw: calculate_thresholds(frames[list(draw)], dark, 3.5, 8.0) for draw in draws}
    assert len({t.xray for t in ours.values()}) >= 3
    for _ in range(3):
        theirs = stempy_thresholds(frames, dark, 2, 3.5, 8.0)
        drawn = [d for d in draws if ours[d].xray == theirs.xray_threshold]
        assert drawn, "stempy's X-ray threshold is none of the four possible draws"
        assert_thresholds_equal(ours[drawn[0]], theirs)


@pytest.mark.parametrize("with_dark", [True, False])
def test_fit_statistics_are_stempys(with_dark):
    """What the file records of a fit (metadata/electron_counting) is what stempy records of the same fit."""
    dark, frames = sample_frames(5, n=1)
    dark = dark if with_dark else None
    theirs = stempy_thresholds(frames, dark, 2)
    ours = fit_thresholds(np.repeat(frames, 2, axis=0), dark, 4.0, 10.0)
    for name in ("number_of_samples", "min_sample", "max_sample", "number_of_bins"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.mean == theirs.mean and ours.x_ray_threshold == theirs.xray_threshold
    assert ours.variance == pytest.approx(theirs.variance, rel=1e-12)
    assert ours.std_dev == pytest.approx(theirs.std_dev, rel=1e-12)
    assert ours.optimized_mean == pytest.approx(theirs.optimized_mean, rel=5e-5)
    assert abs(ours.optimized_std_dev) == pytest.approx(abs(theirs.optimized_std_dev), rel=5e-5)
    assert (ours.x_ray_threshold_n_sigma, ours.background_threshold_n_sigma) == (10.0, 4.0)
    assert ours.metadata()["threshold_calculated"] is True


def test_thresholds_accept_a_single_2d_frame():
    dark, frames = sample_frames(8, n=1)
    assert calculate_thresholds(frames[0], dark) == calculate_thresholds(frames, dark)


def test_wrapped_samples_fail_like_stempy():
    rng = np.random.default_rng(9)
    dark = rng.uniform(90, 110, SHAPE).astype(np.float32)
    frames = (dark + rng.normal(0, 5, (1, *SHAPE))).clip(0).astype(np.uint16)  # half the pixels below the dark
    with pytest.raises(ValueError):
        stempy_thresholds(frames, dark, 1)
    with pytest.raises(ValueError):
        calculate_thresholds(frames, dark)


def test_thresholds_then_counting_match_stempy():
    dark, frames = sample_frames(10, n=1)
    thresholds = calculate_thresholds(frames, dark)
    assert_same(frames[0], dark, thresholds)


def test_stempy_threaded_reader_counting_matches(tmp_path):
    """stempy's production path: electron_count on a threaded reader over 4D Camera (version 5) sector files,
    thresholds estimated by stempy itself and reported in the metadata."""
    dark, frames = sample_frames(11, n=6)
    scan_rows, scan_cols = 2, 3
    record = np.dtype([("scan", "<u4"), ("frame", "<u4"), ("dims", "<u2", 2), ("xy", "<u2", 2),
                       ("data", "<u2", (144, 576))])
    files = []
    for module in range(4):  # version 5: module m holds frame rows 144 m .. 144 m + 143
        records = np.zeros(len(frames), record)
        records["scan"], records["frame"], records["dims"] = 1, np.arange(1, 7), (scan_cols, scan_rows)
        records["xy"] = np.column_stack([np.arange(6) % scan_cols, np.arange(6) // scan_cols])
        records["data"] = frames[:, 144 * module : 144 * (module + 1)]
        records.tofile(tmp_path / f"data_scan0000000001_module{module}.data")
        files.append(str(tmp_path / f"data_scan0000000001_module{module}.data"))
    reader = stio.reader(files, stio.FileVersion.VERSION5, backend="multi-pass")
    array = stim.electron_count(reader, darkreference=dark, number_of_samples=4)
    meta = array.metadata["electron_counting"]
    counter = Counter(dark, Thresholds(meta["background_threshold"], meta["x_ray_threshold"]), SHAPE)
    assert tuple(array.scan_shape) == (scan_rows, scan_cols)
    for position, frame in enumerate(frames):
        np.testing.assert_array_equal(counter.count(frame), array.data[position, 0])
        np.testing.assert_array_equal(counter.count_sectors(sectors(frame)), array.data[position, 0])


def test_uint8_frames_count_as_the_same_uint16_frames(scene):
    dark, dark16, v, _ = scene
    frame = frame_from(np.clip(v, 0, 255 - 120), dark16).clip(0, 255).astype(np.uint8)
    counter = Counter(dark, Thresholds(30.0, 100.0), SHAPE)
    expected = stempy_count(frame.astype(np.uint16), dark, counter.thresholds)
    assert len(expected) > 100
    np.testing.assert_array_equal(counter.count_sectors(sectors(frame)), expected)


def test_a_uint32_pixel_above_65535_is_no_event_and_leaves_its_neighbours_alone(scene):
    """Field case 02: 65536 + 40 wrapped to 40 and counted as an electron. Above 65535 is above any X-ray
    threshold: the pixel is dropped, and the frame otherwise counts as the same frame of uint16 pixels."""
    dark, dark16, v, _ = scene
    frame = frame_from(v, dark16).astype(np.uint32)
    bright = [(200, 200), (210, 143), (210, 144), (0, 0)]  # inside, on both sides of a sector edge, a corner
    for row, col in bright:
        frame[row, col] = 65536 + 40 + int(dark16[row, col])
    frame[200, 201] = 60 + int(dark16[200, 201])  # an electron beside the hit: it counts
    clipped = frame.clip(0, 65535).astype(np.uint16)
    counter = Counter(dark, Thresholds(30.0, 400.0), SHAPE)
    expected = stempy_count(clipped, dark, counter.thresholds)
    assert not {idx(r, c) for r, c in bright} & set(expected.tolist()) and idx(200, 201) in expected
    np.testing.assert_array_equal(counter.count(frame), expected)
    np.testing.assert_array_equal(counter.count_sectors(sectors(frame)), expected)


def test_thresholds_of_uint32_frames_are_those_of_the_frames_clipped_to_uint16():
    rng = np.random.default_rng(5)
    frames = rng.normal(120, 5, (4, 64, 64)).astype(np.uint32)
    frames[:, 10, 10] = 70000  # a saturating hit per frame: wrapped, it would land in the noise
    clipped = frames.clip(0, 65535).astype(np.uint16)
    assert calculate_thresholds(frames, None) == calculate_thresholds(clipped, None)
