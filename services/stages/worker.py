"""A worker: takes the blocks its lanes route to it, straight from the sources, runs the plugin, and
hands results to the writer (docs/full-rate.md).

It offers credits (frames it can take) to every lane's distributor, naming its `data` address; a
lane routes a block to it against credit for the block's frames and every source sends its sectors
of the block there (BLOCK). The worker assembles each frame (`dataplane/assembly.py`): a frame goes to
the plugin once all its sectors are in, or zero-filled and partial once every source has ended the
block or after the frame timeout; the block's frames of which nothing came are named to the lane
(absent), which gives their credit back. A result is all the worker sends per frame, and a turn's results go
to the writer in one RESULT message per scan (at most RESULT_FRAMES frames' worth): the writer acknowledges
each to the block's lane, which counts the frame done and gives its credit back only then.
So a worker killed with results still queued loses nothing (the lane routes those frames again, the
sources still keep them, and the writer drops any copy it already has).

The worker never blocks: results wait in a queue bounded by the credits it was given, and while
the writer is slow the worker keeps sending heartbeats, so backpressure is never mistaken for
death.

Credits are offered on each connection to a lane's distributor: at the start, and again when a
restarted distributor comes back (its predecessor's credits died with it).

A plugin that calibrates (electron counting with fitted thresholds) does so on the session's sample
frames: the first `samples` frames of the first scan, which every source sends to every worker it
learns of (SAMPLE, the BLOCK layout), so all workers calibrate on the same frames in the same order, run
after run. Until then frames are held; if some sample never comes, the worker calibrates on those it has
once the stream pauses. The samples are kept for the session, so new parameters (a new plugin instance)
calibrate again on the same frames. What the plugin derived (`calibration()`) goes to the writer
(CALIBRATION), for the scan's file.

A plugin whose results are raw frames (noop) sends the writer no pixels unless the session keeps them
(spec.output.keepFrames, or a sink registered for frames: `sinks.session_sink`): with the live view on, the
worker reduces each frame where it lies (results/reduction.py) and its RESULT carries the frame's record
(detector sums, total, moments: a few dozen bytes) instead; each scan's summed and maximum patterns follow in a
PATTERN message every PATTERN_S while frames come, and as soon as this worker's input pauses (PAUSE_S) after it
had one of the scan's last frames (the writer waits for the patterns before it closes the scan; a pattern is 2
MB at 576x576, three frames' worth, so not at every pause of a slow stream). A result's parts are [record (empty
with the live view off)] + [the frame's strips, when kept]: the writer still gets one result per frame, so the
accounting is the same. A turn's results go before its patterns (and a scan's output) on the same socket.

Routed by slice (spec.tomography, dataplane/bands.py), worker replica k owns band k: it names the band in its
CREDITs, its "frames" are the band's rows (its geometry says so, so the assembly is unchanged), and its RESULTs
name the band. The sources send it, on each connection, the reference frames of the scans still open for its band
(REFERENCE, the BLOCK layout: tomo-fbp's darks and flats, dataplane/references.py): assembled apart, they go to the
plugin outside the accounting (no result; the plugin counts each once), so a worker restarted mid-scan corrects the
band's remaining projections. A plugin that reduces the whole scan (tomo-fbp) gives the writer its `scan_output`
(VOLUME: the band's slices) once it has every frame of the scan, and meanwhile whenever this worker's input of that
scan pauses for OUTPUT_PAUSE_S (frames may still come: the writer keeps the last one). With the live view on, a
worker whose band holds slices spec.liveView.slices chose sends the writer those slices so far (PREVIEW, the
plugin's `scan_preview`) PREVIEW_S after a frame of the scan came, so every PREVIEW_S while frames come, and the
same slices of every VOLUME it sends (results/slices.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from functools import partial
from typing import NamedTuple

import numpy as np
import zmq

from detstream.services.dataplane.assembly import Assembly
from detstream.services.dataplane.blocks import Blocks
from detstream.services.dataplane.wire import (
    ABSENT,
    BLOCK,
    BLOCK_END,
    CALIBRATION,
    CREDIT,
    DUPLICATE,
    HEARTBEAT,
    PARTIAL,
    PATTERN,
    PREVIEW,
    REFERENCE,
    RESULT,
    SAMPLE,
    TAKEN,
    VOLUME,
    Header,
    Message,
    Outbox,
    frame_key,
)
from detstream.services.plugins import Plugin, PluginContext, plugin_class, session_bands
from detstream.services.results.geometry import live_geometry
from detstream.services.results.reduction import PATTERN_S, FrameReducer, ScanPatterns
from detstream.services.results.slices import PREVIEW_S, band_previews
from detstream.services.runtime.faults import failpoint
from detstream.services.runtime.stage import HOUSEKEEPING_S, POLL_MS, Stage
from detstream.services.sinks import session_sink

CALIBRATION_IDLE_S = 0.5  # calibrate on the samples there are when the stream pauses this long
PAUSE_S = 0.02  # a scan's last patterns go to the writer when no frame came for this long (else every PATTERN_S)
RESULT_FRAMES = 128  # frames' results per RESULT message at most (a turn's worth: 8 blocks of 16)
OUTPUT_PAUSE_S = 1.0  # a scan's output so far goes to the writer when none of its frames came for this long


class Held(NamedTuple):
    """A frame waiting for the calibration."""
    scan: int
    frame: int
    parts: list
    mask: int


class WorkerStage(Stage):
    role = "worker"

    def setup(self):
        spec = self.spec
        self.plugin_cls = plugin_class(spec.plugin.name)
        bands = session_bands(spec)
        self.band = self.me.index % bands.count   # a StatefulSet restarts ordinal k: band k comes back to it
        lo, hi = bands.rows_of(self.band)
        self.geometry = dataclasses.replace(self.geometry, rows=hi - lo)   # its frames are the band's rows
        self.context = PluginContext(spec, self.band, (lo, hi), bands.slices(self.band))
        self.plugin = self.plugin_cls(spec.plugin.params, self.context)
        self.blocks = Blocks(spec.scan.frames, spec.transport.block_frames, spec.lanes)
        self.data = self.socket(zmq.PULL, bind="data")
        self.address = f"tcp://{self.bind_host}:{self.me.ports['data']}"
        self.lanes = [Outbox(self.socket(zmq.DEALER, connect=[("distributor", lane, "work")],
                                         on_connect=partial(self.offer, lane)), self.name)
                      for lane in range(spec.lanes)]
        self.writer = Outbox(self.socket(zmq.DEALER, connect=[("writer", 0, "results")]), self.name)
        self.last_sent = [0.0] * len(self.lanes)
        fill = zmq.Frame(bytes(self.geometry.sector_bytes))
        sources = max(spec.source.replicas, 1)
        self.assembly = Assembly(self.geometry.sectors, sources, fill, self.frame, self.absent)
        self.sample_assembly = Assembly(self.geometry.sectors, sources, fill, self.sample, lambda scan, frames: None)
        self.reference_assembly = Assembly(self.geometry.sectors, sources, fill, self.reference,
                                           lambda scan, frames: None)
        self.assemblies = {BLOCK: self.assembly, SAMPLE: self.sample_assembly, REFERENCE: self.reference_assembly}
        self.held: list[Held] = []  # frames waiting for the calibration
        self.samples: dict[int, list] = {}  # frame number -> the sample frame's sectors (kept for the session)
        self.samples_expected = min(self.plugin_cls.samples(spec.plugin.params), spec.scan.frames)
        self.calibration_sent = "{}"
        self.last_frame = time.monotonic()
        self.housekeeping_s = min(HOUSEKEEPING_S, spec.transport.heartbeat_s / 2)  # heartbeats, calibration, gauges
        self.outgoing: deque[tuple[Header, list]] = deque()   # results the writer's queue cannot take yet
        self.results: dict[int, tuple[Header, list]] = {}   # scan -> its results of this turn (one RESULT)
        self.output_due: dict[int, float] = {}   # scans with frames since their last output -> when it is due
        self.scan_outputs = self.plugin_cls.scan_output is not Plugin.scan_output   # the plugin reduces scans
        # the slices of its scan outputs the live view shows (indices into the band), and when each scan's are due
        self.previewed = band_previews(spec, *self.context.slices) \
            if self.scan_outputs and spec.live_view.enabled and spec.tomography is not None else []
        self.preview_due: dict[int, float] = {}
        self.process_delay = failpoint(self.name, self.role, "process-delay")
        raw = self.plugin_cls.result == "frames"
        self.keep_frames = raw and session_sink(spec, "frames") is not None  # the writer writes them
        self.reducer = FrameReducer((spec.detector.rows, spec.detector.cols),
                                    live_geometry(spec.live_view.geometry, (spec.detector.rows, spec.detector.cols)),
                                    spec.detector.dtype, spec.detector.sectors) \
            if raw and spec.live_view.enabled else None
        self.patterns: dict[int, ScanPatterns] = {}  # scan -> its patterns since the last PATTERN sent
        # a frame numbered from here on is among a scan's last ones (as many as can be in flight at once)
        self.scan_end = spec.scan.frames - spec.lanes * spec.workers.credits * max(spec.workers.replicas, 1)
        self.ending: set[int] = set()  # scans of which this worker had one of the last frames
        self.report_calibration()  # fixed thresholds are known now
        self.reactor.on_message(self.data, self.from_source, batch=8)
        # the writer's socket is watched only while results wait for room there
        self.reactor.on_writable(self.writer.socket, self.flush, when=lambda: bool(self.outgoing))
        self.reactor.every(0, self.apply_updates)
        self.reactor.every(0, self.send_results)
        if self.reducer is not None:
            self.reactor.every(0, self.send_patterns)
        self.reactor.every(self.housekeeping_s, self.housekeeping)

    def housekeeping(self, now: float) -> None:
        for assembly in self.assemblies.values():
            assembly.sweep(now, self.spec.transport.frame_timeout_s)
        self.calibrate_if_idle(now)
        self.send_outputs(now)
        self.send_previews(now)
        self.heartbeat(now)
        self.counters.queue_depth = len(self.outgoing)
        self.counters.in_flight = len(self.held) + len(self.outgoing) + self.assembly.waiting

    def offer(self, lane: int) -> None:
        """Connected to the lane's distributor: offer it our credits (all we may hold from it), and where to send
        blocks."""
        self.tell(lane, Header(kind=CREDIT, credit=self.spec.workers.credits, address=self.address,
                               key=self.key_name, band=self.band))

    def from_source(self, msg: Message) -> None:
        h = msg.header
        assembly = self.assemblies.get(h.kind)
        if assembly is None:
            self.refuse("kind", msg)
            return
        if h.band != self.band:
            self.refuse("misrouted", msg, f"band {h.band}: this worker owns band {self.band}")
            return
        self.last_frame = time.monotonic()
        if h.kind == BLOCK:
            self.counters.bytes_in += self.geometry.sector_bytes * len(msg.parts)
            if (h.scan, h.block) not in self.assembly.blocks:  # the lane then knows the block is being worked on
                self.tell(self.blocks.lane(h.block), Header(kind=TAKEN, scan=h.scan, block=h.block))
        for reason, detail in assembly.block(h.scan, h.block, self.blocks.frames(h.block), h.sender, h.frames,
                                             h.sectors, msg.parts, bool(h.flags & BLOCK_END), self.last_frame,
                                             again=bool(h.flags & DUPLICATE)):
            self.refuse(reason, msg, detail)

    def frame(self, scan: int, frame: int, parts: list, mask: int) -> None:
        """A frame assembled (the assembly's on_frame)."""
        self.counters.frames_in += 1
        if self.plugin.samples_wanted:
            self.held.append(Held(scan, frame, parts, mask))
            return
        self.process(scan, frame, parts, mask)

    def absent(self, scan: int, frames: list[int]) -> None:
        """Frames of a block routed here of which no sector came (the assembly's on_absent): the lane gives
        their credit back, and counts them lost unless a copy comes."""
        self.tell(self.blocks.lane(self.blocks.of(frames[0])), Header(kind=ABSENT, scan=scan, frames=frames))

    def sample(self, scan: int, frame: int, parts: list, mask: int) -> None:
        """One of the session's sample frames (the same for every worker); one that did not come whole is
        not a sample (its zero-filled sectors would be taken for signal)."""
        if frame < self.samples_expected and frame not in self.samples and mask == self.assembly.all_sectors:
            self.samples[frame] = self.views(parts)
            if self.plugin.samples_wanted and len(self.samples) == self.samples_expected:
                self.calibrate()

    def reference(self, scan: int, frame: int, parts: list, mask: int) -> None:
        """One of a scan's reference frames (routed by slice: tomo-fbp's darks and flats), sent again on connecting
        here (this worker may be a restarted one, which lacks them): to the plugin, which takes a frame it has as a
        no-op, outside the accounting (the frame has its result as a BLOCK). Not whole: left out (zero-filled
        sectors would spoil the reduction)."""
        if mask != self.reference_assembly.all_sectors:
            return
        self.plugin.process_frame(scan, frame, self.views(parts), parts)
        if scan in self.output_due and self.plugin.scan_complete(scan):   # (its last projections waited for it)
            self.send_output(scan, final=True)

    def views(self, parts: list) -> list[np.ndarray]:
        """A frame's sector buffers as read-only numpy views (no copy)."""
        g = self.geometry
        return [np.frombuffer(p, g.dtype).reshape(g.sector_shape) for p in parts]

    def process(self, scan: int, frame: int, parts: list, mask: int) -> None:
        t0 = time.perf_counter()
        if self.scan_outputs and mask != self.assembly.all_sectors:
            out = [b""]   # zero-filled strips would spoil the scan's reduction: left out (its output says which)
        else:
            out = self.plugin.process_frame(scan, frame, self.views(parts), parts)
        if self.plugin_cls.result == "frames":
            out = self.raw_result(scan, frame, out)
        if self.process_delay:
            time.sleep(self.process_delay)
        self.metrics.latency.observe(time.perf_counter() - t0)
        # a turn may process many blocks (a slow plugin: seconds): the lanes must not read that as silence
        self.heartbeat(time.monotonic())
        if scan not in self.results:
            self.results[scan] = (Header(kind=RESULT, scan=scan, scan_rows=self.spec.scan.rows,
                                         scan_cols=self.spec.scan.cols, result=self.plugin_cls.result,
                                         band=self.band), [])
        header, message_parts = self.results[scan]   # (not `parts`: the frame's buffers, already processed)
        header.frames.append(frame)
        header.sector_masks.append(mask)
        header.part_counts.append(len(out))
        message_parts.extend(out)
        if len(header.frames) >= RESULT_FRAMES:
            self.send_results()
        if self.scan_outputs:
            self.output_due[scan] = time.monotonic() + OUTPUT_PAUSE_S
            if self.previewed:
                self.preview_due.setdefault(scan, time.monotonic() + PREVIEW_S)
            if self.plugin.scan_complete(scan):
                self.send_output(scan, final=True)

    def send_results(self, now: float = 0.0) -> None:
        """After a turn (and before anything that must follow them: patterns, a scan's output): the results
        gathered, one RESULT message per scan, to the writer."""
        if self.results:
            self.outgoing.extend(self.results.values())
            self.results.clear()
            self.flush()

    def send_outputs(self, now: float) -> None:
        """The scans whose input paused: what the plugin made of them so far, to the writer."""
        for scan in [s for s, due in self.output_due.items() if now > due]:
            self.send_output(scan, final=False)
            self.flush()

    def send_output(self, scan: int, final: bool) -> None:
        """The plugin's output of a scan (tomo-fbp: the band's slices, the projections used) to the writer."""
        self.output_due.pop(scan, None)
        out = self.plugin.scan_output(scan, final)
        if out is None:
            return
        self.send_results()  # the results the output covers go first
        slices, used = out
        if self.previewed:   # the live view's last of these slices is the file's; before the VOLUME, which may
            self.preview_due.pop(scan, None)   # let the writer close the scan
            self.send_preview(scan, [slices[self.previewed], used])
        self.outgoing.append((Header(kind=VOLUME, scan=scan, band=self.band, shape=slices.shape,
                                     dtype=slices.dtype.str, flags=0 if final else PARTIAL),
                              [np.ascontiguousarray(slices, np.float32), used]))

    def send_previews(self, now: float) -> None:
        """The scans whose chosen slices are due (PREVIEW_S after a frame came): those slices so far, to the
        writer's live view."""
        for scan in [s for s, due in self.preview_due.items() if now > due]:
            del self.preview_due[scan]
            preview = self.plugin.scan_preview(scan, self.previewed)
            if preview is not None:
                self.send_preview(scan, preview)
        self.flush()

    def send_preview(self, scan: int, preview: list[np.ndarray]) -> None:
        """[slices (chosen, cols, cols), bitmap] as a PREVIEW."""
        slices = np.ascontiguousarray(preview[0], np.float32)
        self.outgoing.append((Header(kind=PREVIEW, scan=scan, band=self.band, shape=slices.shape,
                                     dtype=slices.dtype.str), [slices, preview[1]]))

    def raw_result(self, scan: int, frame: int, parts) -> list:
        """A raw frame's result parts: [its live record (b"" with the live view off, or for parts that are not
        this detector's frame: the writer refuses it for the view)] + [the frame, with keepFrames]."""
        record = b""
        if self.reducer is not None and self.geometry.is_frame(parts):
            patterns = self.patterns.get(scan)
            if patterns is None:
                patterns = self.patterns[scan] = ScanPatterns(self.reducer)
            record = patterns.add(self.views(parts), frame_key(scan, frame), time.monotonic()).tobytes()
            if frame >= self.scan_end:
                self.ending.add(scan)
        return [record, *parts] if self.keep_frames else [record]

    def send_patterns(self, now: float) -> None:
        """After a turn: each scan's patterns to the writer (behind the results they cover) when PATTERN_S has
        passed since their first frame, they hold as many frames as they can, or the scan is ending here and no
        frame came for PAUSE_S. Meanwhile the turns wait PAUSE_S at most, so that pause is seen when it comes."""
        if not self.patterns:
            return
        self.send_results()  # the results the patterns cover go first
        paused = time.monotonic() - self.last_frame >= PAUSE_S
        for scan, patterns in list(self.patterns.items()):
            ending = scan in self.ending
            if patterns.keys and (patterns.full or now - patterns.since >= PATTERN_S or (paused and ending)):
                self.outgoing.append((Header(kind=PATTERN, scan=scan), patterns.take()))
            if paused and not patterns.keys:
                del self.patterns[scan]  # a scan's buffers are not kept for ever
                self.ending.discard(scan)
        self.flush()
        waiting = any(self.patterns[scan].keys for scan in self.ending if scan in self.patterns)
        self.reactor.poll_ms = int(PAUSE_S * 1000) if waiting else POLL_MS

    def flush(self) -> None:
        """Hand queued results to the writer's socket, as far as its queue takes them (never blocks)."""
        while self.outgoing:
            header, parts = self.outgoing[0]
            if not self.reactor.send(self.writer, header, parts, wait=False):
                return
            self.outgoing.popleft()
            if header.kind == RESULT:
                self.counters.frames_out += len(header.frames)
                self.counters.bytes_out += sum(memoryview(p).nbytes for p in parts)

    def calibrate(self) -> None:
        """Calibrate the plugin on the samples there are (in frame order), then process the held frames."""
        frames = sorted(self.samples)
        if len(frames) < self.samples_expected:
            missing = sorted(set(range(self.samples_expected)) - set(frames))
            self.log.warning("calibrating on %d of %d sample frames: frames %s never came", len(frames),
                             self.samples_expected, missing[:10])
        if frames:
            self.plugin.calibrate([self.samples[f] for f in frames])
        else:  # no sample came at all (its lane lost them): this worker's own frames, as the last resort
            self.log.error("no sample frame came: calibrating on the %d frames held here", len(self.held))
            self.plugin.calibrate([self.views(h.parts) for h in self.held])
        self.log.info("calibrated on %d sample frames (%s): %s", len(frames), f"{frames[0]}..{frames[-1]}"
                      if frames else "none", self.plugin.calibration())
        self.report_calibration()
        held, self.held = self.held, []
        for h in held:
            self.process(*h)

    def calibrate_if_idle(self, now: float) -> None:
        if self.plugin.samples_wanted and self.held and now - self.last_frame > CALIBRATION_IDLE_S:
            self.calibrate()

    def report_calibration(self) -> None:
        """Send the writer what the plugin derived, when it changed (for the scan's file)."""
        text = json.dumps(self.plugin.calibration(), sort_keys=True)
        if text != self.calibration_sent:
            self.outgoing.append((Header(kind=CALIBRATION), [text.encode()]))
            self.calibration_sent = text
            self.flush()

    def tell(self, lane: int, header: Header, droppable: bool = False) -> None:
        """Send to a lane's distributor without ever blocking past a Stop; a heartbeat that finds
        the queue full is dropped: the queue itself says we are alive once the distributor reads it."""
        if self.reactor.send(self.lanes[lane], header, wait=not droppable):
            self.last_sent[lane] = time.monotonic()

    def heartbeat(self, now: float) -> None:
        for lane, last in enumerate(self.last_sent):
            if now - last > self.spec.transport.heartbeat_s:
                self.tell(lane, Header(kind=HEARTBEAT, address=self.address, key=self.key_name,
                                            band=self.band), droppable=True)

    def configure(self, params: dict) -> None:
        """Called from a control thread: build the new plugin there (so bad parameters are refused
        to the caller), and let the main loop swap it in between two frames."""
        problems = self.plugin_cls.check_params(params)
        if problems:
            raise ValueError("; ".join(f"{key}: {why}" for key, why in problems))
        self.updates.put(self.plugin_cls(params, self.context))

    def add_status(self, status) -> None:
        status.plugin_params_json = json.dumps(self.plugin.params, sort_keys=True)  # in effect, not just asked for

    def apply_updates(self, now: float = 0.0) -> None:
        while not self.updates.empty():
            self.plugin = self.updates.get()
            self.log.info("plugin parameters updated: %s", self.plugin.params)
            if self.plugin.samples_wanted and len(self.samples) == self.samples_expected:
                self.calibrate()  # on the session's samples, kept for this
            else:
                self.report_calibration()
