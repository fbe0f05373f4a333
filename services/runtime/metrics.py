"""Prometheus metrics of a stage, with fixed labels `session`, `stage`, `replica`.

The hot loop only bumps plain integers in `Counters`; the collector reads them when Prometheus
scrapes, so counting costs no locks or syscalls per frame. The one histogram (processing
latency) is observed by workers, whose per-frame work dwarfs it.
"""

from __future__ import annotations

import resource
import threading
from collections import Counter as Tally
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from detstream.services.dataplane.wire import REJECT_REASONS

LABELS = ("session", "stage", "replica")
OUTCOMES = ("written", "partial", "lost", "duplicate", "dropped")
# Ten buckets a decade (the R10 series, steps of ~26 %) from 0.5 ms to 5 s: a quantile read from them is
# within a bucket's width of the truth, so a 20 ms delay reads as 20-25 ms (not 20-50 ms).
R10 = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
LATENCY_BUCKETS = tuple(b for e in range(-4, 1) for b in (round(m * 10.0 ** e, 6) for m in R10) if 0.0005 <= b <= 5.0)


@dataclass
class Counters:
    """What a stage counts; every field is exported (see README, "Metrics")."""
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    sequence_gaps: int = 0
    rejected: Tally = field(default_factory=lambda: Tally(dict.fromkeys(REJECT_REASONS, 0)))  # reason -> messages
    outcomes: Tally = field(default_factory=Tally)   # written/partial/lost/duplicate -> frames
    queue_depth: int = 0
    in_flight: int = 0
    credits: int = 0
    workers: int = 0
    workers_lost: int = 0
    resent: int = 0
    backpressure_s: float = 0.0   # a distributor's time with blocks waiting and no worker credit
    dropped: int = 0
    scan_progress: float = 0.0
    state: int = 0


class StageCollector:
    def __init__(self, counters: Counters, labels: tuple[str, str, str]):
        self.c = counters
        self.labels = list(labels)

    def _family(self, cls, name, doc, value, extra=None):
        names = list(LABELS) + ([extra[0]] if extra else [])
        fam = cls(name, doc, labels=names)
        for label, v in (value.items() if extra else [(None, value)]):
            fam.add_metric(self.labels + ([label] if extra else []), v)
        return fam

    def collect(self):
        c, C, G = self.c, CounterMetricFamily, GaugeMetricFamily
        yield self._family(C, "detstream_frames_received", "Frames received (a worker: frames assembled).", c.frames_in)
        yield self._family(C, "detstream_frames_sent", "Frames sent on (a distributor: frames routed).", c.frames_out)
        yield self._family(C, "detstream_bytes_received", "Payload bytes received.", c.bytes_in)
        yield self._family(C, "detstream_bytes_sent", "Payload bytes sent on.", c.bytes_out)
        yield self._family(C, "detstream_sequence_gaps", "Messages missing from a sender's sequence.",
                           c.sequence_gaps)
        yield self._family(C, "detstream_rejected_messages", "Malformed messages dropped, by reason.",
                           dict(c.rejected), extra=("reason",))
        yield self._family(C, "detstream_frames_outcome", "Frames by outcome.",
                           {o: c.outcomes.get(o, 0) for o in OUTCOMES}, extra=("outcome",))
        yield self._family(C, "detstream_workers_lost", "Workers declared dead.", c.workers_lost)
        yield self._family(C, "detstream_frames_resent", "Frames re-sent after their worker was declared dead.",
                           c.resent)
        yield self._family(C, "detstream_backpressure_seconds", "Seconds a distributor held blocks back "
                                                                "because no worker had credit.", c.backpressure_s)
        yield self._family(G, "detstream_queue_depth", "Frames waiting inside the stage.", c.queue_depth)
        yield self._family(G, "detstream_in_flight_frames", "Frames handed on and not yet acknowledged.",
                           c.in_flight)
        yield self._family(G, "detstream_credits", "Frames workers are ready to take now.", c.credits)
        yield self._family(G, "detstream_workers", "Live workers known to a distributor.", c.workers)
        yield self._family(G, "detstream_scan_progress", "Fraction of the current scan written.",
                           c.scan_progress)
        yield self._family(G, "detstream_stage_state", "Lifecycle state (0 starting, 1 configured, "
                                                       "2 running, 3 draining, 4 finished, 5 failed).", c.state)
        yield self._family(G, "detstream_peak_rss_bytes", "Peak resident memory of the stage process.",
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class StageMetrics:
    """The registry of one stage process, served over HTTP on its metrics port."""

    def __init__(self, counters: Counters, session: str, stage: str, replica: int | str):
        self.registry = CollectorRegistry()
        labels = (session, stage, str(replica))
        self.registry.register(StageCollector(counters, labels))
        self.latency = Histogram("detstream_processing_seconds", "Time a worker spends on one frame.",
                                 LABELS, registry=self.registry, buckets=LATENCY_BUCKETS).labels(*labels)

    def serve(self, host: str, port: int, on_bad_request=None, checks: dict | None = None) -> None:
        """Serve /metrics on host:port, and each of `checks` (a path such as /healthz -> a function
        returning (ok, why)) as a probe: 200 or 503, with `why` as the body. Probes cost the kubelet
        one HTTP request, not a process. A request that is not HTTP (or not a GET) is answered with
        an error and reported to `on_bad_request(description)`."""
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

        class Handler(WSGIRequestHandler):
            def log_message(self, format, *args):
                pass

            def send_error(self, code, message=None, explain=None):
                if on_bad_request is not None:
                    on_bad_request(f"HTTP {code}: {message}")
                super().send_error(code, message, explain)

        app = make_wsgi_app(self.registry)

        def only_get(environ, start_response):
            if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                if on_bad_request is not None:
                    on_bad_request(f"HTTP method {environ.get('REQUEST_METHOD')!r}")
                start_response("405 Method Not Allowed", [("Content-Type", "text/plain")])
                return [b"only GET\n"]
            check = (checks or {}).get(environ.get("PATH_INFO"))
            if check is not None:
                ok, why = check()
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
                return [f"{why}\n".encode()]
            return app(environ, start_response)

        httpd = make_server(host, port, only_get, ThreadingWSGIServer, handler_class=Handler)
        threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
