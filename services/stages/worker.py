"""A worker: takes frames from every lane's distributor against credits, runs the plugin, and
hands results to the writer; the acknowledgement (which also returns the credit) follows the
result, so a frame is never acknowledged before the writer has been given its result.
"""

from __future__ import annotations

import time

import zmq

from detstream.services.plugins import PluginContext, plugin_class
from detstream.services.stage import POLL_MS, Stage
from detstream.services.wire import CREDIT, FRAME, HEARTBEAT, RESULT, Header, Message, Outbox, frame_key

CALIBRATION_IDLE_S = 0.5  # calibrate on fewer samples when the stream pauses this long


class WorkerStage(Stage):
    role = "worker"

    def setup(self):
        spec = self.spec
        self.plugin_cls = plugin_class(spec.plugin.name)
        self.plugin = self.plugin_cls(spec.plugin.params, PluginContext(spec))
        self.lanes = [Outbox(self.socket(zmq.DEALER, connect=[self.plan.endpoint("distributor", lane, "work")]),
                             self.name) for lane in range(spec.lanes)]
        self.writer = Outbox(self.socket(zmq.PUSH, connect=[self.plan.endpoint("writer", 0, "results")]), self.name)
        self.poller = zmq.Poller()
        for lane in self.lanes:
            self.poller.register(lane.socket, zmq.POLLIN)
        self.last_sent = [0.0] * len(self.lanes)
        self.held: list[tuple[int, Message]] = []  # frames kept for calibration
        self.last_frame = time.monotonic()

    def step(self):
        if not any(self.last_sent):  # first turn: offer our capacity to every lane
            for lane in range(len(self.lanes)):
                self.tell(lane, Header(kind=CREDIT, credit=self.spec.workers.credits))
        self.apply_updates()
        for sock, _ in self.poller.poll(POLL_MS):
            lane = next(i for i, o in enumerate(self.lanes) if o.socket is sock)
            _, msg = self.receive(sock)
            if msg is None:
                self.tell(lane, Header(kind=CREDIT, credit=1))  # a rejected message still used a credit
            elif msg.header.kind != FRAME:
                self.counters.rejected["kind"] += 1
            else:
                self.frame(lane, msg)
        self.calibrate_if_idle()
        self.heartbeat()

    def frame(self, lane: int, msg: Message) -> None:
        self.counters.frames_in += 1
        self.counters.bytes_in += msg.payload_bytes
        self.last_frame = time.monotonic()
        if self.plugin.samples_wanted:
            self.held.append((lane, msg))
            self.tell(lane, Header(kind=CREDIT, credit=1))  # keep frames coming; ack after counting
            if len(self.held) >= self.plugin.samples_wanted:
                self.calibrate()
            return
        self.process(lane, msg)

    def process(self, lane: int, msg: Message, credit: int = 1) -> None:
        h = msg.header
        t0 = time.perf_counter()
        parts = self.plugin.process(msg.sectors, msg.parts)
        self.metrics.latency.observe(time.perf_counter() - t0)
        result = Header(kind=RESULT, scan=h.scan, frame=h.frame, position=h.position, flags=h.flags,
                        scan_rows=h.scan_rows, scan_cols=h.scan_cols, result=self.plugin_cls.result)
        self.writer.send(result, parts)
        self.counters.frames_out += 1
        self.counters.bytes_out += sum(memoryview(p).nbytes for p in parts)
        self.tell(lane, Header(kind=CREDIT, credit=credit, acked=[frame_key(h.scan, h.frame)]))

    def calibrate(self) -> None:
        held, self.held = self.held, []
        self.plugin.calibrate([msg.sectors for _, msg in held])
        self.log.info("calibrated on %d frames: %s", len(held), getattr(self.plugin, "thresholds", ""))
        for lane, msg in held:
            self.process(lane, msg, credit=0)  # their credit went back when they arrived

    def calibrate_if_idle(self) -> None:
        if self.held and time.monotonic() - self.last_frame > CALIBRATION_IDLE_S:
            self.calibrate()

    def tell(self, lane: int, header: Header) -> None:
        self.lanes[lane].send(header)
        self.last_sent[lane] = time.monotonic()

    def heartbeat(self) -> None:
        now = time.monotonic()
        for lane, last in enumerate(self.last_sent):
            if now - last > self.spec.transport.heartbeat_s:
                self.tell(lane, Header(kind=HEARTBEAT))

    def configure(self, params: dict) -> None:
        """Called from a control thread: build the new plugin there (so bad parameters are refused
        to the caller), and let the main loop swap it in between two frames."""
        problems = self.plugin_cls.check_params(params)
        if problems:
            raise ValueError("; ".join(f"{key}: {why}" for key, why in problems))
        self.updates.put(self.plugin_cls(params, PluginContext(self.spec)))

    def apply_updates(self) -> None:
        while not self.updates.empty():
            self.plugin = self.updates.get()
            self.log.info("plugin parameters updated: %s", self.plugin.params)
