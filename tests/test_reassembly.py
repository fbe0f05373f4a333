"""The aggregator's reassembly (services/dataplane/reassembly.py), driven directly: no sockets, no clock."""

from hypothesis import given, settings
from hypothesis import strategies as st

from detstream.services.dataplane.reassembly import Reassembly

FILL = b"zero"
ROWS, COLS = 2, 4          # 8 frames a scan
TIMEOUTS = dict(frame_timeout=1.0, scan_timeout=10.0)


class Lane:
    """A Reassembly with its callbacks recorded: frames[(scan, frame)] = (parts, missing, mask)."""

    def __init__(self, lane=0, lanes=1, sectors=2, sources=1, count=3, series=False):
        self.frames, self.closed, self.count = {}, [], count
        self.emitted = []   # (scan, frame) in order, repeats included
        self.r = Reassembly(lane, lanes, sectors, ROWS, COLS, sources, FILL, self.on_frame, self.on_close, series)

    def on_frame(self, scan, frame, parts, missing, mask):
        self.emitted.append((scan.number, frame))
        self.frames[scan.number, frame] = (list(parts), list(missing), mask)

    def on_close(self, scan, lost, why):
        self.closed.append((scan.number, scan.count, scan.partial, lost, why))

    def sweep(self, now, draining=False):
        self.r.sweep(now, TIMEOUTS["frame_timeout"], TIMEOUTS["scan_timeout"], self.count, draining)


def test_a_frame_goes_on_once_all_its_sectors_are_in_as_the_very_parts():
    lane = Lane(sectors=3)
    parts = [object(), object(), object()]
    for sector in (2, 0):
        assert lane.r.sector(0, 5, sector, parts[sector], 0, 0, now=0.0) is None
    assert lane.frames == {}
    assert lane.r.sector(0, 5, 1, parts[1], 0, 0, now=0.0) is None
    got, missing, mask = lane.frames[0, 5]
    assert all(a is b for a, b in zip(got, parts)) and missing == [] and mask == 0b111
    assert lane.r.pending == {}


def test_the_same_sector_twice_is_refused_and_the_first_kept():
    lane = Lane()
    lane.r.sector(0, 1, 0, b"first", 0, 0, now=0.0)
    assert lane.r.sector(0, 1, 0, b"again", 0, 0, now=0.0) == ("duplicate-sector", "sector 0 again")
    lane.r.sector(0, 1, 1, b"b", 0, 0, now=0.0)
    assert lane.frames[0, 1][0] == [b"first", b"b"]


def test_a_sector_of_a_frame_passed_on_is_late():
    lane = Lane()
    lane.r.sector(0, 1, 0, b"a", 0, 0, now=0.0)
    lane.r.sector(0, 1, 1, b"b", 0, 0, now=0.0)
    assert lane.r.sector(0, 1, 0, b"a", 0, 0, now=0.0) == ("late", "")


def test_a_frame_of_another_lane_is_misrouted():
    lane = Lane(lane=1, lanes=2)
    assert lane.r.sector(0, 2, 0, b"a", 0, 0, now=0.0) == ("misrouted", "")
    assert lane.r.sector(0, 3, 0, b"a", 0, 0, now=0.0) is None


def test_a_scan_of_another_size_is_refused_open_or_not():
    lane = Lane()
    assert lane.r.sector(0, 1, 0, b"a", 3, 3, now=0.0) == ("geometry", "scan of 3x3")
    assert lane.r.scans == {}
    assert lane.r.sector(0, 1, 0, b"a", 4, 2, now=0.0) is None   # its own geometry, as many frames: taken
    assert lane.r.scans[0].rows == 4
    assert lane.r.end(0, "src", 1, 1, now=0.0) == ("geometry", "scan of 1x1")


def test_a_frame_short_of_sectors_goes_on_partial_after_the_frame_timeout():
    lane = Lane(sectors=3)
    lane.r.sector(0, 4, 1, b"b", 0, 0, now=0.0)
    lane.sweep(now=1.0)          # not past the timeout yet
    assert lane.frames == {}
    lane.sweep(now=1.5)
    parts, missing, mask = lane.frames[0, 4]
    assert parts == [FILL, b"b", FILL] and missing == [0, 2] and mask == 0b010
    assert lane.r.scans[0].partial == 1
    assert lane.r.sector(0, 4, 0, b"a", 0, 0, now=1.6) == ("late", "")


def test_the_last_end_of_scan_closes_it_with_its_frames_waiting_and_the_lost_counted():
    lane = Lane(lane=0, lanes=2, sources=2)   # frames 0, 2, 4, 6 are this lane's
    lane.r.sector(0, 0, 0, b"a", 0, 0, now=0.0)
    lane.r.sector(0, 0, 1, b"b", 0, 0, now=0.0)
    lane.r.sector(0, 2, 0, b"a", 0, 0, now=0.0)
    assert lane.r.end(0, "src-0", 0, 0, now=1.0) is None
    assert lane.r.end(0, "src-0", 0, 0, now=1.0) is None     # the same source again: still one
    assert lane.closed == []
    lane.r.end(0, "src-1", 0, 0, now=2.0)
    assert lane.closed == [(0, 2, 1, 2, "end of scan")]
    assert lane.frames[0, 2][1] == [1]
    assert lane.r.sector(0, 4, 0, b"a", 0, 0, now=3.0) == ("late", "the scan is closed")
    assert lane.r.end(0, "src-1", 0, 0, now=3.0) == ("late", "the scan is closed")


def test_a_silent_scan_closes_after_the_end_of_scan_timeout():
    lane = Lane()
    lane.r.sector(0, 0, 0, b"a", 0, 0, now=0.0)
    lane.sweep(now=9.0)
    assert [c[0] for c in lane.closed] == []
    lane.sweep(now=10.5)
    assert lane.closed == [(0, 1, 1, 7, "no input for 10 s")]


def test_the_first_scan_waits_for_ever_then_each_scan_nobody_starts_closes_one_timeout_apart():
    lane = Lane(count=3)
    lane.sweep(now=1000.0)
    assert lane.closed == []                              # no input yet: the detector may come late
    lane.r.end(0, "src", 0, 0, now=1000.0)
    assert [c[0] for c in lane.closed] == [0]
    lane.sweep(now=1005.0)
    assert [c[0] for c in lane.closed] == [0]
    lane.sweep(now=1010.5)
    assert lane.closed[-1] == (1, 0, 0, 8, "never started: no input for 10 s")
    lane.sweep(now=1015.0)
    assert len(lane.closed) == 2                           # one timeout per scan
    lane.sweep(now=1021.0)
    lane.sweep(now=2000.0)
    assert [c[0] for c in lane.closed] == [0, 1, 2]        # and no further than the session's count


def test_a_sector_of_a_closed_scan_keeps_the_next_one_from_closing():
    lane = Lane(count=3)
    lane.r.end(0, "src", 0, 0, now=0.0)
    lane.sweep(now=8.0)
    lane.r.sector(0, 1, 0, b"a", 0, 0, now=8.0)    # late, but a source is there
    lane.sweep(now=15.0)
    assert [c[0] for c in lane.closed] == [0]


def test_a_scan_below_the_first_seen_closes_one_timeout_after_it_is_noticed():
    lane = Lane(count=5)
    lane.r.sector(2, 0, 0, b"a", 0, 0, now=0.0)     # started mid-session: scans 0 and 1 were before it
    lane.sweep(now=0.5)                              # noticed
    lane.r.sector(2, 1, 0, b"a", 0, 0, now=9.0)
    lane.sweep(now=9.0)
    assert lane.closed == []
    lane.sweep(now=10.6)
    assert lane.closed == [(0, 0, 0, 8, "never seen here: this aggregator started after it")]
    lane.r.sector(2, 1, 1, b"a", 0, 0, now=11.0)
    lane.sweep(now=11.0)                             # scan 1 is noticed now, closes a timeout later
    lane.r.sector(2, 2, 0, b"a", 0, 0, now=20.0)    # (scan 2 goes on)
    lane.sweep(now=20.0)
    assert [c[0] for c in lane.closed] == [0]
    lane.sweep(now=21.5)
    assert [c[0] for c in lane.closed] == [0, 1]


def test_drain_closes_every_open_scan_in_order_and_starts_none():
    lane = Lane(count=10)
    lane.r.sector(3, 0, 0, b"a", 0, 0, now=0.0)
    lane.r.sector(1, 0, 0, b"a", 0, 0, now=0.0)
    lane.r.drain(now=1.0)
    assert [(c[0], c[4]) for c in lane.closed] == [(1, "drained"), (3, "drained")]
    assert lane.frames[1, 0][1] == [1] and lane.frames[3, 0][1] == [1]
    lane.sweep(now=100.0, draining=True)
    assert len(lane.closed) == 2


# Any interleaving of the sectors and ends of a few scans, from a few sources, with sweeps between:
# every frame goes on at most once, the sectors it got are exactly those that arrived first, and each
# closed scan accounts for every frame of the lane (passed on + lost).

EVENT = st.one_of(
    st.tuples(st.just("sector"), st.integers(0, 2), st.integers(0, ROWS * COLS - 1), st.integers(0, 2)),
    st.tuples(st.just("end"), st.integers(0, 2), st.integers(0, 1)),
    st.tuples(st.just("sweep"), st.floats(0, 15)))


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENT, max_size=80), st.integers(0, 1))
def test_any_interleaving_passes_every_frame_on_once_and_accounts_for_every_frame(events, lane_index):
    lane = Lane(lane=lane_index, lanes=2, sectors=3, sources=2, count=3)
    now, arrived = 0.0, {}
    for event in events:
        if event[0] == "sector":
            _, scan, frame, sector = event
            now += 0.01
            refused = lane.r.sector(scan, frame, sector, (scan, frame, sector), 0, 0, now)
            if refused is None:
                arrived.setdefault((scan, frame), set()).add(sector)
            else:
                assert refused[0] in ("late", "misrouted", "duplicate-sector")
        elif event[0] == "end":
            now += 0.01
            lane.r.end(event[1], f"src-{event[2]}", 0, 0, now)
        else:
            now += event[1]
            lane.sweep(now)
    lane.r.drain(now)
    assert len(lane.emitted) == len(set(lane.emitted)), "a frame went on twice"
    assert set(lane.emitted) == set(arrived), "a frame with sectors in never went on"
    for (scan, frame), (parts, missing, mask) in lane.frames.items():
        assert frame % 2 == lane_index
        assert {i for i in range(3) if i not in missing} == arrived[scan, frame]
        assert mask == sum(1 << i for i in arrived[scan, frame])
        assert all(p == (scan, frame, i) if i not in missing else p is FILL for i, p in enumerate(parts))
    lane_frames = len(range(lane_index, ROWS * COLS, 2))
    for scan, passed_on, partial, lost, _ in lane.closed:
        assert passed_on == sum(1 for s, _ in lane.emitted if s == scan)
        assert passed_on + lost == lane_frames
        assert partial == sum(1 for (s, _), f in lane.frames.items() if s == scan and f[1])
    assert [c[0] for c in lane.closed].count(0) <= 1 and lane.r.scans == {} and lane.r.pending == {}


# ---- a detector's series (a DECTRIS DCU): whole frames from whichever source, the detector's end ----

def whole(lane, scan, frame, now, sectors=2):
    """Every sector of a frame, as one source sends an image; the refusals."""
    return [lane.r.sector(scan, frame, s, (scan, frame, s), 0, 0, now) for s in range(sectors)]


def test_the_detectors_end_closes_the_scan_once_its_frames_are_in_whichever_source_sent_them():
    lane = Lane(lanes=2, sources=3, series=True)          # frames 0, 2, 4, 6 are this lane's
    whole(lane, 0, 0, now=0.0)
    assert lane.r.end(0, "src-1", 0, 0, now=0.1, images=6) is None   # 6 images: frames 0, 2, 4 here
    assert lane.closed == []
    whole(lane, 0, 4, now=0.2)
    assert lane.closed == []
    whole(lane, 0, 2, now=0.3)                            # from another source: all in
    assert lane.closed == [(0, 3, 0, 1, "the detector ended it: its 6 frames are in")]


def test_the_detectors_end_after_the_frames_closes_at_once_and_without_it_the_other_sources_ends_do():
    lane = Lane(sources=2, series=True)
    for frame in range(8):
        whole(lane, 0, frame, now=0.0)
    assert lane.closed == []                               # all in, but nobody said the series is over
    lane.r.end(0, "src-0", 0, 0, now=0.1, images=8)
    assert [c[:4] for c in lane.closed] == [(0, 8, 0, 0)]
    whole(lane, 1, 0, now=0.2)
    lane.r.end(1, "src-0", 0, 0, now=0.3)                  # each source's own part ended: gaps are lost
    lane.r.end(1, "src-1", 0, 0, now=0.3)
    assert lane.closed[-1] == (1, 1, 0, 7, "end of scan")


def test_a_frame_of_a_series_that_comes_again_is_a_duplicate():
    lane = Lane(series=True)
    whole(lane, 0, 3, now=0.0)
    assert whole(lane, 0, 3, now=0.1) == [("duplicate", "frame 3 again")] * 2
    lane.r.sector(0, 5, 0, b"a", 0, 0, now=0.2)
    assert lane.r.sector(0, 5, 0, b"b", 0, 0, now=0.2) == ("duplicate", "sector 0 again")


def test_a_series_scan_is_never_closed_as_never_started_but_a_silent_one_is_closed_by_timeout():
    lane = Lane(count=3, series=True)
    whole(lane, 0, 0, now=0.0)
    lane.sweep(now=10.5)                                   # a series that never ends: closed, reported
    assert lane.closed == [(0, 1, 0, 7, "no input for 10 s")]
    lane.sweep(now=1000.0)                                 # the next series may come when it will
    assert len(lane.closed) == 1
    whole(lane, 1, 0, now=1001.0)
    assert 1 in lane.r.scans


SERIES_EVENT = st.one_of(
    st.tuples(st.just("frame"), st.integers(0, 2), st.integers(0, ROWS * COLS - 1)),
    st.tuples(st.just("end"), st.integers(0, 2), st.integers(0, 1)),
    st.tuples(st.just("detector-end"), st.integers(0, 2), st.integers(0, ROWS * COLS)),
    st.tuples(st.just("sweep"), st.floats(0, 15)))


@settings(max_examples=300, deadline=None)
@given(st.lists(SERIES_EVENT, max_size=80), st.integers(0, 1))
def test_any_series_with_gaps_duplicates_and_ends_passes_every_frame_once_and_closes_as_soon_as_it_may(events,
                                                                                                         lane_index):
    lane = Lane(lane=lane_index, lanes=2, sectors=2, sources=2, count=3, series=True)
    now, arrived, images = 0.0, set(), {}
    for event in events:
        now += 0.01
        if event[0] == "frame":
            _, scan, frame = event
            refused = whole(lane, scan, frame, now)
            if refused == [None, None]:
                arrived.add((scan, frame))
            else:
                assert {r[0] for r in refused} <= {"late", "misrouted", "duplicate"}
                assert (scan, frame) in arrived or scan in lane.r.book.closed or frame % 2 != lane_index
        elif event[0] == "end":
            lane.r.end(event[1], f"src-{event[2]}", 0, 0, now)
        elif event[0] == "detector-end":
            _, scan, count = event
            if lane.r.end(scan, "src-0", 0, 0, now, images=count) is None:
                images.setdefault(scan, count)
        else:
            now += event[1]
            lane.sweep(now)
        for scan, count in images.items():   # the detector ended it and its frames are in: closed at once
            if all((scan, f) in arrived for f in range(lane_index, count, 2)):
                assert scan in lane.r.book.closed
    assert all(not why.startswith("never started") for *_, why in lane.closed)
    lane.r.drain(now)
    assert len(lane.emitted) == len(set(lane.emitted)), "a frame went on twice"
    assert set(lane.emitted) == arrived
    assert all(not missing for _, missing, _ in lane.frames.values())   # whole frames: never partial
    for scan, passed_on, _, lost, _ in lane.closed:
        assert passed_on == sum(1 for s, _ in lane.emitted if s == scan)
        assert passed_on + lost == len(range(lane_index, ROWS * COLS, 2))
