"""How a benchmark reports: one printed line per figure, and the same figures as JSON.

Every figure that matters is a ratio to a baseline measured in the same run (these machines are
shared and noisy: a ratio holds, a lone absolute time does not). The JSON also records the
machine and its load, so a result can be read next to the conditions it was measured in.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        memory = 0
    import numpy
    import zmq
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--short", "services"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"cpu": model or platform.processor(), "cores": len(os.sched_getaffinity(0)), "memory_bytes": memory,
            "kernel": platform.release(), "python": platform.python_version(), "numpy": numpy.__version__,
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "commit": commit.strip(),
            "services_modified": bool(dirty.strip())}


class Report:
    """Figures of one benchmark: `figure()` prints a line and keeps it; `save()` writes the JSON."""

    def __init__(self, name: str, **settings):
        self.name = name
        self.settings = settings
        self.figures: dict[str, dict] = {}
        self.extra: dict = {}
        self.started = time.time()
        self.load_before = os.getloadavg()

    def figure(self, key: str, text: str, **values) -> None:
        """One printed line; `values` (numbers, ratios) go to the JSON under `key`."""
        print(f"{self.name}: {text}", flush=True)
        self.figures[key] = {"text": text, **values}

    def note(self, text: str) -> None:
        print(f"{self.name}:   ({text})", flush=True)
        self.extra.setdefault("notes", []).append(text)

    def save(self) -> dict:
        result = {"benchmark": self.name, "command": " ".join([Path(sys.executable).name, "-m", "benchmarks",
                                                                 self.name]),
                  "settings": self.settings, "figures": self.figures, **self.extra,
                  "machine": machine(), "load_average_before": self.load_before,
                  "load_average_after": os.getloadavg(), "seconds": round(time.time() - self.started, 1),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        path.write_text(json.dumps(result, indent=1, default=float) + "\n")
        print(f"{self.name}: wrote {path.relative_to(ROOT)}", flush=True)
        return result


def gbps(frames: float, seconds: float, frame_bytes: int) -> float:
    return frames * frame_bytes / seconds / 1e9 if seconds > 0 else 0.0
