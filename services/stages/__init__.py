"""The pipeline stages, one module per role."""

from __future__ import annotations


def stage_class(role: str):
    from detstream.services.stages.aggregator import AggregatorStage
    from detstream.services.stages.distributor import DistributorStage
    from detstream.services.stages.source import SourceStage
    from detstream.services.stages.worker import WorkerStage
    from detstream.services.stages.writer import WriterStage

    classes = {c.role: c for c in (SourceStage, AggregatorStage, DistributorStage, WorkerStage, WriterStage)}
    return classes[role]
