"""What ZeroMQ CURVE (spec.security.dataPlane: curve) costs in throughput, measured side by side.

    python -m benchmarks.curve [--messages 2000] [--scan 32] [--repeats 2]      (from the repository root)

Two measurements, each plain and encrypted in the same run, alternated, best of --repeats:
  socket   one PUSH -> PULL pair (two contexts, so the encryption runs in each side's I/O thread),
           --messages 4D Camera sectors of 576x144 uint16 (165,888 bytes): the transport alone
  session  a whole `detstream run` (simulator => 2 workers => writer, routed by a distributor,
           the noop plugin so the framework is what is measured) over a --scan x --scan scan of
           576x576 frames: every data-plane hop encrypted, what a user sees
Printed: GB/s of each, and the ratio encrypted/plain; written to benchmarks/results/curve.json.
Nothing asserts on the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
import zmq

SECTOR_BYTES = 576 * 144 * 2
RESULTS = Path(__file__).resolve().parent / "results" / "curve.json"


def socket_gbps(messages: int, curve: bool) -> float:
    """Sectors through one PUSH -> PULL connection on 127.0.0.1, GB/s."""
    server_ctx, client_ctx = zmq.Context(), zmq.Context()
    pull, push = server_ctx.socket(zmq.PULL), client_ctx.socket(zmq.PUSH)
    for s in (pull, push):
        s.linger = 0
        s.sndhwm = s.rcvhwm = 16
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        pull.curve_secretkey, pull.curve_publickey, pull.curve_server = server_secret, server_public, True
        push.curve_publickey, push.curve_secretkey = zmq.curve_keypair()
        push.curve_serverkey = server_public
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    payload = zmq.Frame(os.urandom(SECTOR_BYTES))

    go = threading.Event()

    def send():
        push.send(payload, copy=False)  # the first message: connected and handshaken
        go.wait()
        for _ in range(messages):
            push.send(payload, copy=False)

    sender = threading.Thread(target=send)
    sender.start()
    pull.recv()
    t0 = time.perf_counter()
    go.set()
    for _ in range(messages):
        pull.recv(copy=False)
    elapsed = time.perf_counter() - t0
    sender.join()
    server_ctx.destroy(0)
    client_ctx.destroy(0)
    return messages * SECTOR_BYTES / elapsed / 1e9


def session_gbps(scan: int, curve: bool, workdir: Path) -> dict:
    """One `detstream run` of the noop pipeline; its report's throughput."""
    name = "curve" if curve else "plain"
    doc = {"apiVersion": "detstream.io/v1alpha1", "kind": "StreamingSession", "metadata": {"name": name},
           "spec": {"scan": {"rows": scan, "cols": scan}, "source": {"replicas": 2}, "workers": {"replicas": 2},
                    "plugin": {"name": "noop"},
                    "security": {"dataPlane": "curve" if curve else "plain"}}}
    manifest = workdir / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    report = workdir / f"{name}.json"
    result = subprocess.run([sys.executable, "-m", "detstream.services.launcher.cli", "run", str(manifest), "--output",
                             str(workdir / name), "--report", str(report), "--quiet"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {name} session failed:\n{result.stderr}")
    data = json.loads(report.read_text())
    return {"gbps": data["throughput_gbps"], "frames_per_second": data["frames_per_second"],
            "duration_s": data["duration_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.curve", description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="sectors through the socket pair (default 2000)")
    parser.add_argument("--scan", type=int, default=32, help="the session's scan is SCAN x SCAN frames (default 32)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, best kept (default 2)")
    args = parser.parse_args(argv)

    socket = {"plain": 0.0, "curve": 0.0}
    session = {"plain": {"gbps": 0.0}, "curve": {"gbps": 0.0}}
    with tempfile.TemporaryDirectory(prefix="detstream-curve-") as tmp:
        for _ in range(args.repeats):
            for mode in ("plain", "curve"):
                socket[mode] = max(socket[mode], socket_gbps(args.messages, mode == "curve"))
                run = session_gbps(args.scan, mode == "curve", Path(tmp))
                if run["gbps"] > session[mode]["gbps"]:
                    session[mode] = run
    out = {
        "sector_bytes": SECTOR_BYTES, "messages": args.messages, "scan": [args.scan, args.scan],
        "repeats": args.repeats, "cores": os.cpu_count(), "machine": platform.machine(),
        "zmq": zmq.zmq_version(), "socket_gbps": socket, "session": session,
        "ratio_socket": socket["curve"] / socket["plain"],
        "ratio_session": session["curve"]["gbps"] / session["plain"]["gbps"],
    }
    print(f"socket pair (576x144 uint16 sectors): plain {socket['plain']:.3f} GB/s, curve {socket['curve']:.3f} GB/s, "
          f"ratio encrypted/plain {out['ratio_socket']:.2f}")
    print(f"whole session ({args.scan}x{args.scan} scan of 576x576 frames, noop): plain "
          f"{session['plain']['gbps']:.3f} GB/s ({session['plain']['frames_per_second']:,.0f} frames/s), curve "
          f"{session['curve']['gbps']:.3f} GB/s ({session['curve']['frames_per_second']:,.0f} frames/s), "
          f"ratio encrypted/plain {out['ratio_session']:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
