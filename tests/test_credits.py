"""The distributor's credit ledger (services/dataplane/credits.py), driven directly: no sockets, no clock."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from detstream.services.dataplane.credits import CreditLedger
from detstream.services.dataplane.wire import DUPLICATE, END_OF_SCAN, FRAME, Header, Message, frame_key

ROWS, COLS = 2, 4   # 8 frames a scan


def ledger(lane=0, lanes=1, max_credit=4):
    return CreditLedger(lane, lanes, ROWS, COLS, max_credit)


def frame(scan, number):
    return Message(Header(kind=FRAME, scan=scan, frame=number), [])


def send(book, msg):
    """What the distributor does with a frame: to the next worker with credit, or wait. Returns its peer."""
    worker = book.next_ready()
    if worker is None:
        book.wait(msg)
        return None
    book.sent(worker, msg)
    return worker.peer


def end(scan, lost=0, sender="aggregator-0"):
    return Header(kind=END_OF_SCAN, scan=scan, sender=sender, lost=lost)


def test_a_worker_holds_no_more_credit_than_allowed():
    book = ledger(max_credit=4)
    worker, new = book.heard(b"w", 100, now=0.0)
    assert new and worker.credit == 4
    assert book.heard(b"w", 1, now=1.0) == (worker, False) and worker.last_seen == 1.0


def test_frames_go_round_robin_among_workers_with_credit():
    book = ledger()
    book.heard(b"a", 2, now=0.0)
    book.heard(b"b", 1, now=0.0)
    peers = [send(book, frame(0, f)) for f in range(4)]
    assert peers == [b"a", b"b", b"a", None]
    assert [m.header.frame for m in book.resend] == [3]


def test_a_frame_nobody_can_take_waits_first_in_line():
    book = ledger()
    book.take(frame(0, 0).header)
    assert send(book, frame(0, 0)) is None
    book.resend.append(frame(0, 1))
    book.wait(frame(0, 2))
    assert [m.header.frame for m in book.resend] == [2, 0, 1]


def test_a_full_worker_gets_nothing_until_it_speaks_again():
    book = ledger()
    worker, _ = book.heard(b"a", 3, now=0.0)
    book.refused_full(worker)
    assert book.next_ready() is None and worker.credit == 3
    book.heard(b"a", 0, now=1.0)
    assert book.next_ready() is worker


def test_a_receipt_gives_the_credit_back_once():
    book = ledger()
    book.heard(b"a", 1, now=0.0)
    msg = frame(0, 3)
    assert book.take(msg.header)
    assert send(book, msg) == b"a" and book.next_ready() is None
    book.acknowledge(frame_key(0, 3))
    book.acknowledge(frame_key(0, 3))
    assert book.workers[b"a"].credit == 1
    assert book.scans[0].count == 1 and book.scans[0].in_flight == 0


def test_a_frame_done_or_in_flight_is_not_taken_again():
    book = ledger()
    book.heard(b"a", 2, now=0.0)
    msg = frame(0, 1)
    assert book.take(msg.header)
    send(book, msg)
    assert not book.take(frame(0, 1).header)        # in flight
    book.acknowledge(frame_key(0, 1))
    assert not book.take(frame(0, 1).header)        # done
    assert book.take(frame(1, 1).header)            # the same frame of another scan


def test_a_dead_workers_frames_are_resent_flagged_and_its_receipts_ignored():
    book = ledger()
    a, _ = book.heard(b"a", 2, now=0.0)
    for f in (0, 1):
        book.take(frame(0, f).header)
        send(book, frame(0, f))
    assert book.dead(a) == 2
    assert b"a" not in book.workers and book.holder == {}
    assert [m.header.frame for m in book.resend] == [0, 1]
    assert all(m.header.flags & DUPLICATE for m in book.resend)
    book.acknowledge(frame_key(0, 0))               # a late result of the dead worker: not in flight here
    assert book.scans[0].count == 0
    b, _ = book.heard(b"b", 2, now=1.0)
    while book.resend:
        send(book, book.resend.popleft())
    book.acknowledge(frame_key(0, 0))
    assert book.scans[0].count == 1 and b.credit == 1


def test_silent_workers():
    book = ledger()
    book.heard(b"a", 1, now=0.0)
    book.heard(b"b", 1, now=5.0)
    assert [w.peer for w in book.silent(now=6.0, timeout=3.0)] == [b"a"]


def test_a_scan_finishes_once_ended_with_nothing_in_flight_naming_the_lanes_frames_never_acknowledged():
    book = ledger(lane=1, lanes=2)              # frames 1, 3, 5, 7
    book.heard(b"a", 4, now=0.0)
    for f in (1, 3):
        book.take(frame(0, f).header)
        send(book, frame(0, f))
    book.acknowledge(frame_key(0, 1))
    book.end(end(0, lost=2))
    assert list(book.finished()) == []           # frame 3 in flight
    book.acknowledge(frame_key(0, 3))
    [(scan, lost)] = list(book.finished())
    assert scan.number == 0 and scan.count == 2 and scan.last_end.lost == 2
    assert np.flatnonzero(lost).tolist() == [5, 7]
    assert 0 in book.closed and book.scans == {}
    assert list(book.finished()) == []


def test_the_latest_end_of_a_scan_counts():
    book = ledger()
    book.end(end(0, lost=1, sender="aggregator-0"))
    book.end(end(0, lost=2, sender="aggregator-0b"))
    book.end(end(0, lost=3, sender="aggregator-0"))
    [(scan, _)] = list(book.finished())
    assert scan.last_end.lost == 3


# Any sequence of workers offering credit, frames arriving (read, as the distributor does, only while some
# worker has credit and no frame waits), sends, receipts and workers dying: a credit
# is never spent twice (a worker's credit is what it was given less what it was sent, never below 0),
# every frame taken is in flight with exactly one worker, waiting to be re-sent, or done, and a frame in
# flight on a dead worker is re-sent exactly once.

OP = st.one_of(
    st.tuples(st.just("credit"), st.integers(0, 3), st.integers(0, 5)),
    st.tuples(st.just("frame"), st.integers(0, 1), st.integers(0, ROWS * COLS - 1)),
    st.tuples(st.just("resend")),
    st.tuples(st.just("ack"), st.integers(0, 1), st.integers(0, ROWS * COLS - 1)),
    st.tuples(st.just("full"), st.integers(0, 3)),
    st.tuples(st.just("dead"), st.integers(0, 3)))


@settings(max_examples=300, deadline=None)
@given(st.lists(OP, max_size=100))
def test_credits_are_never_spent_twice_and_every_frame_is_somewhere_once(ops):
    book = ledger(max_credit=3)
    credit = {}                          # peer -> credits given less frames sent, as counted here
    taken, acked, sends, deaths = set(), set(), {}, {}

    def dispatch(msg):
        key = frame_key(msg.header.scan, msg.header.frame)
        peer = send(book, msg)
        if peer is not None:
            credit[peer] -= 1
            sends[key] = sends.get(key, 0) + 1

    for op in ops:
        if op[0] == "credit":
            peer = bytes([op[1]])
            before = book.workers[peer].credit if peer in book.workers else 0
            worker, _ = book.heard(peer, op[2], now=0.0)
            credit[peer] = credit.get(peer, 0) + worker.credit - before
        elif op[0] == "frame" and book.ready and not book.resend:   # when the distributor reads frames
            msg = frame(op[1], op[2])
            if op[1] not in book.closed and book.take(msg.header):
                taken.add(frame_key(op[1], op[2]))
                dispatch(msg)
        elif op[0] == "resend" and book.resend:
            dispatch(book.resend.popleft())
        elif op[0] == "ack":
            key = frame_key(op[1], op[2])
            holder = book.holder.get(key)
            before = holder.credit if holder else 0
            book.acknowledge(key)
            if holder is not None:
                acked.add(key)
                if holder.peer in book.workers:
                    credit[holder.peer] += holder.credit - before
        elif op[0] == "full" and book.next_ready() is book.workers.get(bytes([op[1]]), False):
            book.refused_full(book.workers[bytes([op[1]])])
        elif op[0] == "dead" and bytes([op[1]]) in book.workers:
            worker = book.workers[bytes([op[1]])]
            keys = set(worker.in_flight)
            assert book.dead(worker) == len(keys)
            for key in keys:
                deaths[key] = deaths.get(key, 0) + 1
            del credit[worker.peer]
        for peer, worker in book.workers.items():
            assert 0 <= worker.credit == credit[peer] <= 3, "a credit spent twice, or one made up"
        waiting = [frame_key(m.header.scan, m.header.frame) for m in book.resend]
        in_flight = [k for w in book.workers.values() for k in w.in_flight]
        assert len(waiting) == len(set(waiting)) and len(in_flight) == len(set(in_flight))
        assert set(book.holder) == set(in_flight) and not set(waiting) & set(in_flight)
        assert set(waiting) | set(in_flight) | acked == taken and not (set(waiting) | set(in_flight)) & acked
        for key in taken:
            assert sends.get(key, 0) == deaths.get(key, 0) + (key not in waiting), "re-sent more than once"
        assert all(m.header.flags & DUPLICATE for m in book.resend if deaths.get(
            frame_key(m.header.scan, m.header.frame)))
