"""`python -m node_agent --kubeconfig K -n NAMESPACE --workdir DIR` (from tests/): run until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from .agent import NodeAgent
from .api import Api


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m node_agent", description=__doc__)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--namespace", "-n", action="append", required=True, help="run this namespace's pods")
    parser.add_argument("--workdir", type=Path, required=True, help="pods' folders (volumes, logs)")
    parser.add_argument("--node-name", default=f"detstream-test-node-{os.getpid()}")
    parser.add_argument("--pod-network", default="", help="first three octets of the pods' loopback /24, "
                                                          "e.g. 127.0.0 (default: derived from the pid)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    NodeAgent(Api(args.kubeconfig), args.node_name, args.namespace, args.workdir, args.pod_network).run(stop)


if __name__ == "__main__":
    main()
