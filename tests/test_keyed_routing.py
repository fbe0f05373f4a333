"""Routing by slice (dataplane/bands.py): the bands, the lane's ledger routing (block, band) units to the band's
worker, a source's window keeping a frame until every band of it is released, a source's reference frames (for a
band's restarted worker), and the writer's per-band accounting. Driven directly: no sockets, no clock."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from detstream.services.dataplane.accounting import WriterScans
from detstream.services.dataplane.bands import Bands
from detstream.services.dataplane.blocks import Blocks
from detstream.services.dataplane.references import References
from detstream.services.dataplane.routing import RoutingLedger
from detstream.services.dataplane.window import SourceWindow
from detstream.services.dataplane.wire import frame_key

BLOCKS = Blocks(10, 4, 1)    # one scan of 10 frames: blocks 0-3, 4-7, 8-9


def test_bands_split_the_rows_evenly_and_take_a_halo_clipped_to_the_detector():
    b = Bands(10, 3)
    assert [b.slices(k) for k in range(3)] == [(0, 4), (4, 3), (7, 3)]
    assert sum(b.slices(k)[1] for k in range(3)) == 10 and b.keyed and b.all == 0b111
    h = Bands(10, 3, halo=2)
    assert [h.rows_of(k) for k in range(3)] == [(0, 6), (2, 9), (5, 10)]
    assert not Bands(10).keyed and Bands(10, 1, halo=1).keyed


def lane(bands=2, max_credit=8):
    book = RoutingLedger(0, BLOCKS, 1, 10, max_credit, bands=bands)
    workers = [book.heard(b"w%d" % k, f"tcp://w:{k + 1}", f"worker-{k}", None, 0.0, band=k)[0] for k in range(bands)]
    return book, workers


def test_a_block_has_a_route_per_band_each_given_to_the_worker_that_owns_it():
    book, (w0, w1) = lane()
    routes = book.want_bands(0, 0, 0.0)
    assert [r.band for r in routes] == [0, 1]
    assert book.route_waiting() == routes
    assert [r.worker for r in routes] == [w0, w1] and w0.credit == w1.credit == 4
    assert book.want_bands(0, 0, 0.0) == routes                 # a second source gets the same routes
    assert book.want(0, 0, 0.0) is routes[0]


def test_a_band_without_credit_waits_without_holding_the_others():
    book, (w0, w1) = lane(max_credit=4)
    book.want_bands(0, 0, 0.0)
    book.route_waiting()
    later = book.want_bands(0, 1, 0.0)
    for f in range(4):
        book.acknowledge(frame_key(0, f), 0)                    # band 0's worker is done with block 0
    assert book.route_waiting() == [later[0]]                   # band 1's worker still holds block 0
    assert later[1].worker is None and w1.credit == 0
    for f in range(4):
        book.acknowledge(frame_key(0, f), 1)
    assert book.route_waiting() == [later[1]]


def test_a_frame_is_done_with_its_first_band_and_open_until_its_last():
    book, (w0, w1) = lane()
    book.want_bands(0, 0, 0.0)
    book.route_waiting()
    scan = book.scans[0]
    assert scan.in_flight == 8                                  # 4 frames x 2 bands
    book.acknowledge(frame_key(0, 2), 1)
    assert scan.done[2] and scan.count == 1 and scan.in_flight == 7 and w1.credit == 5
    book.acknowledge(frame_key(0, 2), 1)                        # the same unit again changes nothing
    book.acknowledge(frame_key(0, 2), 0)
    assert scan.count == 1 and scan.in_flight == 6 and w0.credit == 5


def test_a_band_whose_worker_died_is_given_up_after_the_timeout_and_released():
    book, (w0, w1) = lane()
    book.want_bands(0, 0, 0.0)
    book.route_waiting()
    for f in range(4):
        book.acknowledge(frame_key(0, f), 0)
    w1.last_seen = 1.0
    again = book.dead(w1)
    assert [r.band for r in again] == [1] and book.route_waiting() == []   # nobody else owns band 1
    book.sweep(2.0, 1, 5.0, 1, False)                           # within the timeout: it waits (a restart takes it)
    assert book.route_waiting() == [] and not book.released
    book.sweep(7.0, 1, 5.0, 1, False)
    assert book.route_waiting() == []
    assert sorted(book.released) == [(frame_key(0, f), 1) for f in range(4)]
    assert book.scans[0].in_flight == 0 and book.scans[0].count == 4   # done by band 0: not lost


def test_a_worker_of_the_band_coming_back_takes_its_routes_again():
    book, (w0, w1) = lane()
    book.want_bands(0, 0, 0.0)
    book.route_waiting()
    w1.last_seen = 1.0
    book.dead(w1)
    back, new = book.heard(b"w1-again", "tcp://w:2", "worker-1", 8, 3.0, band=1)
    routed = book.route_waiting()
    assert new and [r.band for r in routed] == [1] and routed[0].worker is back and routed[0].again
    book.sweep(100.0, 1, 5.0, 1, False)
    assert not book.given_up


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 2)), max_size=60), st.integers(1, 3))
def test_the_books_stay_exact_whatever_order_the_units_are_acknowledged_in(acks, bands):
    """Credits never exceed the maximum, frames in flight are the open units, and once every unit is acknowledged
    the scan has no frame open and none lost."""
    book, workers = lane(bands=bands, max_credit=4)
    for block in range(BLOCKS.count):
        book.want_bands(0, block, 0.0)
    for frame, band in acks + [(f, b) for f in range(10) for b in range(bands)]:
        book.route_waiting()
        book.acknowledge(frame_key(0, frame), band % bands)
        scan = book.scans[0]
        assert scan.in_flight == sum(len(r.open) for r in book.routes.values())
        assert all(0 <= w.credit <= 4 for w in workers)
    book.route_waiting()
    book.sweep(0.0, 0, 5.0, 1, False)
    ((scan, lost, _),) = book.finished(0.0)
    assert scan.count == 10 and not lost.any()


# a source's window

def test_a_window_sends_each_band_to_its_worker_and_keeps_a_frame_until_every_band_is_released():
    window = SourceWindow(BLOCKS, limit=8, bands=2)
    ask, sends = window.frame(0, 0, [(0, "pixels")])
    assert ask == (0, 0) and sends == []
    sends = window.assigned(0, 0, "tcp://w:1", False, 0) + window.assigned(0, 0, "tcp://w:2", False, 1)
    assert [(s.worker, s.band, s.frames, s.end) for s in sends] == [("tcp://w:1", 0, [0], False),
                                                                    ("tcp://w:2", 1, [0], False)]
    ended = window.frame(0, 4, [(0, "next block")])[1]         # past block 0: each band's worker hears its end
    assert [(s.worker, s.band, s.frames, s.end) for s in ended] == [("tcp://w:1", 0, [], True),
                                                                    ("tcp://w:2", 1, [], True)]
    window.release([frame_key(0, 0)], [0])
    assert window.sectors(0, 0) is not None                     # band 1 not released yet
    window.release([frame_key(0, 0)], [1])
    assert window.sectors(0, 0) is None


def test_a_worker_gone_leaves_its_band_to_be_sent_again_where_the_lane_says():
    window = SourceWindow(BLOCKS, limit=8, bands=2)
    window.frame(0, 0, [(0, "a")])
    window.frame(0, 1, [(0, "b")])
    window.assigned(0, 0, "tcp://w:1", False, 0)
    window.assigned(0, 0, "tcp://w:2", False, 1)
    window.release([frame_key(0, 0)], [1])                      # band 1 of frame 0 is done
    window.worker_gone("tcp://w:2")
    assert window.flush() == []                                 # band 1 has no worker now
    (send,) = window.assigned(0, 0, "tcp://w:3", True, 1)
    assert (send.worker, send.band, send.frames, send.again) == ("tcp://w:3", 1, [1], True)


def test_a_source_keeps_the_last_scans_reference_frames_for_the_bands_that_may_still_get_their_scan():
    """The darks and flats (here frames 0-1) of the last two scans; a restarted band's worker gets those of the
    scans it may still get frames of (kept for it in the window, or under way: `is_open`)."""
    refs: References[str] = References(range(2), scans=2)
    window = SourceWindow(BLOCKS, limit=8, bands=2)
    for scan in (0, 1, 2):
        for frame in range(4):
            refs.keep(scan, frame, f"{scan}:{frame}")
    assert refs.of(lambda scan: True) == ["1:0", "1:1", "2:0", "2:1"]     # scan 0 forgotten, projections never kept
    refs.keep(0, 0, "0:0 again")                                          # older than both: not kept
    assert refs.of(lambda scan: True) == ["1:0", "1:1", "2:0", "2:1"]
    window.frame(1, 9, [(0, "last of scan 1")])
    window.release([frame_key(1, 9)], [0])                                # band 0 is done with scan 1, band 1 not
    assert window.holds(1, 1) and not window.holds(1, 0) and not window.holds(2, 1)
    assert refs.of(lambda scan: window.holds(scan, 0)) == []
    assert refs.of(lambda scan: window.holds(scan, 1)) == ["1:0", "1:1"]
    assert refs.of(lambda scan: scan == 2 or window.holds(scan, 0)) == ["2:0", "2:1"]   # scan 2 under way
    assert References(range(0)).of(lambda scan: True) == []               # a plugin without references


# the writer

def test_the_writer_counts_a_frame_written_with_its_first_band_and_partial_until_every_band():
    scans = WriterScans(1, 1, 4, 1, 1.0, 10.0, 4)
    scan = scans.scan(0, 1, 4, 0.0)
    assert WriterScans.band_result(scan, 1, 0, 2)
    assert (scan.count, scan.partial) == (1, 1)
    assert WriterScans.band_result(scan, 1, 1, 2)
    assert (scan.count, scan.partial, scan.sectors[1]) == (1, 0, 3)
    assert not WriterScans.band_result(scan, 1, 1, 2) and scan.duplicates == 1
    assert WriterScans.band_result(scan, 2, 0, 2, partial=True)   # strips missing: written, its band not counted
    assert (scan.count, scan.partial, scan.sectors[2]) == (2, 1, 0)
    assert list(np.flatnonzero(scan.done)) == [1, 2]
