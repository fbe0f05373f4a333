"""The writer: collects results per scan, drops duplicates, writes files, keeps the accounting.

A scan is closed when every lane has ended it and the writer holds as many distinct frames as
the lanes say they passed on (or, failing that, after the end-of-scan timeout without any input
for the scan). Then, per scan: expected = written + lost + unaccounted, where `lost` are the frames
the lanes name as lost (each lane's END_OF_SCAN carries them as a bitmap) that are not here, and
`unaccounted` must be 0: anything else is a frame that vanished silently. With
`transport.onLoss: fail`, a scan closed with lost or partial frames fails the writer, and so the
session.

A lane's end of scan can die with a distributor restarted mid-session (a pod restarted by
Kubernetes); the sources send their ends again to the new one. As a last resort, a scan stale for
STALE_TIMEOUTS x (end-of-scan + worker timeout) + STALE_MARGIN_S closes anyway, its missing frames
counted lost and the lanes that never ended it named; a scan of which nothing came at all, below
an open one (or, once streaming, with no input for as long), is opened for that.
These rules are `WriterScans` in `dataplane/accounting.py`; this module holds the sockets and the files.

Workers send results on a DEALER to this ROUTER, a turn's worth of frames in one RESULT message (wire.results
splits it); every frame's result (new, duplicate or late) is
acknowledged with a RECEIPT to the distributor of its lane (on the DEALER that distributor connects
here; a turn's results go out as one receipt per lane), which counts the frame done only then. So
when a lane's END_OF_SCAN arrives, the results it accounts for are here already. A file is created at the
first result of a scan (a scan of which nothing arrived leaves no file), written as `NAME.partial`
and renamed when complete; a write error (full disk) fails the stage with the reason and leaves
no file behind.

With spec.liveView on (the default) the writer also makes the live results of its result kind
(services/results/feed.py `live_feed`: 4D-STEM images, or tomography's chosen slices): each turn's new results go
into the session's live store, served on the writer's `live` port, and each scan's STEM images go into its file at
close (`stem/`, stempy's layout). Duplicates and refused results are not shown. The messages only the live view
takes (PATTERN, PREVIEW) go to the feed (`take`).

Raw frames (the `frames` result kind: noop) are reduced in the workers (results/reduction.py), so such a
result carries no pixels unless the session keeps the frames (a sink for them: spec.output.keepFrames, or a
registered one): its parts are [the frame's live record (empty with the live view off)] + [the frame's sector
strips, when kept]. The workers' PATTERN
messages carry the scans' summed and maximum patterns; a raw-frame scan waits for them before it closes (at most
feed.PATTERN_WAIT_S).

Workers send what their plugin derived from the session's sample frames (CALIBRATION: e.g. the fitted
electron-counting thresholds); each scan's file records it under `metadata/` when it closes. All workers
calibrate on the same samples, so they agree; if they ever did not, the writer says so in its log.

Routed by slice (spec.tomography, dataplane/bands.py) each RESULT names its band and each receipt the band of
each key; a frame is written with its first band's result, partial until every band's came (the scan's bit mask
per frame is then a bit per band); the counters count frames (a frame's later bands add nothing; its partial
ones count when the scan closes), duplicates excepted, which are results dropped, per band. A plugin that
reduces whole scans (tomo-fbp: results are receipts) has each
worker send its band's output (VOLUME) once it has the scan, or so far when its input pauses: the writer hands it
to the scan's sink (`take_output`; the sink checks it and keeps the last of each band), and a scan waits (at most
the end-of-scan timeout of silence) while the sink is `awaiting_outputs`; its `record_fields` join the scan's
record (a volume's projections expected = used + lost). The writer holds no technique or file-format code.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zmq

from detstream.services.dataplane.accounting import COUNTS, WriterScans, add_fields, scan_account, scan_record
from detstream.services.dataplane.blocks import Blocks
from detstream.services.dataplane.scans import WrittenScan
from detstream.services.dataplane.wire import (
    CALIBRATION,
    END_OF_SCAN,
    PATTERN,
    PREVIEW,
    RECEIPT,
    RESULT,
    VOLUME,
    Header,
    Message,
    Outbox,
    frame_key,
    results,
    unpack_frames,
)
from detstream.services.model.plan import LIVE_PORT, lane_routing_id
from detstream.services.plugins import plugin_class, session_bands
from detstream.services.results.feed import LiveResults, live_feed
from detstream.services.results.slices import LiveSlices
from detstream.services.runtime.faults import failpoint
from detstream.services.runtime.stage import HOUSEKEEPING_S, Stage, StageError
from detstream.services.sinks import session_sink
from detstream.services.sinks.output import accounting_file, folder_problem, never_overwrite, scan_file
from detstream.services.sources import source_class
from detstream.v1.control_pb2 import StageState

DRAIN_QUIET_S = 1.0  # a draining writer finishes after this long without input and no open scan
# A scan without input for this many (end-of-scan + worker) timeouts, and STALE_MARGIN_S more, is closed as
# it is: the last resort for an end of scan that died. Longer than `detstream run` takes to fail a
# session whose stage hangs (10 s, or 2 worker timeouts), so a hung stage still fails it locally.
STALE_TIMEOUTS, STALE_MARGIN_S = 2, 10.0
TURN = 256  # messages a turn takes at most (they are acknowledged at its end)
RECEIPTS_KEPT = 65536  # receipts kept per lane while its distributor is away (more than it can have in flight)
RECENT_SCANS = 16  # closed scans listed in the status (all of them are summed there, and in the accounting file)


class WriterStage(Stage):
    role = "writer"

    def __init__(self, plan, index, bind_host=None, output: Path | None = None):
        super().__init__(plan, index, bind_host)
        self.output = Path(output or ".") / self.spec.output.path

    def setup(self):
        problem = folder_problem(self.output)
        if problem:
            raise StageError(f"output folder: {problem}")
        self.kind = plugin_class(self.spec.plugin.name).result
        self.sink = session_sink(self.spec, self.kind)  # None: results of this kind are counted, not kept
        results = self.socket(zmq.ROUTER, bind="results")
        results.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a receipt to a full or absent peer waits
        results.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a restarted distributor takes its routing id over
        self.results = Outbox(results, self.name)
        self.receipts: dict[int, tuple[list[int], list[int]]] = {}  # lane -> keys (and bands) of the turn's results
        self.bands = session_bands(self.spec)
        self.blocks = Blocks(self.spec.scan.frames, self.spec.transport.block_frames, self.spec.lanes)
        self.all_sectors = (1 << self.spec.detector.sectors) - 1  # a frame's sector mask when none was missing
        self.write_delay = failpoint(self.name, self.role, "write-delay")
        transport = self.spec.transport
        self.accounts = WriterScans(self.spec.lanes, self.spec.scan.rows, self.spec.scan.cols, self.spec.scan.count,
                                    transport.end_of_scan_timeout_s,
                                    STALE_TIMEOUTS * (transport.end_of_scan_timeout_s + transport.worker_timeout_s)
                                    + STALE_MARGIN_S, RECENT_SCANS, series=source_class(self.spec.source.kind).series)
        self.scans = self.accounts.scans
        self.accounting = accounting_file(self.output, self.plan.session)  # a line per closed scan
        if self.accounting.exists():
            raise StageError(never_overwrite(self.accounting))
        self.last_input = time.monotonic()
        self.lane_ended = False  # a lane's END_OF_SCAN came this turn: its scan may be complete
        self.streaming = False  # any input yet (a session may wait for its detector as long as it takes)
        self.calibration: dict = {}  # the latest a worker sent (recorded in every scan's file)
        self.calibrations: dict[str, str] = {}  # worker -> its latest, as JSON (to notice disagreement)
        self.live = self.serve_live() if self.spec.live_view.enabled else None
        self.reactor.on_message(results, lambda _peer, msg: self.handle(msg), envelope=True, batch=TURN)
        self.reactor.every(0, self.after_turn)
        self.reactor.every(HOUSEKEEPING_S, self.housekeeping)

    def serve_live(self) -> LiveResults | LiveSlices | None:
        """The live view of the session's result kind (None: that kind has none) on the `live` port, at / and at
        /NAMESPACE/SESSION/ (the path of its Ingress on Kubernetes); there on every interface of the pod, since
        `kubectl port-forward` reaches its localhost."""
        host = "0.0.0.0" if os.environ.get("POD_IP") else self.bind_host
        try:
            live = live_feed(self.spec, self.kind, self.bands, host, self.me.ports[LIVE_PORT], self.stage_rows,
                             prefix=f"/{self.plan.namespace}/{self.plan.session}")
        except OSError as exc:
            raise StageError(f"live view: cannot listen on {host}:{self.me.ports[LIVE_PORT]}: {exc}") from None
        if live is not None:
            self.log.info("live view at %s", live.url)
        return live

    def stage_rows(self) -> list[dict]:
        """The live page's stage table: this writer's own counts (read from the web app's threads; the lost frames
        are in each scan's accounting, shown with the scan)."""
        c = self.counters
        return [{"stage": self.name, "state": StageState.Name(self.state).lower(), "results in": c.frames_in,
                 **{outcome: c.outcomes[outcome] for outcome in ("written", "partial", "duplicate")},
                 "rejected": sum(c.rejected.values())}]

    def after_turn(self, now: float) -> None:
        """Acknowledge the turn's results, show them live; a scan closes as soon as its last lane ends it (the
        lane's results are here before its end)."""
        self.send_receipts()
        if self.live is not None:
            self.live.flush(now)
        if self.lane_ended:
            self.housekeeping(now)

    def housekeeping(self, now: float) -> None:
        """Close the scans that are complete or timed out; finish once drained."""
        self.lane_ended = False
        self.close_ready(now)
        if self.draining.is_set() and not self.scans and now - self.last_input > DRAIN_QUIET_S:
            self.finish()  # drained: every scan that started is closed and nothing more comes
        self.counters.scan_progress = self.accounts.progress()

    def handle(self, msg: Message) -> None:
        self.last_input = time.monotonic()
        self.streaming = True
        h = msg.header
        if h.kind == CALIBRATION:
            self.take_calibration(msg)
            return
        if h.kind in (PATTERN, PREVIEW):
            self.take_live(msg)
            return
        if h.kind == VOLUME:
            self.take_output(msg)
            return
        if h.kind == RESULT:
            self.take_results(msg)
            return
        if h.kind != END_OF_SCAN:
            self.refuse("kind", msg)
            return
        if h.scan not in self.accounts.closed:
            scan = self.open_scan(h)
            if scan is not None:
                self.end_of_lane(scan, msg)

    def open_scan(self, h: Header) -> WrittenScan | None:
        """The open scan a message is of (opened at its first), or None for a scan of another geometry (refused)."""
        scan = self.accounts.scan(h.scan, h.scan_rows, h.scan_cols, self.last_input)
        if scan is None:
            self.refuse("geometry", None, f"scan {h.scan} of {h.scan_rows or self.spec.scan.rows}x"
                                          f"{h.scan_cols or self.spec.scan.cols} positions")
        return scan

    def take_results(self, msg: Message) -> None:
        """A worker's RESULT: the results of some frames of one scan (a frame number is its scan position)."""
        h = msg.header
        frames = results(h, [part.buffer for part in msg.parts])
        for frame, _, _ in frames:
            # even for a result refused below: the frame must not stay in flight for ever (a plugin
            # returning bad results shows as frames unaccounted, which fails the session loudly)
            keys, bands = self.receipts.setdefault(self.blocks.lane(self.blocks.of(frame)), ([], []))
            keys.append(frame_key(h.scan, frame))
            bands.append(h.band)
        if h.result != self.kind or (self.bands.keyed and h.band >= self.bands.count):
            self.refuse("result" if h.result != self.kind else "range", msg,
                        f"results this writer cannot take ({h.result} of band {h.band}; it takes {self.kind} of "
                        f"{self.bands.count} bands)")
            return
        if h.scan in self.accounts.closed:
            self.counters.outcomes["duplicate"] += len(frames)
            return
        scan = self.open_scan(h)
        if scan is None:
            return
        self.counters.bytes_in += msg.payload_bytes
        for frame, mask, parts in frames:
            self.take_result(scan, msg, frame, mask, parts)

    def take_result(self, scan: WrittenScan, msg: Message, frame: int, mask: int, parts: Sequence) -> None:
        """One frame's result (`parts`: its buffers): accounted, written by the sink, shown live."""
        live_parts = parts
        if self.kind == "frames":  # [the live record] + [the frame, when a sink keeps it]
            live_parts, parts = parts[:1], parts[1:]
        if self.sink is not None:
            reason = self.sink.refusal(parts, self.spec)
            if reason:
                self.refuse(reason, msg, f"frame {frame}: a result this writer cannot take")
                return
        if self.write_delay:
            time.sleep(self.write_delay)
        partial = mask != self.all_sectors
        if self.bands.keyed:  # a frame counts at its first band's result; its partial ones at the scan's close
            first = not scan.done[frame]
            written = self.accounts.band_result(scan, frame, msg.header.band, self.bands.count, partial)
            partial, counted = False, first and written
        else:
            written = counted = self.accounts.result(scan, frame, mask, partial)
        self.counters.frames_in += counted or not written  # a frame's later bands are not more frames in
        if not written:
            self.counters.outcomes["duplicate"] += 1
            return
        self.counters.outcomes["written"] += counted
        self.counters.outcomes["partial"] += partial
        if self.sink is not None:
            self.write(scan, frame, parts)
        if self.live is not None and not self.live.add(scan.number, (scan.rows, scan.cols), frame, live_parts,
                                                       partial, msg.header.sender, frame_key(scan.number, frame)):
            self.refuse("size", msg, "a frames result without a live record of this geometry: written, not shown live")

    def take_live(self, msg: Message) -> None:
        """A message only the live view takes (a raw-frame scan's PATTERN, a tomography scan's PREVIEW)."""
        h = msg.header
        if self.live is None or h.kind not in self.live.takes:
            self.refuse("kind", msg, "a live view message this session's live view does not take")
            return
        reason = self.live.take(h, [part.buffer for part in msg.parts])
        if reason:
            self.refuse(reason, msg, "a live view message that is not of this session's")
        self.lane_ended = True  # a scan waiting for its patterns may close now

    def take_output(self, msg: Message) -> None:
        """A worker's output of a scan (VOLUME: its band's slices so far, routing by slice) to the scan's sink,
        which keeps the latest of each band."""
        h = msg.header
        parts = [part.buffer for part in msg.parts]
        reason = "kind" if self.sink is None or h.band >= self.bands.count else \
            self.sink.output_refusal(self.spec, self.bands.slices(h.band), tuple(h.shape), parts)
        if reason:
            self.refuse(reason, msg, f"a VOLUME of band {h.band} this session's sink does not take")
            return
        if h.scan in self.accounts.closed:
            self.refuse("late", msg, f"band {h.band} of scan {h.scan}: the scan is closed")
            return
        scan = self.accounts.scan(h.scan, 0, 0, self.last_input)
        if scan is None:
            return
        self.write(scan, None, [])
        try:
            scan.file.take_output(self.bands.slices(h.band), parts)
        except OSError as exc:
            raise StageError(f"cannot write scan {scan.number} to {scan.path}: {exc}") from None
        self.lane_ended = True   # a scan waiting for its outputs may close now

    def outputs_settling(self, scan: WrittenScan, now: float) -> bool:
        """Whether a scan waits for the workers' outputs its sink expects (at most the end-of-scan timeout of
        silence)."""
        return scan.file is not None and now - scan.last_input <= self.spec.transport.end_of_scan_timeout_s \
            and scan.file.awaiting_outputs(scan.sectors, self.bands)

    def take_calibration(self, msg: Message) -> None:
        """A worker's calibration: a JSON object of groups (dicts) of numbers, strings and booleans."""
        try:
            calibration = json.loads(msg.parts[0].bytes)
            valid = isinstance(calibration, dict) and all(
                isinstance(group, dict) and all(isinstance(v, (int, float, str, bool)) for v in group.values())
                for group in calibration.values())
        except ValueError:  # not JSON, not UTF-8
            valid = False
        if not valid:
            self.refuse("result", msg, "a CALIBRATION that is not a JSON object of groups of plain values")
            return
        text = json.dumps(calibration, sort_keys=True)
        others = {c for sender, c in self.calibrations.items() if sender != msg.header.sender}
        if others and text not in others:
            self.log.error("%s calibrated differently from other workers: %s (the files record the latest)",
                           msg.header.sender, text)
        self.calibrations[msg.header.sender] = text
        self.calibration = calibration

    def end_of_lane(self, scan: WrittenScan, msg: Message) -> None:
        """A lane's END_OF_SCAN: what it passed on, and the bitmap of the frames it names lost."""
        h = msg.header
        lost = unpack_frames(msg.parts[0], scan.done.size) if msg.parts else np.zeros(scan.done.size, bool)
        if int(np.count_nonzero(lost)) != h.lost:
            self.refuse("lost", msg, f"END_OF_SCAN says {h.lost} frames lost, its bitmap {np.count_nonzero(lost)}")
            return
        self.accounts.lane_ended(scan, h.sender, h, lost)
        self.lane_ended = True

    def send_receipts(self) -> None:
        """Tell each lane's distributor which of its frames have their result here (they are done)."""
        for lane in list(self.receipts):
            keys, bands = self.receipts[lane]
            try:
                sent = self.reactor.send(self.results, Header(kind=RECEIPT, acked=keys,
                                                              bands=bands if self.bands.keyed else ()),
                                         peer=lane_routing_id(lane), wait=False)
            except zmq.ZMQError:  # it is not connected (reconnecting)
                sent = False
            if not sent:  # next turn; what a lane gone for good keeps cannot grow without bound
                del keys[:-RECEIPTS_KEPT]
                del bands[:-RECEIPTS_KEPT]
                continue
            del self.receipts[lane]

    def write(self, scan: WrittenScan, position: int | None, parts: Sequence) -> None:
        """A result into the scan's file, opened at the first (`position` None: only open it)."""
        path = scan_file(self.output, self.plan.session, scan.number)
        try:
            if scan.file is None:
                plugin = self.spec.plugin
                scan.file = self.sink.open(path, self.spec, (scan.rows, scan.cols),
                                           {"session": self.plan.session, "scan": scan.number, "plugin": plugin.name,
                                            "plugin_params": json.dumps(plugin.params, sort_keys=True)})
                scan.path = str(path)
            if position is not None:
                scan.file.write_result(position, parts)
        except FileExistsError as exc:  # results are never overwritten
            raise StageError(str(exc)) from None
        except OSError as exc:
            raise StageError(f"cannot write scan {scan.number} to {path}: {exc}") from None

    def close_ready(self, now: float) -> None:
        for scan, silent in self.accounts.due(now, self.last_input if self.streaming else None,
                                              self.draining.is_set()):
            if silent is None and self.live is not None and self.live.settling(scan.number, now):
                continue  # its raw frames' patterns are on their way
            if silent is None and self.outputs_settling(scan, now):
                continue  # its bands' outputs are on their way
            if silent is None:
                self.close(scan)
            else:
                self.close_stale(scan, silent)

    def close_stale(self, scan: WrittenScan, silent: float) -> None:
        """Close a scan some lane never ended (its end of scan died with a restarted distributor):
        every frame not here is lost."""
        self.accounts.stale(scan)
        self.log.error("scan %d: no input for %.0f s and %d of %d lanes never ended it (%s): its %d frames "
                       "not here are lost", scan.number, silent, self.spec.lanes - len(scan.ends), self.spec.lanes,
                       "a distributor restarted mid-scan?" if scan.ends or scan.count else "nothing of it came",
                       int(np.count_nonzero(~scan.done)))
        self.close(scan)

    def close(self, scan: WrittenScan) -> None:
        account = scan_account(scan, complete=True)
        record = scan_record(account)
        unaccounted = record["unaccounted"]
        counts = {k: record[k] for k in COUNTS}
        images = None if self.live is None else self.live.close_scan(scan.number, np.flatnonzero(~scan.done), counts)
        if scan.file is not None:
            try:
                scan.file.add_metadata(self.calibration)
                scan.file.record_arrivals(scan.done, scan.sectors,
                                          self.bands.count if self.bands.keyed else self.spec.detector.sectors,
                                          counts)
                fields = scan.file.record_fields()
                if images is not None:
                    scan.file.add_images(images)
                scan.file.close()
            except OSError as exc:
                scan.file.abort()  # no file that looks complete is left behind
                scan.file = None
                raise StageError(f"cannot write scan {scan.number} to {scan.path}: {exc}") from None
            record.update(fields)
            add_fields(account, fields)   # the status shows them too
            if self.live is not None and fields:
                self.live.account(scan.number, counts | fields)   # what the sink adds (a volume's projections)
        self.record(record)
        if self.bands.keyed:  # (whole frames count theirs as they come)
            self.counters.outcomes["partial"] += account.partial
        self.accounts.close(scan, account, unaccounted)
        log = self.log.error if unaccounted else (self.log.warning if account.lost else self.log.info)
        log("scan %d closed: %d expected, %d written (%d partial), %d lost, %d duplicates dropped%s",
            scan.number, account.expected, account.written, account.partial, account.lost,
            account.duplicates, f", {unaccounted} UNACCOUNTED" if unaccounted else "")
        if self.spec.transport.on_loss == "fail" and (account.lost or account.partial or unaccounted):
            raise StageError(f"scan {scan.number} closed with {account.lost} frames lost, {account.partial} partial"
                             f"{f', {unaccounted} unaccounted' if unaccounted else ''} "
                             f"(spec.transport.onLoss is fail)")
        if len(self.accounts.closed) >= self.spec.scan.count:
            self.finish()

    def record(self, record: dict) -> None:
        """A closed scan's line of the accounting file."""
        try:
            with self.accounting.open("a") as out:
                out.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise StageError(f"cannot write the accounting to {self.accounting}: {exc}") from None

    def add_status(self, status):
        self.accounts.add_status(status)

    def run(self) -> int:
        try:
            return super().run()
        finally:
            if getattr(self, "live", None) is not None:
                self.live.stop()
            for scan in getattr(self, "scans", {}).values():
                if scan.file is not None:
                    scan.file.abort()  # an unfinished scan never leaves a file that looks complete
