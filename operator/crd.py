"""The StreamingSession CustomResourceDefinition, generated from the session model.

`python -m detstream.operator.crd > charts/detstream/crds/streamingsessions.yaml` (`make crd`)
writes it; a test fails when the committed file is stale, so the schema the API server checks
and the model `detstream run` checks are one and the same.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from detstream.services.model.schema import markdown_reference, openapi
from detstream.services.model.session import API_GROUP, API_VERSION, KIND, SessionSpec

PLURAL = "streamingsessions"
PHASES = ("Pending", "Starting", "Ready", "Streaming", "Draining", "Succeeded", "Failed")

def _status_schema() -> dict:
    count = {"type": "integer", "format": "int64"}
    stage = {"type": "object", "properties": {"desired": {"type": "integer"}, "ready": {"type": "integer"},
                                              "state": {"type": "string"}}}
    scan: dict[str, Any] = {"type": "object", "properties": {k: dict(count) for k in
                                             ("scan", "expected", "written", "partial", "lost", "duplicates")}}
    volume = {"type": "object", "description": "A tomography scan's volume file: projections expected = used + lost "
              "(an angle some reconstructed slice lacks is lost), slices missing; complete: false when it lacks any.",
              "properties": {k: dict(count) for k in ("projectionsExpected", "projectionsUsed", "projectionsLost",
                                                      "slicesMissing")} | {"complete": {"type": "boolean"}}}
    scan["properties"].update(complete={"type": "boolean"}, file={"type": "string"}, volume=volume)
    condition = {"type": "object", "required": ["type", "status"], "properties": {
        "type": {"type": "string"}, "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"}, "message": {"type": "string"},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
        "observedGeneration": {"type": "integer", "format": "int64"}}}
    return {"type": "object", "description": "What the operator observes; written only by the operator.",
            "x-kubernetes-preserve-unknown-fields": True,
            "properties": {
                "phase": {"type": "string", "enum": list(PHASES)},
                "observedGeneration": {"type": "integer", "format": "int64"},
                "conditions": {"type": "array", "items": condition,
                               "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
                "stages": {"type": "object", "additionalProperties": stage},
                "scans": {"type": "array", "items": scan,
                          "description": "The open scans and the last 16 closed ones (every scan: the writer's "
                                         "SESSION-accounting.jsonl)."},
                "closed": {"type": "object", "description": "Every closed scan, summed.",
                           "properties": {k: dict(count) for k in ("scans", "expected", "written", "partial", "lost",
                                                                   "duplicates")}},
                "workerReplicas": {"type": "integer"},
                "workers": {"type": "string", "description": "ready/desired workers"},
                "workerSelector": {"type": "string"},
                "framesWritten": dict(count), "framesLost": dict(count),
                "throughputGbps": {"type": "number"},
                "ingest": {"type": "array", "items": {"type": "string"},
                           "description": "Addresses external sources connect to, one per lane."},
                "liveView": {"type": "object", "description": "The live view (spec.liveView): the writer's Service "
                             "and port, its in-cluster url, the kubectl port-forward command, the Ingress url if any.",
                             "properties": {k: {"type": "string"} for k in ("service", "url", "portForward", "ingress")}
                             | {"port": {"type": "integer"}}},
                "message": {"type": "string", "description": "The last failure, if any."},
            }}


def crd() -> dict:
    # No CEL rules (x-kubernetes-validations): Kubernetes 1.20 rejects the field; the operator checks
    # the rules that span fields (services.session.check_spec) and reports them in SpecValid.
    spec_schema = openapi(SessionSpec)
    spec_schema["properties"]["plugin"]["properties"]["params"]["description"] += (
        " See the README's plugin table.")
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Workers", "type": "string", "jsonPath": ".status.workers", "description": "ready/desired"},
        {"name": "Written", "type": "integer", "jsonPath": ".status.framesWritten"},
        {"name": "Lost", "type": "integer", "jsonPath": ".status.framesLost"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": "streamingsession",
                      "shortNames": ["sess"], "categories": ["detstream"]},
            "scope": "Namespaced",
            "versions": [{
                "name": API_VERSION, "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A detector streaming session: sources, distributors, workers "
                                   "and a writer, run as pods and reconciled by the detstream operator.",
                    "required": ["spec"],
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "metadata": {"type": "object"}, "spec": spec_schema,
                                   "status": _status_schema()}}},
                "subresources": {"status": {}, "scale": {
                    "specReplicasPath": ".spec.workers.replicas", "statusReplicasPath": ".status.workerReplicas",
                    "labelSelectorPath": ".status.workerSelector"}},
                "additionalPrinterColumns": columns,
            }],
        },
    }


START, END = "<!-- reference:start (generated by `make crd`) -->\n", "<!-- reference:end -->"


def readme_with_reference(text: str) -> str:
    """The README with its manifest reference table regenerated from the session model."""
    head, rest = text.split(START)
    return head + START + markdown_reference(SessionSpec) + END + rest.split(END, 1)[1]


def main() -> None:
    if sys.argv[1:2] == ["--readme"]:
        path = Path(sys.argv[2])
        path.write_text(readme_with_reference(path.read_text()))
        return
    sys.stdout.write("# Generated by `make crd` from the session model (services/model/session.py): do not edit.\n")
    yaml.safe_dump(crd(), sys.stdout, sort_keys=False, width=100)


if __name__ == "__main__":
    main()
