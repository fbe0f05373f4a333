"""The distributor's ledger of one lane: workers' credits, frames in flight, scans finished. No sockets, no clock.

A worker offers credits; a frame goes to a worker only against one of its credits and stays in flight
with that worker (its message kept, no copy) until the writer's receipt acknowledges it, which gives
the credit back. A worker declared dead (silent, or gone) leaves its frames to be re-sent, flagged
DUPLICATE, before any new frame. A scan of the lane is finished once its end has come from the
aggregator and none of its frames is in flight; its lost frames are then those of the lane never
acknowledged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from detstream.services.dataplane.scans import Scan, ScanBook
from detstream.services.dataplane.wire import DUPLICATE, Header, Message, frame_key


@dataclass(eq=False)
class Worker:
    """A worker as the distributor knows it, by its ROUTER peer id."""
    peer: bytes
    last_seen: float                  # when it last spoke (seconds, the stage's clock)
    credit: int = 0
    full: bool = False                # its queue refused a frame: none more until it next speaks
    in_flight: dict[int, Message] = field(default_factory=dict)   # frame_key -> the frame it holds
    samples_sent: int = 0             # of the distributor's sample frames, in their order

    @property
    def listed(self) -> bool:
        """Whether it is among the ready peers."""
        return self.credit > 0 and not self.full


class CreditLedger:
    """Credits and frames in flight of lane `lane` of `lanes` (frame % lanes == lane) in scans of rows x
    cols positions; `max_credit`: the most credits a worker may hold (spec.workers.credits), so a confused
    or hostile peer cannot hoard frames.

    The stage sends: it asks `next_ready()` for a worker to send a frame to, and tells the ledger how
    that went (`sent`, `refused_full`, or `dead`); a frame nobody can take goes to `wait`.
    """

    def __init__(self, lane: int, lanes: int, rows: int, cols: int, max_credit: int):
        self.rows, self.cols = rows, cols
        self.lane_frames = np.arange(rows * cols) % lanes == lane
        self.max_credit = max_credit
        self.workers: dict[bytes, Worker] = {}
        self.holder: dict[int, Worker] = {}     # frame key -> the worker it is in flight with
        self.ready: deque[bytes] = deque()      # peers with credit, round-robin
        self.resend: deque[Message] = deque()   # frames to send before new ones (of dead workers)
        self.book = ScanBook(Scan)
        self.scans = self.book.open

    # workers

    def heard(self, peer: bytes, credit: int, now: float) -> tuple[Worker, bool]:
        """A worker spoke (CREDIT or HEARTBEAT) offering `credit` more: it reads, so its queue has room
        again. Returns it, and whether it is new."""
        worker = self.workers.get(peer)
        new = worker is None
        if worker is None:
            worker = self.workers[peer] = Worker(peer, now)
        worker.last_seen = now
        self.give_credit(worker, credit, room=True)
        return worker, new

    def give_credit(self, worker: Worker, credit: int, room: bool = False) -> None:
        listed = worker.listed
        if room:
            worker.full = False
        worker.credit = min(worker.credit + credit, self.max_credit)
        if worker.listed and not listed:
            self.ready.append(worker.peer)

    def next_ready(self) -> Worker | None:
        """The worker whose turn it is to take a frame, or None when no worker has credit."""
        ready = self.ready
        while ready:
            worker = self.workers.get(ready[0])
            if worker is not None and worker.credit > 0:
                return worker
            ready.popleft()
        return None

    def sent(self, worker: Worker, msg: Message) -> None:
        """`msg` went to `worker` (the one next_ready gave): a credit spent, the frame in flight with it."""
        worker.credit -= 1
        key = frame_key(msg.header.scan, msg.header.frame)
        worker.in_flight[key] = msg
        self.holder[key] = worker
        self.ready.rotate(-1) if worker.credit else self.ready.popleft()

    def refused_full(self, worker: Worker) -> None:
        """`worker`'s queue is full: no frame for it until it next speaks."""
        worker.full = True
        self.ready.popleft()

    def wait(self, msg: Message) -> None:
        """Nobody can take `msg` now: first in line when credit comes."""
        self.resend.appendleft(msg)

    def dead(self, worker: Worker) -> int:
        """Forget `worker`: its frames in flight go to be re-sent, flagged DUPLICATE. Returns how many."""
        del self.workers[worker.peer]
        for key, msg in worker.in_flight.items():
            del self.holder[key]
            msg.header.flags |= DUPLICATE
            self.resend.append(msg)
        return len(worker.in_flight)

    def silent(self, now: float, timeout: float) -> list[Worker]:
        """The workers not heard from for longer than `timeout` seconds."""
        return [w for w in self.workers.values() if now - w.last_seen > timeout]

    # frames and scans

    def take(self, header: Header) -> bool:
        """A FRAME from the aggregator, of a scan not finished: False if it is done or in flight already,
        else True (it counts in flight from now on: send it, or `wait` it)."""
        scan = self.scan(header.scan)
        if scan.done[header.frame] or frame_key(header.scan, header.frame) in self.holder:
            return False
        scan.in_flight += 1
        return True

    def end(self, header: Header) -> None:
        """The aggregator's END_OF_SCAN (of a scan not finished)."""
        self.scan(header.scan).ended(header.sender, header)

    def scan(self, number: int) -> Scan:
        return self.book.start(number, self.rows, self.cols, 0.0)  # (no clock here: unused)

    def acknowledge(self, key: int) -> None:
        """The writer has the result of frame `key`: done, and its credit back to the worker that held it
        (a key not in flight, done already or waiting to be re-sent, changes nothing)."""
        worker = self.holder.pop(key, None)
        if worker is None:
            return
        msg = worker.in_flight.pop(key)
        if worker.peer in self.workers:
            self.give_credit(worker, 1)
        scan = self.scans.get(msg.header.scan)
        frame = msg.header.frame
        if scan is None or scan.done[frame]:
            return  # acknowledged already (the result of an earlier copy)
        scan.done[frame] = True
        scan.count += 1
        scan.in_flight -= 1

    def finished(self) -> Iterator[tuple[Scan, np.ndarray]]:
        """Close and yield each scan ended with nothing in flight, with its lost frames (bool per frame:
        the lane's frames never acknowledged). Its end is `scan.last_end`."""
        for number, scan in list(self.scans.items()):
            if scan.ends and scan.in_flight == 0:
                self.book.close(number)
                yield scan, self.lane_frames & ~scan.done

    @property
    def closed(self):
        """The scans finished in this lane (ClosedScans)."""
        return self.book.closed
