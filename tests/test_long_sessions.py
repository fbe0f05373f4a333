"""A session of very many scans (field case 11): the writer's status, the session's status and the
report stay small however many scans close; every scan is still accounted, in the accounting file.

The writer runs in this process on its real socket; scans of one frame each are fed to its message
handling as a worker and a distributor would send them."""

import json
import time

import numpy as np
import zmq

from detstream.operator.status import Observed, PodView, status_patch
from detstream.services.dataplane.wire import END_OF_SCAN, RESULT, WIRE_VERSION, Header, decode
from detstream.services.launcher.runner import free_ports
from detstream.services.model.plan import LocalNetwork, build_plan
from detstream.services.model.session import load_session
from detstream.services.sinks.output import accounting_file, read_accounting
from detstream.services.stages.writer import RECENT_SCANS, WriterStage

from helpers import manifest

SCANS = 20_000  # (at 20,000 the old status was 0.9 MiB from the writer, 2.9 MiB of session status)


def feed(writer: WriterStage, scan: int) -> None:
    """One scan of one frame: its result, then its lane's end (every other scan's frame lost)."""
    written = scan % 2 == 0
    if written:
        result = Header(version=WIRE_VERSION, kind=RESULT, sender="worker-0", scan=scan, result="frames", scan_rows=1,
                        scan_cols=1, frames=[0], sector_masks=[1], part_counts=[1])
        writer.handle(decode([zmq.Frame(result.SerializeToString()), zmq.Frame(b"")], writer.geometry))
    end = Header(version=WIRE_VERSION, kind=END_OF_SCAN, sender="distributor-0", scan=scan, expected=1,
                 sent=int(written), lost=int(not written), scan_rows=1, scan_cols=1)
    parts = [] if written else [zmq.Frame(np.packbits([True]).tobytes())]
    writer.handle(decode([zmq.Frame(end.SerializeToString()), *parts], writer.geometry))
    writer.close_ready(time.monotonic())


def test_status_stays_small_and_every_scan_is_accounted(tmp_path):
    doc = manifest("long", scan={"rows": 1, "cols": 1, "count": SCANS}, detector={"rows": 8, "cols": 8, "sectors": 1},
                   plugin={"name": "noop"})
    plan = build_plan(load_session(doc), LocalNetwork(free_ports()))
    writer = WriterStage(plan, 0, output=tmp_path)
    writer.setup()
    writer.start()
    try:
        sizes = []
        for scan in range(SCANS):
            feed(writer, scan)
            if scan % 5_000 == 0 or scan == SCANS - 1:
                sizes.append(writer.status().ByteSize())
        status = writer.status()
    finally:
        writer.ctx.destroy(linger=0)

    assert status.scans_closed == SCANS and status.scans_unaccounted == 0
    total = status.closed_total
    assert (total.expected, total.written, total.lost) == (SCANS, SCANS // 2, SCANS // 2)
    assert [a.scan for a in status.scans] == list(range(SCANS - RECENT_SCANS, SCANS))
    assert max(sizes) < 1024, sizes  # bytes, at 0, 5,000, 10,000 ... scans (gRPC takes at most 4 MiB)

    observed = Observed(desired={"writer": 1}, pods=[PodView("long-writer-0", "writer", ready=True, phase="Running")],
                        stages={"long-writer-0": status}, started=True)
    patch = status_patch(observed, {}, 1, "x")
    assert len(json.dumps(patch)) < 16384  # bytes: far below etcd's 1.5 MiB
    assert (patch["phase"], patch["framesWritten"], patch["framesLost"]) == ("Succeeded", SCANS // 2, SCANS // 2)
    assert patch["closed"] == {"scans": SCANS, "expected": SCANS, "written": SCANS // 2, "partial": 0,
                               "lost": SCANS // 2, "duplicates": 0}

    every = read_accounting(accounting_file(tmp_path, "long"))
    assert [s["scan"] for s in every] == list(range(SCANS))
    assert all(s["expected"] == s["written"] + s["lost"] == 1 and s["unaccounted"] == 0 for s in every)
