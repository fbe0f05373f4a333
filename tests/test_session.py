"""The session model: defaults, validation messages with field paths, the plan, the schema."""

import dataclasses
import json

import pytest

from detstream.operator.resources import cluster_plan, plan_configmap
from detstream.services.dataplane.wire import BLOCK, FRAME_BITS, Geometry, Header, frame_key
from detstream.services.model.plan import ClusterNetwork, LocalNetwork, Plan, build_plan
from detstream.services.model.schema import SpecError, openapi
from detstream.services.model.session import (
    Detector,
    Scan,
    SessionSpec,
    Source,
    Transport,
    Workers,
    load_session,
    read_manifest,
)

from helpers import ROOT, manifest


def test_example_manifest_is_valid_and_has_defaults():
    session = read_manifest(ROOT / "examples" / "4dstem-local.yaml")
    spec = session.spec
    assert (spec.detector.rows, spec.detector.cols, spec.detector.sectors) == (576, 576, 4)
    assert spec.scan.frames == 32 * 32 and spec.scan.count == 1
    assert spec.plugin.name == "electron-counting"
    assert spec.transport.high_water_mark > 0


BAD = [
    ({"scan": {"rows": "32", "cols": 32}}, "spec.scan.rows", "must be an integer"),
    ({"scan": {"rows": -4, "cols": 32}}, "spec.scan.rows", "must be >= 1"),
    ({"scan": {"cols": 32}}, "spec.scan.rows", "is required"),
    ({"plugin": {"name": "no-such-plugin"}}, "spec.plugin.name", "unknown plugin 'no-such-plugin'"),
    ({"plugin": {"name": "electron-counting", "params": {"samples": 0}}}, "spec.plugin.params.samples", ">= 1"),
    ({"plugin": {"name": "electron-counting", "params": {"backgroundThreshold": 5}}},
     "spec.plugin.params.xrayThreshold", "need both"),
    ({"workers": {"replicas": 2, "credit": 3}}, "spec.workers.credit", "unknown field (did you mean credits?); "
                                                                       "allowed: replicas, credits"),
    ({"transport": {"high_water_mark": 3}}, "spec.transport.high_water_mark", "(did you mean highWaterMark?)"),
    ({"transport": {"onFull": "Drop"}}, "spec.transport.onFull", "got 'Drop' (did you mean drop?)"),
    ({"plugin": {"name": "electron-count"}}, "spec.plugin.name", "'electron-count' (did you mean electron-counting?)"),
    ({"plugin": {"name": "electron-counting", "params": {"xrayThreshhold": 9}}}, "spec.plugin.params.xrayThreshhold",
     "unknown parameter (did you mean xrayThreshold?)"),
    ({"detector": {"sectors": 5}}, "spec.detector.sectors", "must divide"),
    ({"detector": {"dtype": "int7"}}, "spec.detector.dtype", "must be one of"),
    ({"source": {"kind": "replay"}}, "spec.source.path", "required when source.kind is replay"),
    ({"source": {"replicas": 8}}, "spec.source.replicas", "<= detector.sectors"),
    ({"lanes": 0}, "spec.lanes", "must be >= 1"),
    ({"transport": {"workerTimeoutS": "soon"}}, "spec.transport.workerTimeoutS", "must be a number"),
    # What JSON and the Kubernetes API (int64) cannot carry is refused here too.
    ({"transport": {"workerTimeoutS": float("inf")}}, "spec.transport.workerTimeoutS", "finite number"),
    ({"source": {"rate": float("nan")}}, "spec.source.rate", "finite number"),
    ({"source": {"simulator": {"seed": 2**64}}}, "spec.source.simulator.seed", "fits in 64 bits"),
    # The simulator draws each electron event with its 3x3 neighbourhood inside the frame.
    ({"detector": {"rows": 2, "cols": 8, "sectors": 1}}, "spec.detector.rows", ">= 3 with the simulator"),
    # The simulator's bank of distinct frames: at least one, and within a source replica's memory.
    ({"source": {"simulator": {"distinctFrames": 0}}}, "spec.source.simulator.distinctFrames", ">= 1"),
    ({"source": {"simulator": {"distinctFrames": 1000}}}, "spec.source.simulator.distinctFrames",
     "1000 frames of 576x576 uint16 would hold 633 MiB in a source replica (at most 512 MiB): lower it to 809"),
    # Field case 02: the counting plugin cannot count float frames right (stempy wraps them).
    ({"detector": {"dtype": "float32"}}, "spec.detector.dtype", "electron-counting handles uint8, uint16, uint32 "
                                                                "frames; got float32"),
    # Strings that end up in Kubernetes objects: refused here as the API server would refuse them there.
    ({"kubernetes": {"nodeSelector": {"gpu": 1}}}, "spec.kubernetes.nodeSelector.gpu", "quote numbers"),
    ({"kubernetes": {"nodeSelector": {"-zone": "a"}}}, "spec.kubernetes.nodeSelector.-zone", "label key"),
    ({"output": {"volumeClaim": "My_Scans"}}, "spec.output.volumeClaim", "PersistentVolumeClaim's name"),
    ({"kubernetes": {"externalSourceRanges": ["lab-net"]}}, "spec.kubernetes.externalSourceRanges", "CIDR"),
]


@pytest.mark.parametrize("spec, path, message", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_manifest_names_the_field(spec, path, message):
    with pytest.raises(SpecError) as err:
        load_session(manifest(**spec))
    assert any(e.path == path and message in e.message for e in err.value.errors), err.value.errors


def test_every_problem_is_reported_at_once():
    doc = manifest(scan={"rows": 0, "cols": "x"}, lanes=-1)
    doc["metadata"]["name"] = "Not_A_Name"
    doc["kind"] = "Pod"
    with pytest.raises(SpecError) as err:
        load_session(doc)
    paths = {e.path for e in err.value.errors}
    assert {"kind", "metadata.name", "spec.scan.rows", "spec.scan.cols", "spec.lanes"} <= paths


def test_plan_local_has_every_stage_with_distinct_ports():
    session = load_session(manifest(lanes=2, source={"replicas": 2}, workers={"replicas": 3}))
    plan = build_plan(session, LocalNetwork(iter(range(30000, 31000))))
    names = [s.name for s in plan.stages]
    assert names == ["source-0", "source-1", "distributor-0", "distributor-1", "worker-0", "worker-1", "worker-2",
                     "writer-0"]
    ports = [p for s in plan.stages for p in s.ports.values()]
    assert len(ports) == len(set(ports))
    assert plan.endpoint("distributor", 1, "work").startswith("tcp://127.0.0.1:")
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.session_spec() == session.spec


def test_plan_cluster_uses_service_names_and_fixed_ports():
    session = load_session(manifest(name="s1"))
    plan = build_plan(session, ClusterNetwork())
    assert plan.endpoint("writer", 0, "results") == "tcp://s1-writer-0:7203"
    assert plan.stage("distributor", 0).ports["route"] == 7200
    assert plan.stage("worker", 0).ports["data"] == 7204


def test_external_source_has_no_source_stage():
    session = load_session(manifest(source={"kind": "external", "replicas": 2}))
    plan = build_plan(session, ClusterNetwork())
    assert not plan.of_role("source")


def test_openapi_schema_documents_every_field():
    schema = openapi(SessionSpec)
    assert schema["required"] == ["scan"]

    def walk(node, path):
        for key, prop in node.get("properties", {}).items():
            assert prop.get("description"), f"{path}.{key} has no description"
            walk(prop, f"{path}.{key}")
    walk(schema, "spec")
    assert schema["properties"]["workers"]["properties"]["replicas"]["minimum"] == 0
    kinds = schema["properties"]["source"]["properties"]["kind"]["enum"]
    assert kinds == ["simulator", "replay", "external", "dectris", "tomo-simulator", "dxchange"]


def test_readme_reference_is_generated_from_the_model():
    from detstream.operator.crd import readme_with_reference

    readme = (ROOT / "README.md").read_text()
    assert readme_with_reference(readme) == readme, "run `make crd` to regenerate the README's reference"
    assert "`spec.transport.workerTimeoutS`" in readme


def limits(cls) -> dict:
    """The largest value the schema allows for each bounded field of a section."""
    return {f.name: f.metadata["maximum"] for f in dataclasses.fields(cls) if f.metadata.get("maximum") is not None}


def test_every_schema_limit_is_carried_by_the_wire_the_plan_and_the_cluster():
    """A session at every maximum the schema allows: each header field holds its largest value, a pixel
    index fits the file's uint32, and the plan fits its ConfigMap (1 MiB)."""
    detector, scan, workers = limits(Detector), limits(Scan), limits(Workers)
    sectors = detector["sectors"]
    doc = manifest("a" * 40, scan={"rows": scan["rows"], "cols": scan["cols"], "count": scan["count"]},
                   detector={"rows": detector["rows"], "cols": sectors * 1024, "sectors": sectors},
                   lanes=limits(SessionSpec)["lanes"],
                   # one distinct simulated frame: a sector of this detector is 128 MiB
                   source={"replicas": limits(Source)["replicas"], "simulator": {"distinctFrames": 1}},
                   workers={"replicas": workers["replicas"], "credits": workers["credits"]},
                   transport={"highWaterMark": limits(Transport)["high_water_mark"]})
    session = load_session(doc)
    spec = session.spec
    frames = spec.scan.frames
    header = Header(kind=BLOCK, scan=spec.scan.count - 1,
                    block=(frames - 1) // spec.transport.block_frames, frames=[frames - 1], sectors=[sectors - 1],
                    sector_masks=[(1 << sectors) - 1], part_counts=[1], shape=[detector["rows"], 1024],
                    scan_rows=spec.scan.rows, scan_cols=spec.scan.cols, expected=frames, sent=frames,
                    lost=frames, credit=spec.workers.credits, acked=[frame_key(spec.scan.count - 1, frames - 1)])
    assert Header.FromString(header.SerializeToString()) == header
    assert spec.scan.count <= Geometry.of(spec).max_scan and frames < 1 << FRAME_BITS
    assert detector["rows"] * detector["cols"] <= 1 << 32  # pixel indices in the file are uint32
    plan = cluster_plan(session)
    assert len(json.dumps(plan_configmap(session, plan))) < 1 << 20


@pytest.mark.parametrize("name", ["4dstem-au", "a" * 41, "demo-", "Demo", "demo.1"])
def test_a_name_kubernetes_cannot_derive_objects_from_is_refused(name):
    """Field case 12: the Services NAME-ROLE-INDEX must be DNS-1035 labels, the pods' labels <= 63 characters."""
    with pytest.raises(SpecError) as err:
        load_session(manifest(name))
    (error,) = err.value.errors
    assert error.path == "metadata.name" and "start with a letter" in error.message and "at most 40" in error.message


def test_the_longest_name_allowed_is_taken():
    assert load_session(manifest("a" + "-9" * 19 + "z")).name == "a" + "-9" * 19 + "z"


def test_a_misspelled_top_level_key_is_named_with_the_closest_one():
    doc = manifest()
    doc["sepc"] = doc.pop("spec")
    with pytest.raises(SpecError) as err:
        load_session(doc)
    assert [str(e) for e in err.value.errors] == [
        "sepc: unknown field (did you mean spec?); allowed: apiVersion, kind, metadata, spec, status",
        "spec: is required"]


def test_float_frames_are_valid_for_a_plugin_that_takes_them():
    session = load_session(manifest(detector={"dtype": "float32"}, plugin={"name": "noop"}))
    assert session.spec.detector.dtype == "float32"
