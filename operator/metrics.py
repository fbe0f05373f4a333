"""Per-session gauges of the final accounting, from the `status` the operator writes.

The stages' own counters vanish with their pods (a finished session is scaled to zero seconds
after it succeeds, often before a scrape) and `increase()` over them is an estimate. The operator
outlives the pods and holds the writer's exact accounting of every closed scan in `status.closed`,
so it exports it: `detstream_session_frames{namespace, session, outcome}`, for as long as the session
exists. The chart's ServiceMonitor honours these labels (honorLabels), so
`namespace` is the session's, not the operator's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import Gauge

OUTCOMES = ("expected", "written", "partial", "lost")

SESSION_FRAMES = Gauge("detstream_session_frames", "Frames of a session's closed scans, by outcome "
                       "(expected, written, partial, lost), from its status.", ["namespace", "session", "outcome"])


def export(namespace: str, session: str, status: Mapping[str, Any]) -> None:
    """Set the session's gauges from its status (every outcome, 0 until a scan closes)."""
    closed = status.get("closed") or {}
    for outcome in OUTCOMES:
        SESSION_FRAMES.labels(namespace, session, outcome).set(closed.get(outcome, 0))


def forget(namespace: str, session: str) -> None:
    """Drop the gauges of a deleted session."""
    for outcome in OUTCOMES:
        try:
            SESSION_FRAMES.remove(namespace, session, outcome)
        except KeyError:
            pass  # never exported
