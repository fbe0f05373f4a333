"""Failpoints: faults a test injects into running stages from outside, through the environment.

    DETSTREAM_FAILPOINTS="writer-0:write-delay=0.02,worker-1:process-delay=0.05,distributor-0:setup-delay=3"

Stages inherit the variable from `detstream run`. Each entry is STAGE:POINT=SECONDS, STAGE being a
stage name (`worker-1`) or a role (`worker`, every replica). Points:
  setup-delay     seconds a stage waits before its setup (binding and connecting): a slow starter
  process-delay   seconds a worker adds to every frame it processes: a slow worker
  write-delay     seconds the writer adds to every result it takes: a slow writer (or disk)
Unset (the normal case), every point is 0 and costs one dictionary look-up at start-up.
"""

from __future__ import annotations

import os

from detstream.services.model.schema import did_you_mean

VARIABLE = "DETSTREAM_FAILPOINTS"
POINTS = ("setup-delay", "process-delay", "write-delay")


def parse(text: str) -> dict[tuple[str, str], float]:
    points = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        try:
            target, rest = entry.split(":", 1)
            point, value = rest.split("=", 1)
            if point not in POINTS:
                raise ValueError(f"unknown failpoint {point!r}{did_you_mean(point, POINTS)}; "
                                 f"known: {', '.join(POINTS)}")
            points[target.strip(), point.strip()] = float(value)
        except ValueError as exc:
            raise ValueError(f"{VARIABLE}: bad entry {entry!r} (want STAGE:POINT=SECONDS): {exc}") from None
    return points


def failpoint(stage: str, role: str, point: str) -> float:
    """The value of `point` for this stage (by name, else by role); 0 when not set."""
    points = parse(os.environ.get(VARIABLE, ""))
    return points.get((stage, point), points.get((role, point), 0.0))
