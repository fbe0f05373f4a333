"""The `dectris` source kind: images from a DECTRIS detector control unit (DCU) over SIMPLON stream v2.

Each source replica connects a PULL socket to the DCU (spec.source.dectris.address); the DCU hands
each message to one of the connected replicas, round-robin, so each gets some of the images and a
series' start and end reach one replica only. A replica passes on every image it gets as a whole
frame (all its sectors), at scan position image_id, of the scan its series maps to (arrival order, or
series_id - firstSeriesId), and ends a scan

- finally (ScanEnd final: DETECTOR_END) when it gets the series' end message, naming the series'
  image count (number_of_images when it had the start, else the scan's positions);
- for its own part when it hears of a newer series (the DCU streams one series at a time, and each
  replica gets its messages in the DCU's order, so it has passed on all it will of the older ones).

The lanes close a scan as soon as one of these rules holds (dataplane/routing.py): the
detector ended it and its frames are in, or every replica ended it; failing that, after the
end-of-scan timeout of silence (a series that never ends, a DCU restarted mid-series), the frames that
never came lost. What cannot be placed is refused and counted by reason (Refused items): anything
that is not stream v2 (stream2.REJECT_REASONS), an image whose size or pixel type is not the start's or
the detector's (`size`, `field`), of a channel that is not there (`field`), at a position outside the
scan or of a series beyond the session's scans (`range`), of a series already ended here (`ended`), an
image id this replica had already (`duplicate`), and, with one replica (which then gets every start),
an image or end of a series whose start it never got (`no-start`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import zmq

from detstream.services.model.schema import FieldError
from detstream.services.sources import Frame, Item, Refused, ScanEnd, Source, SourceError
from detstream.services.sources.dectris.stream2 import End, Image, Start, Stream2Error, decode

ADDRESS = re.compile(r"tcp://[^\s:/]+:\d{1,5}")
POLL_MS = 5  # how long a replica waits for the DCU before its stage turns (its lanes: ASSIGN, RELEASE; Stop)


class Dectris(Source):
    """Images from the DCU at spec.source.dectris.address as frames of spec.detector's shape and dtype."""

    summary = "a DECTRIS detector's control unit (SIMPLON stream v2) at spec.source.dectris.address"
    series = True

    @classmethod
    def check(cls, spec):
        problems = []
        if not ADDRESS.fullmatch(spec.source.dectris.address):
            problems.append(FieldError("spec.source.dectris.address", f"must be the DCU's tcp://HOST:PORT (port "
                                       f"31001 on a DCU); got {spec.source.dectris.address!r}"))
        if spec.detector.dtype not in ("uint8", "uint16", "uint32"):
            problems.append(FieldError("spec.detector.dtype", f"stream v2 pixels are uint8, uint16 or uint32; got "
                                       f"{spec.detector.dtype}"))
        return problems

    def __init__(self, spec, replica):
        super().__init__(spec, replica)
        settings = spec.source.dectris
        self.channel = settings.channel
        self.by_id = settings.scans == "seriesId"
        self.first_id = settings.first_series_id
        d = spec.detector
        self.shape, self.dtype = (d.rows, d.cols), np.dtype(d.dtype)
        self.strip = d.cols // d.sectors
        self.context = zmq.Context()
        self.pull = self.context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, spec.transport.high_water_mark)  # the DCU then favours the others
        self.pull.setsockopt(zmq.LINGER, 0)
        try:
            self.pull.connect(settings.address)
        except zmq.ZMQError as exc:
            raise SourceError(f"spec.source.dectris.address {settings.address}: {exc}") from None
        self.scans: dict[str, int] = {}       # series_unique_id -> scan, every series heard of
        self.starts: dict[str, Start] = {}    # series_unique_id -> its start, when this replica got it
        self.taken: dict[int, np.ndarray] = {}  # scan under way here -> image ids passed on (bool per position)
        self.ended: set[int] = set()          # scans ended here
        self.next_scan = 0                    # arrival order: the scan of the next new series

    def __iter__(self) -> Iterator[Item]:
        try:
            while len(self.ended) < self.spec.scan.count:
                if not self.pull.poll(POLL_MS):
                    yield None
                    continue
                try:
                    message = decode(self.pull.recv(), max_pixels=self.shape[0] * self.shape[1],
                                     channel=self.channel)
                except Stream2Error as exc:
                    yield Refused(exc.reason, exc.detail)
                    continue
                yield from self.take(message)
        finally:
            self.context.destroy(linger=0)

    def take(self, message: Start | Image | End) -> Iterator[Item]:
        uid = message.series_unique_id
        if isinstance(message, Start):
            problem = self.start_problem(message)
            if problem:
                yield problem
                return
            self.starts[uid] = message
        elif uid not in self.scans and self.spec.source.replicas == 1:
            kind = "image" if isinstance(message, Image) else "end"
            yield Refused("no-start", f"an {kind} message of series {message.series_id} ({uid}) whose start "
                                      f"never came (the only replica gets every start)")
            return
        scan = self.scan_of(message)
        if scan is None:
            yield Refused("range", f"series {message.series_id} ({uid}) would be scan "
                                   f"{self.scan_number(message)} of a session of {self.spec.scan.count}")
            return
        if scan in self.ended:
            yield Refused("ended", f"a {type(message).__name__.lower()} message of series {message.series_id} "
                                   f"(scan {scan}), which ended here already")
            return
        yield from self.moved_on(scan)
        if isinstance(message, Image):
            yield self.frame(scan, message)
        elif isinstance(message, End):
            yield self.end(scan, self.starts.get(uid), final=True)

    def start_problem(self, start: Start) -> Refused | None:
        if start.shape != self.shape:
            return Refused("size", f"series {start.series_id}: images of {start.shape[0]}x{start.shape[1]} pixels; "
                                   f"the session's detector has {self.shape[0]}x{self.shape[1]} (spec.detector)")
        if start.image_dtype != self.dtype:
            return Refused("field", f"series {start.series_id}: {start.image_dtype} pixels; the session's detector "
                                    f"has {self.dtype} (spec.detector.dtype)")
        if self.channel and self.channel not in start.channels:
            return Refused("field", f"series {start.series_id}: channels {list(start.channels)}, without "
                                    f"{self.channel!r} (spec.source.dectris.channel)")
        return None

    def scan_number(self, message: Start | Image | End) -> int:
        if self.by_id:
            return message.series_id - self.first_id
        return self.scans.get(message.series_unique_id, self.next_scan)

    def scan_of(self, message: Start | Image | End) -> int | None:
        """The scan of the message's series (heard of now, if it is new), or None if it is out of range."""
        uid = message.series_unique_id
        if uid in self.scans:
            return self.scans[uid]
        scan = self.scan_number(message)
        if not 0 <= scan < self.spec.scan.count:
            return None
        self.scans[uid] = scan
        self.next_scan = max(self.next_scan, scan + 1)
        return scan

    def moved_on(self, scan: int) -> Iterator[ScanEnd]:
        """The DCU streams one series at a time: a message of `scan` ends this replica's part of the others."""
        for other in [s for s in self.taken if s != scan]:
            yield self.end(other, None, final=False)
        self.taken.setdefault(scan, np.zeros(self.spec.scan.frames, bool))

    def end(self, scan: int, start: Start | None, final: bool) -> ScanEnd:
        self.ended.add(scan)
        self.taken.pop(scan, None)
        frames = self.spec.scan.frames
        return ScanEnd(scan, min(start.number_of_images, frames) if start is not None else frames, final)

    def frame(self, scan: int, image: Image) -> Frame | Refused:
        """The image as a frame at position image_id, or why it is refused."""
        start = self.starts.get(image.series_unique_id)
        frames = min(start.number_of_images, self.spec.scan.frames) if start is not None else self.spec.scan.frames
        taken = self.taken[scan]
        if image.image_id >= frames:
            return Refused("range", f"{where(image)}: the scan has {frames} positions")
        if taken[image.image_id]:
            return Refused("duplicate", f"{where(image)} again")
        pixels = next(iter(image.data.values()))   # the channel decoded (spec.source.dectris.channel)
        if pixels.shape != self.shape:
            return Refused("size", f"{where(image)}: {pixels.shape[0]}x{pixels.shape[1]} pixels, the detector has "
                                   f"{self.shape[0]}x{self.shape[1]} (spec.detector)")
        if pixels.dtype != self.dtype:
            return Refused("field", f"{where(image)}: {pixels.dtype} pixels, the detector has {self.dtype}")
        taken[image.image_id] = True
        w = self.strip
        sectors = [(0, pixels)] if w == self.shape[1] else [
            (s, np.ascontiguousarray(pixels[:, s * w:(s + 1) * w])) for s in range(self.shape[1] // w)]
        return Frame(scan, image.image_id, sectors)


def where(image: Image) -> str:
    """An image, as refusals name it (formatted only when one is refused)."""
    return f"image {image.image_id} of series {image.series_id}"
