"""The `external` source kind: the frames come from senders outside the session.

The session runs no source of its own (its plan has no source stages); acquisition machines run
`detstream stage source --manifest SESSION.yaml --connect ADDRESS ...` (a simulator or replay source
of their own) and connect to the distributors' route ports, which the operator then exposes
(spec.kubernetes.ingestServiceType, externalSourceRanges), and send their pixels to the workers' data
ports (see README "Detectors outside the cluster").
"""

from __future__ import annotations

from detstream.services.sources import Source, SourceError


class External(Source):
    """Registered so that `spec.source.kind: external` is a kind like the others; never built in a session."""

    summary = "detector-side senders connect in (`detstream stage source --connect`)"

    def __init__(self, spec, replica):
        raise SourceError("spec.source.kind is external: the session runs no source; senders outside it run "
                          "`detstream stage source --manifest SESSION.yaml --connect ADDRESS`")
