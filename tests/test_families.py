"""Source kinds, result sinks and roles as registries: a new kind is one module plus its registration.

The end-to-end proof installs a throwaway package (a dist-info folder with entry points, on the path)
holding a source kind that pushes frames in its own order and a sink for the `frames` result kind,
and runs a real local session with them.
"""

import json
import os
import subprocess
import textwrap

import numpy as np
import pytest

from detstream.services.model.plan import ROLES
from detstream.services.model.schema import SpecError
from detstream.services.model.session import load_session
from detstream.services.sinks import ResultSink, sink_class
from detstream.services.sinks.electron_events import ElectronEventsFile
from detstream.services.sources import Frame, ScanEnd, source_class, source_kinds
from detstream.services.sources.simulator import Simulator
from detstream.services.stages import stage_class

from helpers import DETSTREAM, manifest

SMALL = {"rows": 8, "cols": 12, "sectors": 3}

# A source kind as a detector that pushes: whole frames in an order it chooses, now and then nothing
# (None), a scan's end after its frames. Pixels say where they belong: scan, frame and column.
TINY_KINDS = '''
import os
import numpy as np
from detstream.services.model.schema import FieldError
from detstream.services.sinks import ResultSink
from detstream.services.sources import Frame, ScanEnd, Source


def pixels(spec, scan, frame):
    d = spec.detector
    cols = np.arange(d.cols, dtype=np.uint16)
    return np.broadcast_to(scan * 10000 + frame * 100 + cols, (d.rows, d.cols)).astype(np.uint16)


class Shuffled(Source):
    summary = "frames in a detector's own order"

    @classmethod
    def check(cls, spec):
        if spec.source.replicas != 1:
            return [FieldError("spec.source.replicas", "shuffled sends whole frames from one replica; give 1")]
        return []

    def __iter__(self):
        spec, width = self.spec, self.spec.detector.cols // self.spec.detector.sectors
        for scan in range(spec.scan.count):
            order = np.random.default_rng(scan).permutation(spec.scan.frames)
            for n, frame in enumerate(order):
                if n % 3 == 0:
                    yield None
                whole = pixels(spec, scan, int(frame))
                yield Frame(scan, int(frame), [(s, np.ascontiguousarray(whole[:, s * width:(s + 1) * width]))
                                               for s in range(spec.detector.sectors)])
            yield ScanEnd(scan, spec.scan.frames)


class RawFrames(ResultSink):
    result = "frames"

    @classmethod
    def open(cls, path, spec, scan_shape, metadata):
        return cls(path, scan_shape, (spec.detector.rows, spec.detector.cols), metadata, spec.detector.dtype)

    def __init__(self, path, scan_shape, frame_shape, metadata=None, dtype="uint16"):
        super().__init__(path, scan_shape, frame_shape, metadata)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.frames = np.zeros((scan_shape[0] * scan_shape[1], *frame_shape), dtype)
        self.written = None

    def write_result(self, position, parts):
        self.frames[position] = np.hstack([np.frombuffer(p, self.frames.dtype).reshape(self.frames.shape[1], -1)
                                           for p in parts])

    def add_metadata(self, metadata):
        pass

    def record_arrivals(self, written, sectors_arrived, sectors, totals):
        self.written = written

    def close(self):
        with open(self.partial, "wb") as out:
            np.savez(out, frames=self.frames, written=self.written)
        os.replace(self.partial, self.path)
        return self.path

    def abort(self):
        self.partial.unlink(missing_ok=True)
'''


@pytest.fixture
def tiny_kinds(tmp_path):
    """A folder that, on the path, is an installed package registering the `shuffled` source kind and
    the `frames` result sink through real entry points."""
    folder = tmp_path / "site"
    info = folder / "detstream_tiny_kinds-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: detstream-tiny-kinds\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[detstream.sources]\nshuffled = tiny_kinds:Shuffled\n\n"
                                           "[detstream.sinks]\nframes = tiny_kinds:RawFrames\n")
    (folder / "tiny_kinds.py").write_text(textwrap.dedent(TINY_KINDS))
    return folder


def problems(doc) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_session(doc)
    return [str(e) for e in caught.value.errors]


def test_unknown_source_kind_is_named_with_the_closest_kind():
    (problem,) = problems(manifest(source={"kind": "simulater"}))
    assert problem.startswith("spec.source.kind: must be one of simulator, replay, external")
    assert "did you mean simulator?" in problem
    with pytest.raises(LookupError, match="'detstream.sources' entry point"):
        source_class("simulater")


def test_each_kind_checks_its_own_settings():
    assert problems(manifest(source={"kind": "replay"})) == ["spec.source.path: is required when source.kind is replay"]
    assert problems(manifest(detector={"rows": 2})) == [
        "spec.detector.rows: must be >= 3 with the simulator source (an electron event spreads over 3x3 pixels); got 2"]
    load_session(manifest(source={"kind": "replay", "path": "frames.npy"}, detector={"rows": 2}))


def test_grid_sources_split_sectors_among_replicas_and_end_each_scan():
    doc = manifest(scan={"rows": 2, "cols": 3, "count": 2}, detector=SMALL, source={"replicas": 2})
    spec = load_session(doc).spec
    sim = Simulator(spec.source.simulator, spec.detector)
    items = [list(source_class("simulator")(spec, replica)) for replica in (0, 1)]
    assert [type(i) for i in items[0]] == ([Frame] * 6 + [ScanEnd]) * 2
    assert [i.scan for i in items[0]] == [0] * 7 + [1] * 7
    assert items[0][6] == ScanEnd(0, 6)
    for a, b in zip(items[0], items[1]):
        if isinstance(a, Frame):
            assert [s for s, _ in a.sectors] == [0, 2] and [s for s, _ in b.sectors] == [1]
            sectors = dict([*a.sectors, *b.sectors])
            strips = [np.frombuffer(sectors[s], sim.dtype).reshape(sim.rows, sim.width) for s in range(3)]
            np.testing.assert_array_equal(np.hstack(strips), sim.frame(a.scan, a.frame))


def test_the_external_kind_runs_no_source_of_its_own():
    spec = load_session(manifest(source={"kind": "external"})).spec
    with pytest.raises(RuntimeError, match="--connect"):
        source_class("external")(spec, 0)


def test_sinks_by_result_kind_never_overwrite(tmp_path):
    assert sink_class("events") is ElectronEventsFile and issubclass(ElectronEventsFile, ResultSink)
    assert sink_class("frames") is None  # counted, not kept
    spec = load_session(manifest(detector=SMALL)).spec
    assert ElectronEventsFile.refusal([np.array([0, 95], np.uint32)], spec) is None
    assert ElectronEventsFile.refusal([np.array([96], np.uint32)], spec) == "range"
    assert ElectronEventsFile.refusal([b"123"], spec) == "size"
    assert ElectronEventsFile.refusal([b"", b""], spec) == "size"
    (tmp_path / "scan.h5").write_bytes(b"an earlier run")
    with pytest.raises(FileExistsError, match="results are never overwritten"):
        ElectronEventsFile.open(tmp_path / "scan.h5", spec, (2, 2), {})
    assert (tmp_path / "scan.h5").read_bytes() == b"an earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.h5"]


def test_roles_are_defined_once():
    assert [stage_class(role).role for role in ROLES] == list(ROLES)
    with pytest.raises(LookupError, match="the roles: source, distributor, worker, writer"):
        stage_class("collector")
    result = subprocess.run(DETSTREAM + ["stage", "collector"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "choose from 'source', 'distributor'" in result.stderr


def test_a_kind_registered_by_an_installed_package_is_a_kind(tiny_kinds, monkeypatch):
    monkeypatch.syspath_prepend(str(tiny_kinds))
    assert source_kinds() == ("simulator", "replay", "external", "dectris", "tomo-simulator", "dxchange", "shuffled")
    load_session(manifest(source={"kind": "shuffled"}))
    assert problems(manifest(source={"kind": "shuffled", "replicas": 2})) == [
        "spec.source.replicas: shuffled sends whole frames from one replica; give 1"]
    assert sink_class("frames").__name__ == "RawFrames"


def test_a_new_source_kind_and_sink_run_a_session(tiny_kinds, tmp_path, write_manifest):
    doc = manifest("tiny", scan={"rows": 3, "cols": 4, "count": 2}, detector=SMALL, lanes=2,
                   source={"kind": "shuffled"}, plugin={"name": "noop"})
    path = write_manifest(doc)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tiny_kinds), os.environ.get("PYTHONPATH", "")]))
    without = subprocess.run(DETSTREAM + ["validate", str(path)], capture_output=True, text=True, timeout=60)
    assert without.returncode == 2 and "spec.source.kind: must be one of simulator, replay, external" in without.stderr
    result = subprocess.run(DETSTREAM + ["run", str(path), "--output", str(out), "--report", str(out / "report.json"),
                                         "--quiet"], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    scans = json.loads((out / "report.json").read_text())["scans"]
    assert [(s["scan"], s["expected"], s["written"], s["lost"], s["unaccounted"]) for s in scans] == [
        (0, 12, 12, 0, 0), (1, 12, 12, 0, 0)]
    cols = np.arange(12, dtype=np.uint16)
    for s in scans:
        with np.load(s["file"]) as saved:
            assert saved["written"].all()
            for frame in range(12):
                np.testing.assert_array_equal(saved["frames"][frame],
                                              np.broadcast_to(s["scan"] * 10000 + frame * 100 + cols, (8, 12)))
