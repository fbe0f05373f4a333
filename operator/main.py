"""`detstream operator`: the kopf operator, with liveness, metrics and namespace scoping.

Registered as a `detstream.commands` entry point, so the `detstream` command (in services,
which never imports the operator) offers it when the operator is installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys


def add_command(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("operator", help="run the Kubernetes operator (kopf) that reconciles StreamingSessions")
    scope = cmd.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[],
                       help="watch this namespace (repeatable; default: $POD_NAMESPACE or 'default')")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    cmd.add_argument("--liveness-port", type=int, default=8080, help="serves /healthz (default 8080; 0: off)")
    cmd.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics (default 9090; 0: off)")
    peers = cmd.add_mutually_exclusive_group()
    peers.add_argument("--peering", metavar="NAME",
                       help="act only while the highest priority of the replicas sharing the kopf peering "
                            "object NAME (KopfPeering in each watched namespace; ClusterKopfPeering with -A), "
                            "which must exist (the chart makes it with peering.enabled=true)")
    peers.add_argument("--standalone", action="store_true", help="no peering: a single replica (the default)")
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
    namespaces = args.namespace or [os.environ.get("POD_NAMESPACE", "default")]
    if args.peering:
        # kopf would wait, silently and for ever, for a peering object that is not there
        missing = missing_peering(args.peering, None if args.all_namespaces else namespaces)
        if missing:
            print(f"detstream operator: --peering {args.peering}: {missing}", file=sys.stderr)
            return 2
    if args.image:
        os.environ["DETSTREAM_IMAGE"] = args.image
    if args.metrics_port:
        start_http_server(args.metrics_port)
    kopf.run(clusterwide=args.all_namespaces, namespaces=[] if args.all_namespaces else namespaces,
             liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
             standalone=not args.peering, peering_name=args.peering,
             priority=args.priority)
    return 0


def missing_peering(name: str, namespaces: list[str] | None) -> str:
    """What is missing for kopf peering under `name` (`namespaces` None: cluster-wide), or ""."""
    from kubernetes.dynamic.exceptions import ResourceNotFoundError

    from detstream.operator.cluster import Cluster

    kind = "ClusterKopfPeering" if namespaces is None else "KopfPeering"
    fix = "create it (the chart does with peering.enabled=true), or run without --peering (a single replica)"
    try:
        peerings = Cluster().resource("kopf.dev/v1", kind)
    except ResourceNotFoundError:
        return f"the {kind} CRD is not installed: kubectl apply -f charts/detstream/crds/kopfpeerings.yaml, or {fix}"
    names = lambda ns: {p.metadata.name for p in peerings.get(namespace=ns).items}  # noqa: E731
    scopes: list[str | None] = list(namespaces) if namespaces is not None else [None]
    lacking = [ns for ns in scopes if name not in names(ns)]
    where = f" in namespace {', '.join(map(str, lacking))}" if namespaces else ""
    return f"no {kind} {name!r}{where}: {fix}" if lacking else ""
