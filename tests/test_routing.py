"""Routing by block (docs/full-rate.md): the lane's ledger, a worker's assembly and a source's window,
driven directly: no sockets, no clock."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from detstream.services.dataplane.assembly import Assembly
from detstream.services.dataplane.blocks import Blocks
from detstream.services.dataplane.routing import RoutingLedger
from detstream.services.dataplane.window import SourceWindow
from detstream.services.dataplane.wire import frame_key

ROWS, COLS = 2, 5            # 10 frames a scan
BLOCKS = Blocks(10, 4, 1)    # blocks of 4: frames 0-3, 4-7, 8-9


def test_block_arithmetic_covers_every_frame_once():
    b = Blocks(10, 4, 2)
    assert [list(b.frames(i)) for i in range(b.count)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(b.lane_blocks(0)) == [0, 2] and list(b.lane_blocks(1)) == [1]
    assert b.lane_frames(0) + b.lane_frames(1) == 10


# the lane

def lane(max_credit=8):
    return RoutingLedger(0, BLOCKS, ROWS, COLS, max_credit)


def test_a_block_waits_for_a_worker_with_credit_for_all_its_frames():
    book = lane(max_credit=4)
    route = book.want(0, 0, 0.0)
    assert book.route_waiting() == [] and route.worker is None   # nobody there yet
    w, _ = book.heard(b"w", "tcp://w:1", "worker-0", None, now=0.0)  # a heartbeat: a new worker has the full credit
    assert book.route_waiting() == [route] and route.worker is w and w.credit == 0
    assert book.want(0, 0, 0.0) is route                   # a second source asking gets the same route
    later = book.want(0, 1, 0.0)
    for f in (0, 1, 2):
        book.acknowledge(frame_key(0, f))
    assert book.route_waiting() == [] and w.credit == 3    # 3 credits, 4 frames: it waits
    book.acknowledge(frame_key(0, 3))
    assert book.route_waiting() == [later] and later.worker is w


def test_an_offer_after_a_heartbeat_does_not_add_to_the_credit():
    # A worker's first word may be a heartbeat (it has full credit then); its offer (CREDIT: all it may hold
    # from the lane) that follows counts what it holds already.
    book = lane(max_credit=8)
    w, _ = book.heard(b"w", "tcp://w:1", "worker-0", None, now=0.0)
    first = book.want(0, 0, 0.0)
    assert book.route_waiting() == [first] and w.credit == 4
    book.heard(b"w", "tcp://w:1", "worker-0", 8, now=0.1)
    assert w.credit == 4                                   # 8 in all, 4 of them in block 0
    book.heard(b"w", "tcp://w:1", "worker-0", None, now=0.2)
    assert w.credit == 4


def test_blocks_go_round_robin_to_workers_with_credit_for_them():
    book = lane()
    a, _ = book.heard(b"a", "tcp://a:1", "worker-0", 8, now=0.0)
    b, _ = book.heard(b"b", "tcp://b:1", "worker-1", 8, now=0.0)
    routes = [book.want(0, n, 0.0) for n in range(3)]
    assert book.route_waiting() == routes
    assert [r.worker for r in routes] == [a, b, a]          # blocks of 4, 4 and 2 frames
    assert (a.credit, b.credit) == (2, 4)
    assert book.want(1, 0, 0.0).worker is None and book.route_waiting()[0].worker is b   # a has too little


def test_receipts_and_absent_frames_give_credit_back_and_only_receipts_count_done():
    book = lane(max_credit=4)
    w, _ = book.heard(b"w", "tcp://w:1", "worker-0", 4, now=0.0)
    book.want(0, 0, 0.0)
    book.route_waiting()
    for f in (0, 1, 2):
        book.acknowledge(frame_key(0, f))
    book.acknowledge(frame_key(0, 1))                 # again: nothing changes
    assert w.credit == 3
    book.absent(w, 0, 3)
    assert w.credit == 4 and not book.routes
    book.end(0, "source-0", now=0.0)
    book.sweep(0.0, sources=1, scan_timeout=30, scan_count=1, draining=False)
    ((scan, lost, why),) = list(book.finished(0.0))
    assert why == "end of scan"
    assert scan.count == 3
    assert np.flatnonzero(lost).tolist() == [3, 4, 5, 6, 7, 8, 9]   # 3 absent; blocks 1, 2 never asked


def test_a_scan_is_not_finished_while_frames_are_open_or_a_source_has_not_ended_it():
    book = lane()
    book.heard(b"w", "tcp://w:1", "worker-0", 8, now=0.0)
    book.want(0, 2, 0.0)
    book.route_waiting()

    def finished():
        book.sweep(0.0, sources=2, scan_timeout=30, scan_count=1, draining=False)
        return [s.number for s, _, _ in book.finished(0.0)]
    book.end(0, "source-0", now=0.0)
    assert finished() == []
    book.end(0, "source-1", now=0.0)
    assert finished() == []                           # frames 8, 9 open
    book.acknowledge(frame_key(0, 8))
    book.acknowledge(frame_key(0, 9))
    assert finished() == [0]
    assert book.want(0, 2, 0.0) is None                    # finished here


def test_a_restarted_lane_waits_for_the_wants_of_a_scan_its_sources_ended_before_they_asked():
    """A restarted lane gets the ends its predecessor missed (queued in the sources' sockets) before the sources
    ask again for the blocks they keep: a scan of which they sent it frames is not closed all lost at once."""
    book = lane()
    book.heard(b"w", "tcp://w:1", "worker-0", 8, now=0.0)

    def finished(now):
        book.sweep(now, sources=1, scan_timeout=30, scan_count=2, draining=False)
        return [(s.number, int(lost.sum())) for s, lost, _ in book.finished(now)]
    book.end(0, "source-0", now=0.0, sent=10)
    assert finished(0.1) == []                        # its WANTs are on their way
    for block in range(3):
        book.want(0, block, 0.2)
    book.route_waiting()
    for frame in range(10):
        book.acknowledge(frame_key(0, frame))
    assert finished(0.3) == [(0, 0)]                  # every frame of it done, none lost
    book.end(1, "source-0", now=1.0, sent=10)         # no WANT ever comes: after the grace, the end stands
    assert finished(1.5) == []
    assert finished(2.5) == [(1, 10)]


def test_a_dead_workers_open_frames_are_routed_again_first():
    book = lane(max_credit=4)
    a, _ = book.heard(b"a", "tcp://a:1", "worker-0", 4, now=0.0)
    first = book.want(0, 0, 0.0)
    assert book.route_waiting() == [first] and first.worker is a
    book.acknowledge(frame_key(0, 0))
    second = book.want(0, 1, 0.0)
    assert book.route_waiting() == [] and a.credit == 1     # 4 frames, 1 credit: block 1 waits
    assert book.dead(a) == [first] and first.again
    b, _ = book.heard(b"b", "tcp://b:1", "worker-1", 4, now=1.0)
    assert book.route_waiting() == [first]                 # the re-route first: its 3 open frames
    assert first.worker is b and first.open == {1, 2, 3} and second.worker is None
    book.acknowledge(frame_key(0, 0))                      # a late copy: nothing changes
    assert b.credit == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["want", "credit", "ack", "absent", "dead"]), st.integers(0, 9)),
                max_size=60))
def test_credit_is_conserved_and_every_frame_is_done_or_lost_once(ops):
    book = lane(max_credit=100)
    peers = [b"w0", b"w1"]
    for i, p in enumerate(peers):
        book.heard(p, f"tcp://w{i}:1", f"worker-{i}", 8, now=0.0)
    for op, n in ops:
        if op == "want":
            book.want(0, n % BLOCKS.count, 0.0)
        elif op == "credit":
            book.heard(peers[n % 2], f"tcp://w{n % 2}:1", f"worker-{n % 2}", 1, now=0.0)
        elif op == "ack":
            book.acknowledge(frame_key(0, n))
        elif op == "absent" and book.workers:
            book.absent(next(iter(book.workers.values())), 0, n)
        elif op == "dead" and len(book.workers) > 1 and peers[n % 2] in book.workers:
            book.dead(book.workers[peers[n % 2]])
        book.route_waiting()
        scan = book.scans.get(0)
        open_frames = sum(len(r.open) for r in book.routes.values())
        if scan is not None:
            assert scan.in_flight == open_frames
            assert scan.count == int(scan.done.sum())
        for r in book.routes.values():
            assert not (r.open & set(np.flatnonzero(scan.done).tolist()))   # an open frame is not done
            assert (r.worker is None) == (r in book.waiting)


# a worker's assembly

def assembly(sources=2):
    got, absent = [], []
    a = Assembly(2, sources, b"0", lambda s, f, parts, mask: got.append((f, parts, mask)),
                 lambda s, frames: absent.extend(frames))
    return a, got, absent


def test_a_frame_goes_on_once_every_sector_is_in_and_the_block_ends_with_every_source():
    a, got, absent = assembly()
    a.block(0, 0, range(4), "source-0", [0, 1], [0], [b"a0", b"a1"], end=False, now=0.0)
    assert got == []
    a.block(0, 0, range(4), "source-1", [0], [1], [b"b0"], end=False, now=0.1)
    assert got == [(0, [b"a0", b"b0"], 0b11)]
    a.block(0, 0, range(4), "source-0", [], [0], [], end=True, now=0.2)
    a.block(0, 0, range(4), "source-1", [2], [1], [b"b2"], end=True, now=0.3)
    assert got[1:] == [(1, [b"a1", b"0"], 0b01), (2, [b"0", b"b2"], 0b10)]   # partial once both ended
    assert absent == [3] and a.waiting == 0


def test_duplicates_and_misrouted_frames_are_refused():
    a, got, _ = assembly(sources=1)
    a.block(0, 0, range(4), "source-0", [0], [0, 1], [b"x", b"y"], end=False, now=0.0)
    refused = a.block(0, 0, range(4), "source-0", [0, 5], [0, 1], [b"x", b"y", b"z", b"w"], end=False, now=0.0)
    assert [r[0] for r in refused] == ["duplicate", "misrouted"]
    assert len(got) == 1


def test_a_silent_source_costs_one_frame_timeout():
    a, got, absent = assembly()
    a.block(0, 1, range(4, 8), "source-0", [4], [0], [b"a"], end=True, now=0.0)
    a.sweep(now=0.5, frame_timeout=1.0)
    assert got == []
    a.sweep(now=1.5, frame_timeout=1.0)
    assert got == [(4, [b"a", b"0"], 0b01)] and absent == [5, 6, 7]


# a source's window

def test_a_source_sends_a_block_once_routed_and_ends_it_when_past_it():
    w = SourceWindow(BLOCKS, limit=8)
    ask, sends = w.frame(0, 0, [(0, "p0")])
    assert ask == (0, 0) and sends == []
    assert w.frame(0, 1, [(0, "p1")]) == (None, [])
    (send,) = w.assigned(0, 0, worker=3, again=False)
    assert (send.worker, send.frames, send.end) == (3, [0, 1], False)
    w.frame(0, 2, [(0, "p2")])
    assert w.flush()[0].frames == [2]                 # the block timeout: what is there goes, not ended
    ask, sends = w.frame(0, 4, [(0, "p4")])           # past block 0: it ends
    assert ask == (0, 1) and [(s.frames, s.end) for s in sends] == [([], True)]


def test_a_source_keeps_frames_until_released_and_resends_them_to_a_new_worker():
    w = SourceWindow(BLOCKS, limit=3)
    for f in range(3):
        w.frame(0, f, [(0, f)])
    assert w.full
    w.assigned(0, 0, worker=0, again=False)
    w.release([frame_key(0, 0)])
    assert not w.full
    ask, sends = w.frame(0, 4, [(0, 4)])
    (send,) = w.assigned(0, 0, worker=1, again=True)  # its worker died
    assert (send.worker, send.frames, send.end, send.again) == (1, [1, 2], True, True)
    w.release([frame_key(0, 1), frame_key(0, 2)])
    assert (0, 0) not in w.out
