"""`detstream dcu`: a DECTRIS detector control unit (DCU) stand-in that serves SIMPLON stream v2.

As a DCU does (stream_v2/README.md): a ZeroMQ PUSH socket bound on TCP port 31001 sends each series
as a start message, one image message per exposure and an end message, one CBOR message per ZeroMQ
message; PUSH hands each message to one connected PULL client, round-robin. The images come from
recorded stream v2 message files (a folder of *.cbor, one message a file, as DECTRIS publishes test
data; their compressed bytes are sent as recorded unless --compression asks otherwise) or from the
4D Camera simulator (frames bitshuffle+LZ4 compressed as a DCU does). Each series gets its own
series_id (1, 2, ...) and series_unique_id; image_id counts from 0 in each series. For tests, demos
and facilities without a detector at hand (LiberTEM-live ships simulators for the same reason).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cbor2
import zmq
from zmq.utils.monitor import recv_monitor_message

from detstream.services.sources.dectris.stream2 import (
    ALGORITHMS,
    PIXEL_DTYPES,
    Image,
    Start,
    Stream2Error,
    array_tag,
    decode,
    encode,
)

PORT = 31001
TIME_BASE = 50_000_000      # Hz: the rationals' denominator, as an EIGER2 sends them
LINGER_S = 30               # at exit, how long undelivered messages may still wait for a slow client
BANK = 16                   # distinct simulated frames, cycled (compressing each frame would cap the rate)
# --garbage: not stream v2, each refused for another reason (cbor, not-map, type, field)
GARBAGE = (b"\xff\x00 not CBOR", cbor2.dumps([1, 2, 3]), cbor2.dumps({"type": "hello"}),
           cbor2.dumps({"type": "image", "series_id": "one"}))


def add_command(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("dcu", help="serve DECTRIS SIMPLON stream v2 as a detector control unit does "
                                     "(from recorded messages or the simulator)", description=__doc__)
    cmd.add_argument("--messages", type=Path, metavar="FOLDER",
                     help="recorded stream v2 messages (*.cbor, one message a file, in name order); "
                          "default: the simulator")
    cmd.add_argument("--shape", default="576x576", metavar="ROWSxCOLS", help="simulator frame size (default 576x576)")
    cmd.add_argument("--dtype", default="uint16", choices=PIXEL_DTYPES, help="simulator pixel type (default uint16)")
    cmd.add_argument("--seed", type=int, default=0, help="simulator seed (default 0)")
    cmd.add_argument("--series", type=positive, default=1, help="series to send, one after the other (default 1)")
    cmd.add_argument("--images", type=positive,
                     help="images per series (default: the recorded images, cycled beyond them; 100 simulated)")
    cmd.add_argument("--rate", type=float, default=0.0,
                     help="images per second (default 0: as fast as the clients take them)")
    cmd.add_argument("--bind", default=f"tcp://*:{PORT}",
                     help=f"ZeroMQ address of the PUSH socket (default tcp://*:{PORT}; tcp://127.0.0.1:* picks a port)")
    cmd.add_argument("--compression", choices=(*ALGORITHMS, "none"),
                     help="pixel compression (default: as recorded; bslz4 for the simulator)")
    cmd.add_argument("--wait-clients", type=int, default=1, metavar="N",
                     help="wait for N connected clients before the first series (default 1; 0: do not wait)")
    cmd.add_argument("--wait-timeout", type=float, default=0.0, metavar="SECONDS",
                     help="give up when the clients have not connected by then (default 0: wait for ever)")
    cmd.add_argument("--user-data", type=json_value, metavar="JSON",
                     help="the start message's user_data (as SIMPLON's header_appendix), e.g. '{\"scan\": [8, 8]}'")
    cmd.add_argument("--skip", type=image_ids, default=frozenset(), metavar="IDS",
                     help="image ids not sent in any series (comma-separated, e.g. 3,17), as if they were lost")
    cmd.add_argument("--duplicate", type=image_ids, default=frozenset(), metavar="IDS",
                     help="image ids sent twice in every series (comma-separated)")
    cmd.add_argument("--garbage", type=int, default=0, metavar="N",
                     help="N messages that are not stream v2 before each series (for tests of a client)")
    cmd.set_defaults(run=run)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive integer")
    return value


def image_ids(text: str) -> frozenset[int]:
    try:
        ids = frozenset(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected image ids separated by commas, e.g. 3,17") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r}: image ids are >= 0")
    return ids


def json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({exc})") from None


@dataclass
class Source:
    """What a series is made of: the start message's fields without the series' ids and image count,
    and the data of image i (channel -> array_tag) with its other fields."""
    start: dict[str, Any]
    image: Callable[[int], dict[str, Any]]
    images: int
    describe: str


def run(args: argparse.Namespace) -> int:
    try:
        source = recorded(args) if args.messages else simulated(args)
    except (OSError, ValueError) as exc:
        print(f"detstream dcu: {exc}", file=sys.stderr)
        return 2
    if args.user_data is not None:
        source.start["user_data"] = args.user_data
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    monitor = push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    linger = int(LINGER_S * 1000)    # Ctrl-C: 0, nothing waits
    try:
        push.bind(args.bind)
        address = push.getsockopt_string(zmq.LAST_ENDPOINT)
        print(f"dcu: serving SIMPLON stream v2 on {address} ({source.describe})", flush=True)
        if not wait_for_clients(monitor, args.wait_clients, args.wait_timeout):
            print(f"detstream dcu: fewer than {args.wait_clients} clients connected within {args.wait_timeout} s",
                  file=sys.stderr)
            return 1
        total, images = serve(push, source, args)
        print(f"dcu: sent {args.series} series, {images} images, {total / 1e6:.1f} MB",
              flush=True)
        return 0
    except zmq.ZMQError as exc:
        print(f"detstream dcu: cannot serve on {args.bind}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        linger = 0
        return 130
    finally:
        monitor.close(linger=0)
        push.close(linger=linger)
        context.term()


def wait_for_clients(monitor: zmq.Socket, wanted: int, timeout: float) -> bool:
    """Wait until `wanted` PULL clients are connected (completed ZMTP handshakes less disconnections)."""
    connected, deadline = 0, time.monotonic() + timeout if timeout > 0 else None
    while connected < wanted:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not monitor.poll(None if wait is None else int(wait * 1000)):
            return False
        event = recv_monitor_message(monitor)["event"]
        connected += 1 if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else -1
    if wanted:
        print(f"dcu: {connected} client{'s' if connected > 1 else ''} connected", flush=True)
    return True


def serve(push: zmq.Socket, source: Source, args: argparse.Namespace) -> tuple[int, int]:
    """Send every series; returns the bytes and the image messages sent. Images are paced at `args.rate`
    per second over the run; the --skip ids are not sent, the --duplicate ids twice, and --garbage
    messages go before each series."""
    sent, count, began = 0, 0, time.monotonic()   # count: image messages sent
    for series_id in range(1, args.series + 1):
        for n in range(args.garbage):
            push.send(GARBAGE[n % len(GARBAGE)])
        ids = {"series_id": series_id, "series_unique_id": uuid.uuid4().hex}
        series_date, series_start, series_first = datetime.now(timezone.utc), time.monotonic(), count
        series_bytes = push_message(push, {"type": "start", **source.start, **ids, "arm_date": series_date,
                                           "number_of_images": source.images})
        for image_id in range(source.images):
            if image_id in args.skip:
                continue
            if args.rate > 0:
                time.sleep(max(0.0, began + count / args.rate - time.monotonic()))
            for _ in range(2 if image_id in args.duplicate else 1):
                series_bytes += push_message(push, {"type": "image", "series_date": series_date,
                                                    **source.image(image_id), **ids, "image_id": image_id})
                count += 1
        series_bytes += push_message(push, {"type": "end", **ids})
        seconds = time.monotonic() - series_start
        images = count - series_first
        print(f"dcu: series {series_id} ({ids['series_unique_id']}): start, {images} images, end; "
              f"{series_bytes / 1e6:.1f} MB in {seconds:.2f} s ({images / max(seconds, 1e-9):.0f} images/s)",
              flush=True)
        sent += series_bytes
    return sent, count


def push_message(push: zmq.Socket, message: dict[str, Any]) -> int:
    data = encode(message)
    push.send(data, copy=False)
    return len(data)


def recorded(args: argparse.Namespace) -> Source:
    """Images (and a start message, if there is one) from a folder of recorded messages; a start message
    is built from the first image when the folder has none."""
    if not args.messages.is_dir():
        raise ValueError(f"--messages {args.messages}: not a folder")
    files = sorted(args.messages.glob("*.cbor"))
    decoded, raw = [], []
    for file in files:
        message = file.read_bytes()
        try:
            decoded.append(decode(message))
        except Stream2Error as exc:
            raise ValueError(f"{file} is not a stream v2 message: {exc}") from None
        raw.append(cbor2.loads(message))      # tags kept: the compressed bytes are sent as recorded
    images = [(d, r) for d, r in zip(decoded, raw) if isinstance(d, Image)]
    if not images:
        raise ValueError(f"{args.messages} holds no stream v2 image message (*.cbor)")
    starts = [r for d, r in zip(decoded, raw) if isinstance(d, Start)]
    first = images[0][0]
    pixels = next(iter(first.data.values()))
    start = dict(starts[0]) if starts else {
        "channels": list(first.data), "image_size_x": pixels.shape[1], "image_size_y": pixels.shape[0],
        "image_dtype": pixels.dtype.name, "detector_description": f"detstream dcu: {args.messages.name}"}
    compression = None if args.compression == "none" else args.compression

    def image(i: int) -> dict[str, Any]:
        decoded_image, raw_image = images[i % len(images)]
        fields = {k: v for k, v in raw_image.items() if k not in ("type", "series_date")}
        if args.compression is not None:
            fields["data"] = {c: array_tag(a, compression) for c, a in decoded_image.data.items()}
        return fields

    how = args.compression or "as recorded"
    return Source(start, image, args.images or len(images),
                  f"{len(images)} recorded images of {args.messages}, {len(first.data)} channels "
                  f"{pixels.shape[0]}x{pixels.shape[1]} {pixels.dtype}, {how}")


def simulated(args: argparse.Namespace) -> Source:
    """Frames of the 4D Camera simulator (scan 0; BANK distinct frames, cycled), one channel."""
    from detstream.services.model.session import Detector
    from detstream.services.model.session import Simulator as Settings
    from detstream.services.sources.simulator import Simulator

    try:
        rows, cols = (int(n) for n in args.shape.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shape {args.shape!r}: expected ROWSxCOLS, e.g. 576x576") from None
    if not (0 < rows <= 65536 and 0 < cols <= 65536):
        raise ValueError(f"--shape {args.shape!r}: rows and columns from 1 to 65536")
    images = args.images or 100
    simulator = Simulator(Settings(seed=args.seed, distinct_frames=min(images, BANK)),
                          Detector(rows=rows, cols=cols, sectors=1, dtype=args.dtype))
    compression = {None: "bslz4", "none": None}.get(args.compression, args.compression)
    bank = [array_tag(simulator.frame(0, i), compression) for i in range(min(images, BANK))]
    frame_ticks = round(TIME_BASE / args.rate) if args.rate > 0 else TIME_BASE // 1000

    def image(i: int) -> dict[str, Any]:
        return {"data": {"threshold_1": bank[i % len(bank)]}, "real_time": [frame_ticks, TIME_BASE],
                "start_time": [i * frame_ticks, TIME_BASE], "stop_time": [(i + 1) * frame_ticks, TIME_BASE]}

    start = {"channels": ["threshold_1"], "image_size_x": cols, "image_size_y": rows, "image_dtype": args.dtype,
             "count_time": frame_ticks / TIME_BASE, "frame_time": frame_ticks / TIME_BASE,
             "detector_description": "detstream dcu: 4D Camera simulator"}
    return Source(start, image, images,
                  f"simulator, 1 channel {rows}x{cols} {args.dtype}, {compression or 'uncompressed'}")

