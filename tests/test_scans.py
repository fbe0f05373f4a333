"""The scan records (services/dataplane/scans.py) and the writer's scan accounting
(services/dataplane/accounting.py), driven directly: no sockets, no clock."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from detstream.services.dataplane.accounting import WriterScans, scan_account, scan_record
from detstream.services.dataplane.scans import ClosedScans, Scan, ScanBook, WrittenScan
from detstream.services.dataplane.wire import END_OF_SCAN, Header
from detstream.v1.control_pb2 import StageStatus

ROWS, COLS = 2, 3   # 6 frames a scan
END_TIMEOUT, STALE = 5.0, 30.0


def writer(lanes=2, count=4):
    return WriterScans(lanes, ROWS, COLS, count, END_TIMEOUT, STALE, recent=16)


def lane_end(scan, sent, lost=()):
    bitmap = np.zeros(ROWS * COLS, bool)
    bitmap[list(lost)] = True
    return Header(kind=END_OF_SCAN, scan=scan, sent=sent, lost=len(lost)), bitmap


def test_closed_scans_keep_a_floor_and_the_few_above_it():
    closed = ClosedScans()
    for n in (0, 2, 3, 5):
        closed.add(n)
    assert closed.floor == 1 and closed.above == {2, 3, 5} and len(closed) == 4
    closed.add(1)
    assert closed.floor == 4 and closed.above == {5} and closed.next_open() == 4
    assert all(n in closed for n in (0, 1, 2, 3, 5)) and 4 not in closed and 6 not in closed
    closed.add(2)
    assert len(closed) == 5


@given(st.lists(st.integers(0, 50)))
def test_closed_scans_are_the_set_of_numbers_added(numbers):
    closed = ClosedScans()
    for n in numbers:
        closed.add(n)
    assert len(closed) == len(set(numbers))
    assert [n for n in range(52) if n in closed] == sorted(set(numbers))
    assert closed.next_open() == min(set(range(52)) - set(numbers))


def test_a_scan_book_opens_once_and_closes_for_good():
    book = ScanBook(Scan)
    scan = book.start(3, ROWS, COLS, now=7.0)
    assert book.start(3, 9, 9, now=8.0) is scan and scan.done.shape == (6,) and scan.last_input == 7.0
    assert book.close(3) is scan and 3 in book.closed and book.open == {} and book.next_open() == 0


def test_the_latest_end_of_a_sender_comes_last():
    scan = ScanBook(Scan).start(0, ROWS, COLS, now=0.0)
    assert scan.last_end is None
    scan.ended("a", 1)
    scan.ended("b", 2)
    scan.ended("a", 3)
    assert scan.ends == {"b": 2, "a": 3} and scan.last_end == 3


def test_a_written_scan_has_its_bitmaps_sized_to_the_scan():
    scan = ScanBook(WrittenScan).start(0, ROWS, COLS, now=0.0)
    assert scan.lost.shape == scan.sectors.shape == (6,) and scan.sectors.dtype == np.uint64


def test_a_result_twice_is_a_duplicate():
    w = writer()
    scan = w.scan(0, 0, 0, now=0.0)
    assert w.result(scan, 4, 0b11, partial=False)
    assert not w.result(scan, 4, 0b01, partial=True)
    assert (scan.count, scan.partial, scan.duplicates, int(scan.sectors[4])) == (1, 0, 1, 0b11)


def test_a_scan_of_another_size_is_not_opened():
    w = writer()
    assert w.scan(0, 4, 4, now=0.0) is None and w.scans == {}
    assert w.scan(0, 3, 2, now=0.0).rows == 3


def test_a_scan_closes_when_every_lane_ended_it_and_what_they_passed_on_is_here():
    w = writer(lanes=2)
    scan = w.scan(0, 0, 0, now=0.0)
    for position in (0, 1):
        w.result(scan, position, 1, False)
    w.lane_ended(scan, "distributor-0", *lane_end(0, sent=2))
    assert w.due(now=1.0, last_input=1.0, draining=False) == []       # one lane of two
    w.lane_ended(scan, "distributor-1", *lane_end(0, sent=1, lost=(3,)))
    assert w.due(now=1.0, last_input=1.0, draining=False) == []       # its frame is not here yet
    w.result(scan, 5, 1, False)
    assert w.due(now=1.0, last_input=1.0, draining=False) == [(scan, None)]


def test_a_scan_ended_by_every_lane_closes_after_the_end_timeout_without_what_is_missing():
    w = writer(lanes=1)
    scan = w.scan(0, 0, 0, now=0.0)
    w.lane_ended(scan, "distributor-0", *lane_end(0, sent=3))
    assert w.due(now=END_TIMEOUT, last_input=0.0, draining=False) == []
    assert w.due(now=END_TIMEOUT + 0.1, last_input=0.0, draining=False) == [(scan, None)]


def test_a_scan_a_lane_never_ended_closes_stale_all_it_lacks_lost():
    w = writer(lanes=2)
    scan = w.scan(0, 0, 0, now=0.0)
    w.result(scan, 2, 1, False)
    w.lane_ended(scan, "distributor-0", *lane_end(0, sent=1))
    assert w.due(now=STALE, last_input=0.0, draining=False) == []
    [(due, silent)] = w.due(now=STALE + 1, last_input=0.0, draining=False)
    assert due is scan and silent == STALE + 1
    w.stale(scan)
    account = scan_account(scan, complete=True)
    assert (account.expected, account.written, account.lost) == (6, 1, 5)


def test_the_scan_nobody_sent_is_opened_below_an_open_one_or_after_the_stale_time():
    w = writer(count=3)
    assert w.due(now=100.0, last_input=None, draining=False) == []    # nothing came yet: wait for ever
    w.scan(1, 0, 0, now=100.0)
    w.due(now=100.0, last_input=100.0, draining=False)
    assert sorted(w.scans) == [0, 1] and w.scans[0].last_input == 100.0
    w2 = writer(count=3)
    w2.close(w2.scan(0, 0, 0, 0.0), scan_account(w2.scans[0], True), 0)
    assert w2.due(now=STALE, last_input=0.0, draining=False) == [] and w2.scans == {}
    w2.due(now=STALE + 1, last_input=0.0, draining=False)
    assert list(w2.scans) == [1]
    assert writer(count=3).due(now=STALE + 1, last_input=0.0, draining=True) == []


def test_closed_scans_add_up_in_the_totals_and_the_status():
    w = writer(lanes=1, count=2)
    for number in (0, 1):
        scan = w.scan(number, 0, 0, now=0.0)
        w.result(scan, 0, 1, True)
        w.lane_ended(scan, "d", *lane_end(number, sent=1, lost=(1, 2)))
        account = scan_account(scan, complete=True)
        w.close(scan, account, scan_record(account)["unaccounted"])
    open_scan = w.scan(2, 0, 0, now=0.0)
    w.result(open_scan, 3, 1, False)
    status = StageStatus()
    w.add_status(status)
    total = status.closed_total
    assert (total.expected, total.written, total.partial, total.lost) == (12, 2, 2, 4)
    assert status.scans_closed == 2 and status.scans_unaccounted == 2 and status.scans_total == 2
    assert [(s.scan, s.complete) for s in status.scans] == [(0, True), (1, True), (2, False)]
    assert w.progress() == 1 / 6


# Any results (duplicates included) and lanes' ends, a stale close or not: written + lost +
# unaccounted = expected, written counts each frame once, and lost never counts a written frame.

@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, ROWS * COLS - 1), st.booleans()), max_size=20),
       st.lists(st.sets(st.integers(0, ROWS * COLS - 1)), min_size=0, max_size=2), st.booleans())
def test_written_lost_and_unaccounted_add_up_to_expected(results, lanes_lost, stale):
    w = writer(lanes=2)
    scan = w.scan(0, 0, 0, now=0.0)
    for position, partial in results:
        w.result(scan, position, 1, partial)
    for i, lost in enumerate(lanes_lost):
        w.lane_ended(scan, f"distributor-{i}", *lane_end(0, sent=0, lost=lost))
    if stale:
        w.stale(scan)
    record = scan_record(scan_account(scan, complete=True))
    positions = {p for p, _ in results}
    assert record["written"] == len(positions) and record["duplicates"] == len(results) - len(positions)
    assert record["written"] + record["lost"] + record["unaccounted"] == record["expected"] == ROWS * COLS
    assert record["lost"] == len(set().union(*lanes_lost, *([set(range(6))] if stale else [])) - positions)
    assert record["unaccounted"] >= 0 and (record["unaccounted"] == 0 or not stale)
