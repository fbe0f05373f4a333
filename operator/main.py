"""`detstream operator`: the kopf operator, with liveness, metrics and namespace scoping.

Registered as a `detstream.commands` entry point, so the `detstream` command (in services,
which never imports the operator) offers it when the operator is installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import random


def add_command(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("operator", help="run the Kubernetes operator (kopf) that reconciles StreamingSessions")
    scope = cmd.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[],
                       help="watch this namespace (repeatable; default: $POD_NAMESPACE or 'default')")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    cmd.add_argument("--liveness-port", type=int, default=8080, help="serves /healthz (default 8080; 0: off)")
    cmd.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics (default 9090; 0: off)")
    cmd.add_argument("--peering", default="detstream",
                     help="kopf peering object: of several replicas only one acts (default: detstream)")
    cmd.add_argument("--standalone", action="store_true", help="no peering (a single replica)")
    cmd.add_argument("--priority", type=int, default=random.randint(1, 2**31 - 1),
                     help="peering priority; the highest acts (default: random, so of identical replicas "
                          "exactly one acts: kopf pauses all peers of equal priority)")
    cmd.add_argument("--image", default=os.environ.get("DETSTREAM_IMAGE"),
                     help="image of the stage pods (default: $DETSTREAM_IMAGE)")
    cmd.set_defaults(run=run)


def run(args) -> int:
    import kopf
    from prometheus_client import start_http_server

    import detstream.operator.handlers  # noqa: F401  (registers the handlers)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.image:
        os.environ["DETSTREAM_IMAGE"] = args.image
    if args.metrics_port:
        start_http_server(args.metrics_port)
    namespaces = args.namespace or [os.environ.get("POD_NAMESPACE", "default")]
    kopf.run(clusterwide=args.all_namespaces, namespaces=[] if args.all_namespaces else namespaces,
             liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
             standalone=args.standalone, peering_name=None if args.standalone else args.peering,
             priority=args.priority)
    return 0
