"""The aggregator's reassembly of one lane: sectors into frames, frames into scans. No sockets, no clock.

A frame is passed on once all its sectors are in; a frame whose sectors do not all arrive within the
frame timeout, or by the close of its scan, is passed on with the missing sectors filled and named.
A scan closes when every source has ended it, when it has had no input for the end-of-scan timeout,
or on drain; the frames of the lane it never passed on are its lost ones.

Scans are streamed back to back, so a scan nobody ever started is closed too: when no scan is open
and nothing has arrived for the end-of-scan timeout since the last activity (the last input, or the
close of the previous scan), the next scan of the session is closed with all its frames lost, and so
on, one timeout per scan, until the session's scan count is reached. The first scan waits for the
sources as long as it takes (a session is started before its detector). A scan below an open one that
never came here (this aggregator started mid-session) is closed the same way, one timeout after it is
noticed. Sectors of closed scans are refused as `late`.

With a detector that streams series (`series=True`: a DECTRIS DCU, which hands each image whole to one
of several source replicas, and a series' start and end to one of them only), a frame is whole from
whichever source it came; the source that heard the detector end a series sends a DETECTOR_END, naming
how many frames the series has: the scan closes as soon as every frame of the lane below that count is
in (or, as before, once every source has ended it, or after the end-of-scan timeout of silence, the
rest lost). A frame that comes again while its scan is open is the detector's duplicate, refused as
`duplicate`. Scans start when the detector starts a series, however long after the previous one: no
scan is closed as never started while none is open (one below an open scan is, one timeout after it is
noticed: the detector went on without it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from detstream.services.dataplane.scans import Scan, ScanBook

Refusal = tuple[str, str]   # (reason as the stage counts it, detail for the log)


class Reassembly:
    """The state of one lane's aggregator. Every call is given `now` (seconds on the stage's clock, which
    need not be wall time) and hands what goes on to two callbacks:

    - on_frame(scan: Scan, frame: int, parts: list, missing: list[int] | (), mask: int): a frame to pass
      on; parts are the `sectors` parts in sector order, `fill` where one is missing; mask has bit i set
      for each sector i that arrived.
    - on_close(scan: Scan, lost: int, why: str): a scan closed; lost = the lane's frames of it never
      passed on. Its frames still waiting have gone to on_frame before.

    `lane` of `lanes` takes the frames with frame % lanes == lane; a scan is rows x cols positions
    (= frames), unless a message names its own geometry (which must have as many frames). `series`: the
    scans are a detector's series (see the module's docstring).
    """

    def __init__(self, lane: int, lanes: int, sectors: int, rows: int, cols: int, sources: int, fill: Any,
                 on_frame: Callable, on_close: Callable, series: bool = False):
        self.lane, self.lanes, self.sectors, self.sources, self.fill = lane, lanes, sectors, sources, fill
        self.series = series
        self.rows, self.cols, self.frames = rows, cols, rows * cols
        self.lane_frames = len(range(lane, self.frames, lanes))
        self.all_sectors = (1 << sectors) - 1
        self.on_frame, self.on_close = on_frame, on_close
        self.book = ScanBook(Scan)
        self.scans = self.book.open
        self.pending: dict[tuple[int, int], tuple[list, float, list]] = {}  # parts, first arrival, [parts in]
        self.last_activity: float | None = None  # None until the first input: the first scan waits for ever
        self.skipped: tuple[int, float] | None = None  # a scan below an open one, never seen here; since when

    def sector(self, number: int, frame: int, sector: int, part: Any, rows: int, cols: int,
               now: float) -> Refusal | None:
        """Take sector `sector` (its buffer `part`) of frame `frame` of scan `number` (rows x cols, 0: the
        session's). None if taken, else why not: late, misrouted, geometry, duplicate-sector, or (series)
        duplicate."""
        scan = self.scans.get(number)
        if scan is None or (rows or self.rows) * (cols or self.cols) != self.frames:
            admitted = self.admit(number, rows, cols, now)
            if isinstance(admitted, tuple):
                return admitted
            scan = admitted
        scan.last_input = self.last_activity = now
        emitted = scan.done[frame]
        if frame % self.lanes != self.lane:
            return "misrouted", ""
        if emitted:
            return ("duplicate", f"frame {frame} again") if self.series else ("late", "")
        key = (number, frame)
        entry = self.pending.get(key)
        if entry is None:
            entry = self.pending[key] = ([None] * self.sectors, now, [0])
        parts, _, have = entry
        if parts[sector] is not None:
            return ("duplicate" if self.series else "duplicate-sector"), f"sector {sector} again"
        parts[sector] = part
        have[0] += 1
        if have[0] == self.sectors:
            self.emit(key, parts)
            if scan.images is not None:
                self.close_if_complete(scan, now)
        return None

    def end(self, number: int, sender: str, rows: int, cols: int, now: float,
            images: int | None = None) -> Refusal | None:
        """A source's END_OF_SCAN: the scan closes once every source has ended it. `images`: the
        detector ended the scan (DETECTOR_END), which has that many frames; it closes as soon as they
        are in."""
        scan = self.admit(number, rows, cols, now)
        if isinstance(scan, tuple):
            return scan
        scan.last_input = self.last_activity = now
        scan.ended(sender, True)
        if len(scan.ends) >= self.sources:
            self.close(number, "end of scan", now)
        elif images is not None:
            if scan.images is None:   # the detector's first word on it stands
                scan.images = min(images, self.frames)
            self.close_if_complete(scan, now)
        return None

    def close_if_complete(self, scan: Scan, now: float) -> None:
        """Close a scan the detector ended once every frame of the lane below its count is passed on."""
        images = scan.images if scan.images is not None else self.frames
        if scan.count >= len(range(self.lane, images, self.lanes)) and scan.done[self.lane:images:self.lanes].all():
            self.close(scan.number, f"the detector ended it: its {images} frames are in", now)

    def admit(self, number: int, rows: int, cols: int, now: float) -> Scan | Refusal:
        """The scan of a message: open already, or opened now; or why the message is refused."""
        if number not in self.scans and number in self.book.closed:
            self.last_activity = now  # a source is there (replaying old scans): keep the next one open
            return "late", "the scan is closed"
        if (rows or self.rows) * (cols or self.cols) != self.frames:
            return "geometry", f"scan of {rows}x{cols}"
        return self.book.start(number, rows or self.rows, cols or self.cols, now)

    def emit(self, key: tuple[int, int], parts: list) -> None:
        """Pass the pending frame `key` on, its missing sectors filled."""
        del self.pending[key]
        number, frame = key
        scan = self.scans[number]
        if None in parts:
            missing: Sequence[int] = [i for i, p in enumerate(parts) if p is None]
            mask = sum(1 << i for i, p in enumerate(parts) if p is not None)
            parts = [p if p is not None else self.fill for p in parts]
        else:
            missing, mask = (), self.all_sectors
        self.on_frame(scan, frame, parts, missing, mask)
        scan.done[frame] = True
        scan.count += 1
        scan.partial += bool(missing)

    def sweep(self, now: float, frame_timeout: float, scan_timeout: float, scan_count: int,
              draining: bool) -> None:
        """Pass on frames waiting longer than frame_timeout; close scans silent longer than scan_timeout,
        and the next scan of the session's `scan_count` when nobody started it (not once draining)."""
        for key in [k for k, (_, first, _) in self.pending.items() if now - first > frame_timeout]:
            self.emit(key, self.pending[key][0])
        for number, scan in list(self.scans.items()):
            if now - scan.last_input > scan_timeout:
                self.close(number, f"no input for {scan_timeout:g} s", now)
        upcoming = self.book.next_open()
        if upcoming in self.scans or upcoming >= scan_count or draining or (self.series and not self.scans):
            return
        if self.scans:  # open scans are all later: this one was over before this aggregator started
            if self.skipped is None or self.skipped[0] != upcoming:
                self.skipped = (upcoming, now)
            elif now - self.skipped[1] > scan_timeout:
                self.book.start(upcoming, self.rows, self.cols, now)
                self.close(upcoming, "never seen here: the detector went on to a later one" if self.series else
                           "never seen here: this aggregator started after it", now)
        elif self.last_activity is not None and now - self.last_activity > scan_timeout:
            self.book.start(upcoming, self.rows, self.cols, now)
            self.close(upcoming, f"never started: no input for {scan_timeout:g} s", now)

    def drain(self, now: float) -> None:
        """Close every open scan (in order): nothing more comes."""
        for number in sorted(self.scans):
            self.close(number, "drained", now)

    def close(self, number: int, why: str, now: float) -> None:
        """Close the open scan `number`: its waiting frames go on as they are, then on_close."""
        for key in [k for k in self.pending if k[0] == number]:
            self.emit(key, self.pending[key][0])
        scan = self.book.close(number)
        self.last_activity = now
        self.on_close(scan, self.lane_frames - scan.count, why)
