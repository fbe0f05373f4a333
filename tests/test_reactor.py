"""The stage base's reactor (services/runtime/reactor.py) on real ZeroMQ sockets over 127.0.0.1."""

from __future__ import annotations

import pytest
import zmq

from detstream.services.dataplane.wire import HEARTBEAT, Header, Outbox, receive_parts
from detstream.services.runtime.reactor import Reactor

POLL_MS = 20


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def pair(ctx, hwm: int = 1000) -> tuple[zmq.Socket, zmq.Socket]:
    """A PUSH connected to a PULL on a free loopback port."""
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVHWM, hwm)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, hwm)
    push.connect(f"tcp://127.0.0.1:{port}")
    return push, pull


def raw(sock, envelope, flags):
    """A receive that takes every message as it is (the stage's checks are not the reactor's)."""
    parts = receive_parts(sock, flags)
    return None, [p.bytes for p in parts]


def reactor(waiting=lambda: True) -> Reactor:
    return Reactor(raw, waiting, POLL_MS)


def turn_until(r: Reactor, done, turns: int = 200) -> None:
    for _ in range(turns):
        r.turn()
        if done():
            return
    raise AssertionError("the reactor never handled what was sent")


def test_one_socket_handles_up_to_a_batch_per_turn(ctx):
    push, pull = pair(ctx)
    got: list = []
    r = reactor()
    r.on_message(pull, got.append, batch=3)
    for i in range(7):
        push.send(b"%d" % i)
    turn_until(r, lambda: got)            # the first turn with input takes what is queued, up to 3
    assert 1 <= len(got) <= 3
    turn_until(r, lambda: len(got) == 7)
    assert got == [[b"%d" % i] for i in range(7)]


def test_a_turn_without_input_returns(ctx):
    _, pull = pair(ctx)
    got: list = []
    r = reactor()
    r.on_message(pull, got.append)
    r.turn()  # waits POLL_MS inside the receive, then returns
    assert got == []


def test_several_sockets_each_read_and_one_gated_by_when(ctx):
    push_a, pull_a = pair(ctx)
    push_b, pull_b = pair(ctx)
    seen: list = []
    open_b = [False]
    r = reactor()
    r.on_message(pull_a, lambda m: seen.append(("a", m[0])))
    r.on_message(pull_b, lambda m: seen.append(("b", m[0])), when=lambda: open_b[0])
    push_a.send(b"1")
    push_b.send(b"2")
    turn_until(r, lambda: ("a", b"1") in seen)
    for _ in range(5):
        r.turn()
    assert ("b", b"2") not in seen       # b is not read while when() says no
    open_b[0] = True
    turn_until(r, lambda: ("b", b"2") in seen)


def test_writable_handler_only_while_something_waits(ctx):
    push, pull = pair(ctx)
    _, other = pair(ctx)
    calls: list = []
    waiting_to_go = [False]
    r = reactor()
    r.on_message(other, lambda m: None)
    r.on_writable(push, lambda: calls.append("room"), when=lambda: waiting_to_go[0])
    for _ in range(3):
        r.turn()
    assert calls == []
    waiting_to_go[0] = True
    turn_until(r, lambda: calls)


def test_periodic_tasks_run_when_due(ctx):
    _, pull = pair(ctx)
    every_turn, hourly = [], []
    r = reactor()
    r.on_message(pull, lambda m: None)
    r.every(0, every_turn.append)
    r.every(3600, hourly.append)
    for _ in range(3):
        r.turn()
    assert len(every_turn) == 3
    assert len(hourly) == 1               # due at the first turn, then not for an hour
    assert every_turn[0] <= every_turn[1] <= every_turn[2]


def test_a_task_alone_needs_no_socket():
    runs: list = []
    r = reactor()
    r.every(0, runs.append)
    r.turn()
    r.turn()
    assert len(runs) == 2


def full_pair(ctx) -> tuple[Outbox, zmq.Socket]:
    """An outbox whose connected peer reads nothing, filled up: its queue, the peer's and the kernel's
    buffers. The messages are below pyzmq's zero-copy threshold: a zero-copy message still queued would
    hold the context's termination up."""
    push, pull = pair(ctx, hwm=1)
    out = Outbox(push, "test")
    out.send(Header(kind=HEARTBEAT))
    assert pull.poll(5000), "the peer never connected"
    block = bytes(zmq.COPY_THRESHOLD - 1)
    for _ in range(100_000):
        try:
            out.send(Header(kind=HEARTBEAT), [block], flags=zmq.NOBLOCK)
        except zmq.Again:
            if not push.poll(50, zmq.POLLOUT):  # still full a moment later: the kernel's buffers are too
                return out, pull
    raise AssertionError("the queue never filled")


def test_send_waits_for_room_until_stopped(ctx):
    out, _pull = full_pair(ctx)  # (kept: a socket collected unclosed would hold the context up)
    turns = []
    r = reactor(waiting=lambda: len(turns) < 3)
    assert r.send(out, Header(kind=HEARTBEAT), on_wait=lambda: turns.append(1)) is False
    assert len(turns) == 3                # it turned while it waited, and gave up when told to stop


def test_send_without_waiting_gives_up_at_once(ctx):
    out, _pull = full_pair(ctx)  # (kept: a socket collected unclosed would hold the context up)
    r = reactor(waiting=lambda: pytest.fail("must not wait"))
    assert r.send(out, Header(kind=HEARTBEAT), wait=False) is False


def test_send_goes_once_the_peer_reads(ctx):
    out, pull = full_pair(ctx)

    def reader_catches_up():
        while pull.poll(0):
            receive_parts(pull)
    r = reactor()
    assert r.send(out, Header(kind=HEARTBEAT, credit=7), on_wait=reader_catches_up) is True


def test_on_wait_may_fail_the_send(ctx):
    out, _pull = full_pair(ctx)  # (kept: a socket collected unclosed would hold the context up)

    def give_up():
        raise RuntimeError("nobody answered")
    with pytest.raises(RuntimeError, match="nobody answered"):
        reactor().send(out, Header(kind=HEARTBEAT), on_wait=give_up)


def test_a_socket_announced_readable_but_already_read_is_no_failure(ctx):
    # A poll's readiness can be stale when the socket is read (ZeroMQ announces input a receive does not
    # find; here the handler of a socket read first empties the other one): the turn goes on.
    push_a, pull_a = pair(ctx)
    push_b, pull_b = pair(ctx)
    seen: list = []

    def read_a_and_empty_b(msg):
        seen.append(("a", msg[0]))
        seen.append(("b-direct", pull_b.recv()))

    r = reactor()
    r.on_message(pull_a, read_a_and_empty_b)
    r.on_message(pull_b, lambda m: seen.append(("b", m[0])))
    push_b.send(b"2")
    assert pull_b.poll(2000, zmq.POLLIN)
    push_a.send(b"1")
    assert pull_a.poll(2000, zmq.POLLIN)   # both readable before the turn polls them
    r.turn()
    assert seen == [("a", b"1"), ("b-direct", b"2")]
