"""The bare stream v2 ingest loop: receive from a DCU and decode (decompress), nothing else.

The ingest benchmark's baseline: a source process that takes images from a DCU is compared with this
loop over the same messages in the same run.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import zmq

from detstream.services.sources.dectris.stream2 import End, Image, Start, Stream2Error, decode


@dataclass
class Ingested:
    """What bare_ingest() took: messages by type, decompressed pixel bytes of the images, refused
    messages by reason (stream2.REJECT_REASONS), and the seconds from the first message to the last."""
    starts: int = 0
    images: int = 0
    ends: int = 0
    pixel_bytes: int = 0
    refused: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def gb_per_s(self) -> float:
        return self.pixel_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def bare_ingest(address: str, *, ends: int | None = None, idle: float = 2.0, channel: str | None = None,
                context: zmq.Context | None = None) -> Ingested:
    """Connect a PULL socket to the DCU at `address` (e.g. tcp://dcu:31001) and receive and decode
    messages until `ends` end messages have come (with one client, the series count) or, when None
    or when several clients share the DCU, until no message came for `idle` seconds after the first.
    Images are decoded without a start message (with several clients, another may have had it); `channel`
    as decode() takes it (None: every channel; "": the first, as a dectris source decodes by default)."""
    socket = (context or zmq.Context.instance()).socket(zmq.PULL)
    socket.connect(address)
    took, first, last = Ingested(), None, 0.0
    try:
        while ends is None or took.ends < ends:
            if not socket.poll(int(idle * 1000) if first is not None else None):
                break
            message = socket.recv()
            last = time.perf_counter()
            first = last if first is None else first
            try:
                decoded = decode(message, channel=channel)
            except Stream2Error as exc:
                took.refused[exc.reason] += 1
                continue
            if isinstance(decoded, Image):
                took.images += 1
                took.pixel_bytes += sum(a.nbytes for a in decoded.data.values())
            elif isinstance(decoded, Start):
                took.starts += 1
            elif isinstance(decoded, End):
                took.ends += 1
    finally:
        socket.close(linger=0)
    took.seconds = last - first if first is not None else 0.0
    return took
