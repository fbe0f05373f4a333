"""The data plane: multipart ZeroMQ messages `[Header, part...]`, checked on arrival.

Pixel parts travel as `zmq.Frame`s received with `copy=False` and are forwarded the same way,
so a frame's bytes are written once by the source and never copied by the stages in between;
consumers see them as numpy views. Every malformed message raises `WireError` with a short
reason that the stage counts (metric `detstream_rejected_messages_total{reason}`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import zmq

from detstream.v1 import wire_pb2
from detstream.v1.wire_pb2 import (
    ABSENT,
    ASSIGN,
    BLOCK,
    BLOCK_END,
    CALIBRATION,
    CREDIT,
    DETECTOR_END,
    DUPLICATE,
    END_OF_SCAN,
    GONE,
    HEARTBEAT,
    PARTIAL,
    PATTERN,
    PREVIEW,
    RECEIPT,
    REFERENCE,
    RELEASE,
    RESULT,
    SAMPLE,
    TAKEN,
    VOLUME,
    WANT,
    Header,
)

WIRE_VERSION = 3  # 3: a RESULT carries many frames' results
MAX_HEADER_BYTES = 4096
# ZeroMQ's flags as plain ints: an operation on pyzmq's IntFlag members (`zmq.NOBLOCK | zmq.SNDMORE`,
# `events & zmq.POLLIN`) runs Python code of the enum module, ~2-5 us each, several per message.
NOBLOCK, POLLIN, POLLOUT, _SNDMORE = int(zmq.NOBLOCK), int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.SNDMORE)
FRAME_BITS = 40  # a frame key is scan << 40 | frame: 10^12 frames per scan, 2^24 scans

__all__ = ["ABSENT", "ASSIGN", "BLOCK", "BLOCK_END", "CALIBRATION", "CREDIT", "DETECTOR_END", "DUPLICATE",
           "END_OF_SCAN", "GONE", "HEARTBEAT", "PARTIAL", "PATTERN", "PREVIEW", "RECEIPT", "REFERENCE", "RELEASE",
           "RESULT", "SAMPLE", "TAKEN", "VOLUME", "WANT",
           "Header", "WireError", "REJECT_REASONS", "Geometry", "Message", "Outbox", "frame_key", "is_tcp_address",
           "decode", "results", "receive_parts", "Gaps", "FRAME_BITS", "pack_frames", "unpack_frames", "NOBLOCK",
           "POLLIN", "POLLOUT"]


# Every reason a stage rejects a message for: the values of the `reason` label of
# detstream_rejected_messages_total. Each series is exported from the start at 0, so that the first
# rejection is an increase that rate() sees.
REJECT_REASONS = (
    # decode(): the message breaks the contract
    "empty", "header", "version", "kind", "parts", "range", "geometry", "size",
    # well-formed, but the stage cannot take it (Stage.refuse)
    "late", "misrouted", "duplicate-sector", "result", "lost",
    # a worker's CREDIT, or a lane's ASSIGN, naming no valid `data` address (tcp://HOST:PORT) or CURVE key
    "address",
    # from a detector (a DECTRIS DCU, at a source of kind dectris): not stream v2 (stream2.REJECT_REASONS:
    # cbor, not-map, type, field, compression; and size), or a message the session cannot place: an image
    # before its series' start (one source replica), of a series already ended; an image the detector
    # sent twice (also at the worker: a whole frame again)
    "cbor", "not-map", "type", "field", "compression", "no-start", "ended", "duplicate",
    # not a data message: a failed ZeroMQ handshake (without CURVE / with a wrong key), a bad
    # request to the metrics endpoint, a refused control call
    "handshake", "auth", "http", "control",
)


class WireError(ValueError):
    """A message that breaks the contract; `reason` (one of REJECT_REASONS) labels the metric."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


TCP_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})")


def is_tcp_address(text: str) -> bool:
    """Whether `text` is a ZeroMQ TCP endpoint a socket may connect to: tcp://HOST:PORT, PORT 1 to 65535."""
    match = TCP_ADDRESS.fullmatch(text)
    return match is not None and 0 < int(match.group(2)) < 65536


def frame_key(scan: int, frame: int) -> int:
    return scan << FRAME_BITS | frame


@dataclass(frozen=True)
class Geometry:
    """What a valid pixel message of this session looks like."""
    rows: int
    cols: int
    sectors: int
    dtype: str
    scan_frames: int
    scans: int | None = None  # scans in the session: a message of a later scan is out of range
    block_frames: int = 1     # frames per block (spec.transport.blockFrames)

    @classmethod
    def of(cls, spec) -> Geometry:
        d = spec.detector
        return cls(d.rows, d.cols, d.sectors, np.dtype(d.dtype).str, spec.scan.frames, spec.scan.count,
                   spec.transport.block_frames)

    @cached_property
    def sector_shape(self) -> tuple[int, int]:
        return self.rows, self.cols // self.sectors

    @cached_property
    def sector_shape_list(self) -> list[int]:
        return list(self.sector_shape)  # (what a header's repeated field compares with the cheapest)

    @cached_property
    def max_scan(self) -> int:
        """The first scan number out of range: past the session's scans, or past what a frame key holds."""
        return min(self.scans if self.scans is not None else 1 << 64, 1 << (64 - FRAME_BITS))

    @cached_property
    def sector_bytes(self) -> int:
        return self.rows * (self.cols // self.sectors) * np.dtype(self.dtype).itemsize

    @cached_property
    def frame_bytes(self) -> int:
        """The pixels of a whole frame, in bytes."""
        return self.sectors * self.sector_bytes

    def is_frame(self, parts: Sequence) -> bool:
        """Whether payload parts (buffers) are a whole frame: `sectors` parts of sector_bytes each."""
        return len(parts) == self.sectors and all(memoryview(p).nbytes == self.sector_bytes for p in parts)

    def frame(self, parts: Sequence) -> np.ndarray:
        """A frame's sector buffers (as `is_frame` accepts them) joined left to right: (rows, cols) of dtype;
        a view of the buffer when there is one sector, else a copy."""
        strips = [np.frombuffer(p, self.dtype).reshape(self.sector_shape) for p in parts]
        return strips[0] if len(strips) == 1 else np.hstack(strips)


@dataclass
class Message:
    header: Header
    parts: Sequence[zmq.Frame]

    @property
    def payload_bytes(self) -> int:
        return sum(len(p) for p in self.parts)

    @cached_property
    def sectors(self) -> list[np.ndarray]:
        """The pixel parts as read-only numpy views (no copy)."""
        shape = tuple(self.header.shape)
        return [np.frombuffer(p.buffer, dtype=self.header.dtype).reshape(shape) for p in self.parts]


_PARTS = {ABSENT: 0, CREDIT: 0, HEARTBEAT: 0, RECEIPT: 0, CALIBRATION: 1, WANT: 0, ASSIGN: 0, RELEASE: 0, TAKEN: 0,
          PATTERN: 3, VOLUME: 2, PREVIEW: 2, GONE: 0}
MAX_CALIBRATION_BYTES = 65536
_KINDS = frozenset(wire_pb2.Kind.values()) - {wire_pb2.KIND_UNSPECIFIED}  # Kind.values() builds a list per call


def decode(raw: Sequence[zmq.Frame], geometry: Geometry | None = None) -> Message:
    """Parse and check a received multipart message; raise WireError if it breaks the contract."""
    if not raw:
        raise WireError("empty", "no parts")
    first = raw[0]
    if len(first) > MAX_HEADER_BYTES:
        raise WireError("header", f"header of {len(first)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = Header.FromString(first.bytes if isinstance(first, zmq.Frame) else first)
    except Exception as exc:  # protobuf raises DecodeError and, for some garbage, others
        raise WireError("header", f"undecodable header ({type(exc).__name__})") from None
    if header.version != WIRE_VERSION:
        raise WireError("version", f"wire version {header.version}, this stage speaks {WIRE_VERSION}")
    kind = header.kind
    parts = raw[1:]
    if geometry is not None and kind in (BLOCK, SAMPLE, REFERENCE):  # the messages with pixels: first
        _check_block(header, parts, geometry)
        return Message(header, parts)
    if kind not in _KINDS:
        raise WireError("kind", f"unknown message kind {kind}")
    expected_parts = _PARTS.get(kind)
    if expected_parts is not None and len(parts) != expected_parts:
        raise _wrong_parts(kind, parts, expected_parts)
    if kind == RESULT:
        _check_results(header, parts, geometry)
    if kind == CALIBRATION and len(parts[0]) > MAX_CALIBRATION_BYTES:
        raise WireError("size", f"CALIBRATION of {len(parts[0])} bytes exceeds {MAX_CALIBRATION_BYTES}")
    if kind == END_OF_SCAN:
        _check_lost_frames(header, parts, geometry)
    if kind in (VOLUME, PREVIEW):
        _check_volume(header, parts)
    if geometry is not None and geometry.scans is not None and kind in (RESULT, END_OF_SCAN, VOLUME, PREVIEW) \
            and header.scan >= geometry.scans:
        raise WireError("range", f"scan {header.scan} of a session of {geometry.scans} scans")
    return Message(header, parts)


def _wrong_parts(kind: int, parts: Sequence, expected: int) -> WireError:
    return WireError("parts", f"{wire_pb2.Kind.Name(kind)} with {len(parts)} parts, expected {expected}")


def _check_block(header: Header, parts: Sequence[zmq.Frame], g: Geometry) -> None:
    """A BLOCK (or SAMPLE, REFERENCE): parts = its frames x its sectors, each a sector of the session's; every
    frame in the block."""
    frames, sectors = header.frames, header.sectors
    if len(parts) != len(frames) * len(sectors):
        raise WireError("parts", f"BLOCK of {len(frames)} frames x {len(sectors)} sectors with {len(parts)} parts")
    if header.shape != g.sector_shape_list or header.dtype != g.dtype:
        raise WireError("geometry", f"shape {tuple(header.shape)} {header.dtype!r}, session has "
                                    f"{g.sector_shape} {g.dtype!r}")
    size = g.sector_bytes
    for part in parts:
        if len(part) != size:
            raise WireError("size", f"payload of {len(part)} bytes, expected {size}")
    first = header.block * g.block_frames
    if any(not first <= f < min(first + g.block_frames, g.scan_frames) for f in frames):
        raise WireError("range", f"frames {list(frames)[:8]} outside block {header.block} of a scan of "
                                 f"{g.scan_frames} frames in blocks of {g.block_frames}")
    if any(s >= g.sectors for s in sectors) or len(set(sectors)) != len(sectors):
        raise WireError("range", f"sectors {list(sectors)} of a {g.sectors}-sector detector")
    if header.scan >= g.max_scan:
        raise WireError("range", f"scan number {header.scan} out of range")


def _check_volume(header: Header, parts: Sequence[zmq.Frame]) -> None:
    """A VOLUME or PREVIEW: float32 slices of its 3-d `shape` (the writer's sink or live view checks the shape and
    the bitmap against the band)."""
    shape, name = list(header.shape), wire_pb2.Kind.Name(header.kind)
    if len(shape) != 3 or header.dtype != np.dtype(np.float32).str:
        raise WireError("geometry", f"{name} of shape {shape} {header.dtype!r}, expected (slices, cols, cols) <f4")
    if len(parts[0]) != 4 * shape[0] * shape[1] * shape[2]:
        raise WireError("size", f"{name} slices of {len(parts[0])} bytes, its shape {shape} makes "
                                f"{4 * shape[0] * shape[1] * shape[2]}")


def _check_results(header: Header, parts: Sequence[zmq.Frame], g: Geometry | None) -> None:
    """A RESULT: per frame a sector mask and a count of its parts (at least one), the counts adding up to the
    parts; frames in the scan."""
    frames, counts = header.frames, header.part_counts
    if not frames or len(header.sector_masks) != len(frames) or len(counts) != len(frames):
        raise WireError("parts", f"RESULT of {len(frames)} frames with {len(header.sector_masks)} sector masks and "
                                 f"{len(counts)} part counts")
    if sum(counts) != len(parts) or 0 in counts:
        raise WireError("parts", f"RESULT with {len(parts)} parts, its frames count {list(counts)[:8]}")
    if g is not None and max(frames) >= g.scan_frames:
        raise WireError("range", f"frame {max(frames)} of a scan of {g.scan_frames} frames")


def results(header: Header, parts: Sequence) -> list[tuple[int, int, Sequence]]:
    """A RESULT's (frame, sector mask, the frame's result parts), frame by frame (as `decode` checked it)."""
    out, start = [], 0
    for frame, mask, count in zip(header.frames, header.sector_masks, header.part_counts):
        out.append((frame, mask, parts[start:start + count]))
        start += count
    return out


def _check_lost_frames(header: Header, parts: Sequence[zmq.Frame], g: Geometry | None) -> None:
    if len(parts) > (1 if header.lost else 0):
        raise WireError("parts", f"END_OF_SCAN with {len(parts)} parts: at most the bitmap of its lost frames")
    if parts and g is not None and len(parts[0]) != bitmap_bytes(g.scan_frames):
        raise WireError("size", f"lost-frame bitmap of {len(parts[0])} bytes, expected {bitmap_bytes(g.scan_frames)}")


def bitmap_bytes(frames: int) -> int:
    return (frames + 7) // 8


def pack_frames(frames: np.ndarray) -> bytes:
    """A boolean array over a scan's frames as a bitmap (what END_OF_SCAN carries as its lost frames)."""
    return np.packbits(frames).tobytes()


def unpack_frames(bitmap, frames: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bitmap, np.uint8), count=frames).astype(bool)


def receive_parts(sock: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """The parts of one message, without copying them (what `recv_multipart(copy=False)` does, at a
    third of its cost: the rest of a multipart message is there once its first part is)."""
    part = sock.recv(flags, copy=False)
    parts = [part]
    while part.more:
        part = sock.recv(copy=False)
        parts.append(part)
    return parts


class Outbox:
    """A sending socket that stamps version, sender and a per-peer sequence number."""

    def __init__(self, socket: zmq.Socket, sender: str):
        self.socket = socket
        self.sender = sender
        self._seq: dict[bytes | None, int] = {}  # per ROUTER peer; None for a socket with one peer

    def send(self, header: Header, parts: Sequence = (), peer: bytes | None = None, flags: int = 0) -> None:
        seq = self._seq.get(peer, 0) + 1
        header.version = WIRE_VERSION
        header.sender = self.sender
        header.seq = seq
        # Part by part (as send_multipart, at a fraction of its cost): only the first part can be refused
        # (queue full, peer gone); ZeroMQ then takes the rest of the message whole.
        flags = int(flags)  # an IntFlag argument would make each `|` below cost microseconds
        sock, more = self.socket, flags | _SNDMORE
        if peer is not None:
            sock.send(peer, more)
        if parts:
            sock.send(header.SerializeToString(), more)
            last = len(parts) - 1
            for i, part in enumerate(parts):
                sock.send(part, more if i < last else flags, copy=False)
        else:
            sock.send(header.SerializeToString(), flags)
        self._seq[peer] = seq  # not before: a send refused (queue full, NOBLOCK) would leave a false gap

    def forget(self, peer: bytes) -> None:
        self._seq.pop(peer, None)


class Gaps:
    """Sequence numbers seen per sender: a jump is a gap (messages that never arrived)."""

    def __init__(self):
        self._last: dict[str, int] = {}
        self.total = 0

    def see(self, header: Header) -> int:
        last = self._last.get(header.sender)
        self._last[header.sender] = header.seq
        gap = header.seq - last - 1 if last is not None and header.seq > last else 0
        self.total += gap
        return gap
