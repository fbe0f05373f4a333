"""Plugins used by the benchmarks only (registered for a run by `sessions.bench_plugins()`)."""

from __future__ import annotations

import time

from detstream.services.plugins import Plugin


class Sleep(Plugin):
    """A fixed service time per frame and almost no CPU: `serviceS` seconds asleep, then an 8-byte
    result. Throughput with N workers is then N / serviceS as long as the distribution keeps every
    worker busy, whatever the machine's cores."""

    result = "frames"

    @classmethod
    def check_params(cls, params):
        return [(k, "bench-sleep takes serviceS only") for k in params if k != "serviceS"]

    def configure(self, params):
        super().configure(params)
        self.service_s = float(params.get("serviceS", 0.01))

    def process(self, sectors, parts):
        time.sleep(self.service_s)
        return [b"\0" * 8]
