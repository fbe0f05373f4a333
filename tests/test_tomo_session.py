"""Tomography as a session (`detstream run`, real processes): routing by slice, the tomo-fbp plugin in the
workers and the volume written by the writer, against astra's FBP of the same corrected sinograms and against
the phantom; a worker killed mid-scan, whose band is named missing in the file; and one restarted mid-scan (as
Kubernetes restarts its pod), which gets the scan's darks and flats again and goes on with its band."""

from __future__ import annotations

import functools
import json
import re
import signal

import h5py
import numpy as np
import pytest
from test_faults import run_exact
from test_restarts import restart

from detstream.services.dataplane.accounting import COMPLETE, MISSING, PARTIAL
from detstream.services.model.session import load_session
from detstream.services.plugins.flatfield import FlatDark, minus_log
from detstream.services.plugins.tomo_fbp import astra_fbp, to_centre
from detstream.services.sources.tomo_simulator import TomoScan, ground_truth
from detstream.v1.control_pb2 import FINISHED

from helpers import manifest, wait_for

SIZE, ANGLES, DARKS, FLATS = 64, 90, 4, 10
FRAMES = DARKS + FLATS + ANGLES
AXIS = (SIZE - 1) / 2 + 1.5   # the simulator's centreOffset 1.5
FAST = {"heartbeatS": 0.1, "workerTimeoutS": 1.0, "endOfScanTimeoutS": 1.5,
        "startupTimeoutS": 30}
CORRELATION = 0.8   # with the phantom (measured 0.88: 90 noisy angles of a 64-pixel detector)


def tomo_doc(name, rate=None, **spec):
    source = {"kind": "tomo-simulator", "replicas": 2, "tomoSimulator": {"seed": 1, "centreOffset": 1.5}}
    if rate:
        source["rate"] = rate
    return manifest(name, scan={"rows": 1, "cols": FRAMES}, detector={"rows": SIZE, "cols": SIZE, "sectors": 2},
                    tomography={"angles": ANGLES, "darks": DARKS, "flats": FLATS}, source=source,
                    workers={"replicas": 2}, plugin={"name": "tomo-fbp", "params": {"centre": AXIS}},
                    transport={**FAST, **spec.pop("transport", {})}, **spec)


@functools.cache
def simulated_sinograms():
    """The simulated scan's corrected sinograms (slices, angles, cols), and its angles (radians)."""
    spec = load_session(tomo_doc("ref")).spec
    sim = TomoScan(spec)
    frames = [sim.frame(0, f) for f in range(FRAMES)]
    field = FlatDark((SIZE, SIZE))
    for f in range(DARKS):
        field.add_dark(frames[f])
    for f in range(DARKS, DARKS + FLATS):
        field.add_flat(frames[f])
    return (np.stack([minus_log(field.transmission(frames[DARKS + FLATS + i])) for i in range(ANGLES)], axis=1),
            np.radians(spec.tomography.angles_deg()))


def fbp(sinograms, theta):
    """astra's FBP of each slice's sinogram: (slices, cols, cols)."""
    return np.stack([astra_fbp(to_centre(s, AXIS), theta) for s in sinograms])


@pytest.fixture(scope="module")
def reference():
    """astra's FBP of the simulated scan's corrected sinograms (slices, cols, cols), and the phantom."""
    return fbp(*simulated_sinograms()), ground_truth(load_session(tomo_doc("ref")).spec)


def relative_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def run(doc, tmp_path, disturb=None):
    """A session run to its end (test_faults.run_exact: it succeeds, its one scan closed, none unaccounted)."""
    live, err, report, scan = run_exact(doc, tmp_path, disturb=disturb)
    assert scan["expected"] == scan["written"] + scan["lost"], scan
    return live, err, report, scan


def volume_row(err: str) -> list[str]:
    """Scan 0's row of the volume table `detstream run` ends with (its terminal summary)."""
    assert "projections used" in err and "slices missing" in err, err
    return re.search(r"\n\W*0\W+(\d+\W+\d+\W+\d+\W+\d+\W+(?:true|false))", err)[1].split()[::2]


def test_a_scan_routed_by_slice_reconstructs_as_astra_does(tmp_path, reference):
    volume_ref, truth = reference
    _, err, _, scan = run(tomo_doc("tomo"), tmp_path)
    assert (scan["written"], scan["partial"], scan["lost"]) == (FRAMES, 0, 0)
    # the terminal summary shows the volume's accounting: projections expected, used, lost, slices missing, complete
    assert volume_row(err) == [str(ANGLES), str(ANGLES), "0", "0", "true"]
    assert scan["volume"] == {"projections_expected": ANGLES, "projections_used": ANGLES, "projections_lost": 0,
                              "slices_missing": 0, "complete": True}
    with h5py.File(scan["file"]) as f:
        volume = f["exchange/data"][()]
        acc = f["accounting"]
        assert acc.attrs["complete"] and (acc["frame_status"][()] == COMPLETE).all()
        assert (acc["frame_bands"][()] == 3).all()             # both bands' results of every frame
        assert (acc["slice_angles_missing"][()] == 0).all()
        for status in ("projection_status", "slice_status", "frame_status"):   # the codes are named
            attrs = acc[status].attrs
            assert (attrs["COMPLETE"], attrs["PARTIAL"], attrs["MISSING"]) == (COMPLETE, PARTIAL, MISSING)
            assert "0 " in attrs["meaning"] and "2 " in attrs["meaning"]
        assert f["exchange/theta"].attrs["units"] == "degrees"
        assert json.loads(f["process/reconstruction"].attrs["plugin_params"]) == {"centre": AXIS}
    assert relative_rms(volume, volume_ref) < 1e-3
    assert np.corrcoef(volume.ravel(), truth.ravel())[0, 1] > CORRELATION


def test_a_worker_killed_mid_scan_loses_its_band_by_name(tmp_path, reference):
    """Locally nothing restarts worker-1: its band's remaining blocks cannot be routed, the lane gives them up
    (released to the sources) and the scan closes. Band 0 has every frame; the file names band 1's slices missing
    and the frames band 1 never did partial; nothing is unaccounted."""
    volume_ref, _ = reference

    def kill(live):
        live.wait_started(frames=30)
        live.signal("worker-1", signal.SIGKILL)

    live, err, report, scan = run(tomo_doc("tkill", rate=40), tmp_path, disturb=kill)
    assert any("worker-1 exited with code -9" in i for i in report["incidents"])
    assert "bands without a worker" in live.log("distributor-0")
    assert (scan["written"], scan["lost"]) == (FRAMES, 0) and 0 < scan["partial"] < FRAMES
    assert scan["volume"]["slices_missing"] == SIZE // 2 and not scan["volume"]["complete"]
    assert volume_row(err)[3:] == [str(SIZE // 2), "false"]
    with h5py.File(scan["file"]) as f:
        volume = f["exchange/data"][()]
        acc = f["accounting"]
        assert not acc.attrs["complete"]
        assert list(acc["slice_status"][()]) == [COMPLETE] * (SIZE // 2) + [MISSING] * (SIZE // 2)
        status = acc["frame_status"][()]
        assert set(status) <= {COMPLETE, PARTIAL} and (status == PARTIAL).sum() == scan["partial"]
    assert np.isnan(volume[SIZE // 2:]).all()
    assert relative_rms(volume[:SIZE // 2], volume_ref[:SIZE // 2]) < 1e-3


def test_a_worker_restarted_mid_scan_gets_the_darks_and_flats_again_and_goes_on_with_its_band(local_session):
    """SIGKILL worker-1 mid-scan and run it again at the same address (the test plays the kubelet, as Kubernetes
    restarts ordinal 1): the sources send the new process the scan's darks and flats again (REFERENCE) with its
    band's remaining projections, so band 1 lacks only the angles the dead process had summed, and its slices are
    astra's FBP of the angles it has. Every frame is accounted for exactly."""
    # slow enough that the scan goes on after the restart; the lanes wait for band 1's worker to come back
    local = local_session(tomo_doc("trestart", rate=10, transport={**FAST, "endOfScanTimeoutS": 20}))
    worker = next(p for p in local.stages if p.stage.name == "worker-1")
    wait_for(lambda: worker.client.status().frames_out >= DARKS + FLATS + 10, 60, "worker-1 summing projections")
    restarted = restart(local, "worker-1")
    wait_for(lambda: local.writer().client.status().state == FINISHED, 120, "the writer to close the scan")
    (scan,) = local.writer().client.status().scans
    assert (scan.expected, scan.written, scan.partial, scan.lost) == (FRAMES, FRAMES, 0, 0), scan
    assert restarted.log_path.read_text().count(" ready (control") == 2
    assert "UNACCOUNTED" not in local.writer().log_path.read_text()
    with h5py.File(scan.file) as f:
        volume = f["exchange/data"][()]
        acc = f["accounting"]
        lacking, angles = acc["slice_angles_missing"][()], acc["projection_status"][()]
        assert list(acc["slice_status"][()]) == [COMPLETE] * SIZE and not acc.attrs["complete"]
    used = angles == COMPLETE                      # band 0 has every angle: those band 1 has too
    print(f"\nworker-1 restarted mid-scan: band 1 lacks angles {np.flatnonzero(~used).tolist()}")
    assert (lacking[:SIZE // 2] == 0).all() and (lacking[SIZE // 2:] == (~used).sum()).all()
    assert 0 < (~used).sum() < ANGLES - 10 and set(angles[~used]) == {PARTIAL}
    sinos, theta = simulated_sinograms()
    assert relative_rms(volume[:SIZE // 2], fbp(sinos[:SIZE // 2], theta)) < 1e-3
    assert relative_rms(volume[SIZE // 2:], fbp(sinos[SIZE // 2:, used], theta[used])) < 1e-3
