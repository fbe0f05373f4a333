"""Tomography: the scan layout in the manifest, the simulator and DXchange sources, flat/dark and Paganin, the band
reconstruction while projections arrive (against astra's own FBP and the phantom), and the volume file."""

from __future__ import annotations

import json
import subprocess

import h5py
import numpy as np
import pytest
import tifffile
import yaml

from detstream.services.model.schema import SpecError
from detstream.services.model.session import load_session
from detstream.services.plugins import PluginContext
from detstream.services.plugins.flatfield import FlatDark, minus_log
from detstream.services.plugins.paganin import halo_rows, paganin, paganin_filter, wavelength_m
from detstream.services.plugins.tomo_fbp import ReconParams, SliceBand, TomoFBP, astra_fbp, check_params, to_centre
from detstream.services.sinks.volume import VolumeFile
from detstream.services.sources import Frame, ScanEnd, SourceError, source_class
from detstream.services.sources.tomo_simulator import TomoScan, ground_truth

from helpers import DETSTREAM, manifest

COLS, ROWS, ANGLES, DARKS, FLATS = 96, 24, 120, 4, 6
FRAMES = DARKS + FLATS + ANGLES


def tomo_manifest(**spec):
    base = {"scan": {"rows": 1, "cols": FRAMES}, "detector": {"rows": ROWS, "cols": COLS, "sectors": 2},
            "source": {"kind": "tomo-simulator", "tomoSimulator": {"centreOffset": 2.5, "seed": 3}},
            "tomography": {"angles": ANGLES, "darks": DARKS, "flats": FLATS}, "plugin": {"name": "noop"}}
    return manifest("tomo", **{**base, **spec})


@pytest.fixture(scope="module")
def spec():
    return load_session(tomo_manifest()).spec


@pytest.fixture(scope="module")
def frames(spec):
    """The whole simulated scan, frame by frame, as the source's replicas send it (sectors joined)."""
    kind = source_class("tomo-simulator")(spec, 0)
    items = list(kind)
    assert isinstance(items[-1], ScanEnd) and items[-1] == ScanEnd(0, FRAMES)
    return [np.hstack([p for _, p in item.sectors]) for item in items if isinstance(item, Frame)]


def corrected_sinograms(frames, lo, hi):
    """(slices, angles, cols) -log of the flat/dark-corrected projections, built without the band."""
    field = FlatDark((hi - lo, COLS))
    for f in range(DARKS):
        field.add_dark(frames[f][lo:hi])
    for f in range(DARKS, DARKS + FLATS):
        field.add_flat(frames[f][lo:hi])
    return np.stack([minus_log(field.transmission(frames[DARKS + FLATS + i][lo:hi])) for i in range(ANGLES)], axis=1)


def test_a_tomography_scan_lays_its_frames_out_in_the_manifest():
    tomo = load_session(tomo_manifest()).spec.tomography
    assert [tomo.role(f) for f in (0, DARKS, DARKS + FLATS, FRAMES - 1)] == [
        ("dark", 0), ("flat", 0), ("projection", 0), ("projection", ANGLES - 1)]
    assert tomo.angles_deg()[1] == pytest.approx(180 / ANGLES)
    with pytest.raises(SpecError, match=r"spec.scan: a tomography scan's positions are its 130 frames .* "
                                        r"write scan: \{rows: 1, cols: 130\}; got 8x8"):
        load_session(tomo_manifest(scan={"rows": 8, "cols": 8}))
    with pytest.raises(SpecError, match="spec.tomography: is required with source.kind tomo-simulator"):
        load_session(manifest(source={"kind": "tomo-simulator"}, plugin={"name": "noop"}))
    with pytest.raises(SpecError, match=r"spec.tomography: tomo-fbp reconstructs a tomography scan slice by slice: "
                                        r"add spec.tomography"):
        load_session(manifest(plugin={"name": "tomo-fbp"}))
    # a tomography source without spec.tomography, and tomo-fbp: one line for the field, not two
    with pytest.raises(SpecError) as missing:
        load_session(manifest(source={"kind": "tomo-simulator"}, plugin={"name": "tomo-fbp"}))
    assert [e.path for e in missing.value.errors].count("spec.tomography") == 1
    # no plugin section: electron counting of projections is refused, naming the fix
    no_plugin = tomo_manifest()
    del no_plugin["spec"]["plugin"]
    with pytest.raises(SpecError, match=r"spec.plugin.name: electron-counting's results are electron events .* "
                                        r"name tomo-fbp to reconstruct the volume, or noop to pass the frames"):
        load_session(no_plugin)
    with pytest.raises(SpecError, match="spec.source.tomoSimulator.photons: flats would reach"):
        load_session(tomo_manifest(detector={"rows": ROWS, "cols": COLS, "dtype": "uint8"}))
    # a 4D-STEM manifest is what it was: no tomography section appears in it
    assert "tomography" not in load_session(manifest()).manifest["spec"]


def test_the_simulator_is_reproducible_and_sends_flats_and_darks_first(spec, frames):
    again = TomoScan(spec)
    np.testing.assert_array_equal(again.frame(0, DARKS + FLATS + 7), frames[DARKS + FLATS + 7])
    darks, flats, projections = frames[0], frames[DARKS], frames[DARKS + FLATS]
    assert darks.mean() == pytest.approx(100, rel=0.05)          # darkLevel
    assert flats.mean() == pytest.approx(100 + again.beam.mean(), rel=0.01)   # photons x beam profile + dark
    assert again.beam.mean() == pytest.approx(10000 * 0.95, rel=0.02)         # photons, the profile 0.8-1
    assert projections.min() < flats.min()                        # the sample absorbs
    assert ground_truth(spec).shape == (ROWS, COLS, COLS)


@pytest.mark.parametrize("centre", ["given", "auto"])
def test_a_band_reconstructed_as_projections_arrive_equals_astras_fbp(spec, frames, centre):
    """The band's slices, fed frames in a shuffled order (darks and flats not first), equal astra's FBP of the
    same corrected sinograms (relative RMS < 1e-3), and resemble the phantom (correlation > 0.9)."""
    lo, count = 6, 12
    axis = (COLS - 1) / 2 + 2.5
    params = ReconParams(centre=axis if centre == "given" else "auto", batch=5, max_pending=ANGLES)
    band = SliceBand(spec.tomography, ROWS, COLS, lo, count, params)
    assert band.rows_needed() == (lo, lo + count)
    for f in np.random.default_rng(0).permutation(FRAMES):
        band.add(int(f), frames[f][lo:lo + count])
    if centre == "given":
        halfway = band.volume()
        assert np.isfinite(halfway).all()   # the live view has slices before the end
    volume = band.finish()
    sinos = corrected_sinograms(frames, lo, lo + count)
    theta = np.radians(spec.tomography.angles_deg())
    reference = np.stack([astra_fbp(to_centre(s, axis), theta) for s in sinos])
    assert band.accounting()["centre"] == pytest.approx(axis, abs=0.3)
    if centre == "given":
        rel = np.sqrt(np.mean((volume - reference) ** 2) / np.mean(reference ** 2))
        assert rel < 1e-3, rel
    truth = ground_truth(spec, slice(lo, lo + count))
    corr = np.corrcoef(volume.ravel(), truth.ravel())[0, 1]
    assert corr > 0.9, corr
    assert band.accounting()["projections_used"] == ANGLES and band.accounting()["complete"]


def test_missing_projections_are_named_and_the_rest_reconstructed(spec, frames):
    lo, count = 10, 4
    band = SliceBand(spec.tomography, ROWS, COLS, lo, count, ReconParams(centre=(COLS - 1) / 2 + 2.5))
    lost = {DARKS + FLATS + 3, DARKS + FLATS + 50}
    for f in range(FRAMES):
        if f not in lost:
            band.add(f, frames[f][lo:lo + count])
    band.add(DARKS + FLATS + 5, frames[DARKS + FLATS + 5][lo:lo + count])   # a duplicate counts once
    volume = band.finish()
    acc = band.accounting()
    assert (acc["projections_expected"], acc["projections_used"], acc["projections_lost"]) == (ANGLES, ANGLES - 2, 2)
    assert list(acc["lost_angles_index"]) == [3, 50] and not acc["complete"]
    keep = np.ones(ANGLES, bool)
    keep[[3, 50]] = False
    sinos = corrected_sinograms(frames, lo, lo + count)[:, keep]
    theta = np.radians(spec.tomography.angles_deg())[keep]
    reference = np.stack([astra_fbp(to_centre(s, (COLS - 1) / 2 + 2.5), theta) for s in sinos])
    assert np.sqrt(np.mean((volume - reference) ** 2) / np.mean(reference ** 2)) < 1e-3


def test_a_band_restarted_mid_scan_takes_the_darks_and_flats_again_and_each_counts_once(spec, frames):
    """A worker restarted mid-scan gets its band's remaining projections and the darks and flats again (the sources'
    REFERENCE), maybe also as frames sent again: each dark and flat counts once, and the band is astra's FBP of the
    angles it had."""
    lo, count, first = 10, 4, 30
    band = SliceBand(spec.tomography, ROWS, COLS, lo, count, ReconParams(centre=(COLS - 1) / 2 + 2.5))
    later = range(DARKS + FLATS + first, FRAMES)
    for f in list(later[:5]) + list(range(DARKS + FLATS)) * 2 + list(later[5:]) + [0, DARKS]:
        band.add(f, frames[f][lo:lo + count])          # projections first wait (pending) for the darks and flats
    volume = band.finish()
    acc = band.accounting()
    assert (acc["darks_used"], acc["flats_used"]) == (DARKS, FLATS)
    assert (acc["projections_used"], list(acc["lost_angles_index"])) == (ANGLES - first, list(range(first)))
    keep = np.arange(ANGLES) >= first
    sinos = corrected_sinograms(frames, lo, lo + count)[:, keep]
    theta = np.radians(spec.tomography.angles_deg())[keep]
    reference = np.stack([astra_fbp(to_centre(s, (COLS - 1) / 2 + 2.5), theta) for s in sinos])
    assert np.sqrt(np.mean((volume - reference) ** 2) / np.mean(reference ** 2)) < 1e-3
    assert TomoFBP.references(spec) == range(DARKS + FLATS)


def test_a_frame_of_a_finished_scan_never_makes_a_new_band_of_it(spec, frames):
    """After a scan's final output, a frame of it again (a re-send; a dark or flat a source sends again on
    connecting) is left out: the plugin would otherwise build a band of it alone and later send that as the scan's
    slices, in place of the whole band's. Its result (for the accounting) still comes."""
    lo, count = 8, 4
    plugin = TomoFBP({"centre": (COLS - 1) / 2 + 2.5}, PluginContext(spec, 0, (lo, lo + count), (lo, count)))

    def strips(f):   # the band's rows of frame f, as its two sector strips
        return np.hsplit(frames[f][lo:lo + count], 2)

    for f in range(FRAMES):
        plugin.process_frame(0, f, strips(f), [])
    assert plugin.scan_complete(0)
    slices, used = plugin.scan_output(0, final=True)
    assert np.unpackbits(used)[:ANGLES].all()
    for f in (0, DARKS, DARKS + FLATS + 7):   # a dark, a flat, a projection, again
        assert plugin.process_frame(0, f, strips(f), []) == [b""]
    assert not plugin.scan_complete(0)
    assert plugin.scan_output(0, final=False) is None and plugin.scan_preview(0, [0]) is None
    plugin.process_frame(1, DARKS + FLATS, strips(DARKS + FLATS), [])   # the next scan starts a band as ever
    assert plugin.scan_output(1, final=False) is not None


def test_reconstruction_parameters_are_checked_by_name():
    assert check_params({"filter": "hann", "centre": 47.5, "ringRemoval": "sorting", "batch": 4}) == []
    assert dict(check_params({"filter": "ramp", "centre": "middle", "batch": 0, "paganin": {"energyKeV": 20},
                              "size": 1})) == {
        "size": "unknown parameter; allowed: batch, centre, filter, maxPending, paganin, ringRemoval",
        "filter": "must be one of ram-lak, shepp-logan, cosine, hamming, hann, none; got 'ramp'",
        "centre": "must be the rotation axis' detector column (a number) or auto; got 'middle'",
        "batch": "must be an integer >= 1; got 0",
        "paganin": "must give energyKeV (photon energy, keV), distanceM (sample-detector distance, m), "
                   "pixelSizeM (detector pixel size, m), deltaBeta (delta / beta of the material)"}


def test_paganin_filters_each_frequency_as_the_paper_says():
    """A sinusoidal transmission comes out damped by 1 / (1 + pi lambda z (delta/beta) f^2); a flat one unchanged."""
    assert wavelength_m(12.398419843) == pytest.approx(1e-10, rel=1e-9)
    pixel, z, energy, db = 1e-6, 0.1, 20.0, 200.0
    rows, cols = 64, 256
    f = 1 / (8 * pixel)   # a period of 8 pixels
    x = np.arange(cols) * pixel
    image = np.tile(1 + 0.1 * np.cos(2 * np.pi * f * x), (rows, 1)).astype(np.float32)
    out = paganin(image, pixel, z, energy, db)
    expected = 1 / (1 + np.pi * wavelength_m(energy) * z * db * f ** 2)
    middle = slice(96, 160)   # away from the edges, where the padding is not the sinusoid's continuation
    (amplitude, offset), *_ = np.linalg.lstsq(np.column_stack([np.cos(2 * np.pi * f * x[middle]),
                                                                np.ones(64)]), out[rows // 2, middle], rcond=None)
    assert amplitude == pytest.approx(0.1 * expected, rel=0.02) and offset == pytest.approx(1, rel=1e-3)
    np.testing.assert_allclose(paganin(np.full((8, 8), 0.5, np.float32), pixel, z, energy, db), 0.5, rtol=1e-6)
    assert paganin_filter((4, 4), pixel, z, energy, db)[0, 0] == 1.0


def test_a_band_with_paganin_takes_a_halo_of_rows(spec, frames):
    pag = {"energyKeV": 20.0, "distanceM": 0.05, "pixelSizeM": 4e-6, "deltaBeta": 100.0}
    band = SliceBand(spec.tomography, ROWS, COLS, 8, 8, ReconParams(paganin=pag))
    halo = halo_rows(4e-6, 0.05, 20.0, 100.0)
    assert halo == 7 and band.rows_needed() == (8 - halo, 16 + halo)
    lo, hi = band.rows_needed()
    for f in range(FRAMES):
        band.add(f, frames[f][lo:hi])
    assert np.isfinite(band.finish()).all()
    with pytest.raises(ValueError, match="rows of shape"):
        band.add(0, frames[0][8:16])


def write_dxchange(path, frames, theta, drop=None):
    with h5py.File(path, "w") as f:
        data = {"data": np.stack(frames[DARKS + FLATS:]), "data_white": np.stack(frames[DARKS:DARKS + FLATS]),
                "data_dark": np.stack(frames[:DARKS]), "theta": theta}
        for name, value in data.items():
            if name != drop:
                f[f"exchange/{name}"] = value


def dx_manifest(path, **tomography):
    return tomo_manifest(source={"kind": "dxchange", "path": str(path)},
                         tomography={"angles": ANGLES, "darks": DARKS, "flats": FLATS, **tomography})


def test_a_dxchange_file_replays_as_the_scan_it_holds(tmp_path, frames, spec):
    path = tmp_path / "scan.h5"
    write_dxchange(path, frames, spec.tomography.angles_deg())
    items = list(source_class("dxchange")(load_session(dx_manifest(path)).spec, 0))
    replayed = [np.hstack([p for _, p in i.sectors]) for i in items if isinstance(i, Frame)]
    assert len(replayed) == FRAMES and items[-1] == ScanEnd(0, FRAMES)
    for a, b in zip(replayed, frames):
        np.testing.assert_array_equal(a, b)


def test_a_dxchange_file_that_does_not_fit_is_refused_by_name(tmp_path, frames, spec):
    kind = source_class("dxchange")
    missing = tmp_path / "missing.h5"
    write_dxchange(missing, frames, spec.tomography.angles_deg(), drop="data_white")
    with pytest.raises(SourceError, match="lacks /exchange/data_white"):
        kind(load_session(dx_manifest(missing)).spec, 0)
    path = tmp_path / "scan.h5"
    write_dxchange(path, frames, np.linspace(0, 180, ANGLES))   # the last angle at 180: endpoint included
    with pytest.raises(SourceError, match=r"write spec.tomography.arcDegrees: 181\.5"):
        kind(load_session(dx_manifest(path)).spec, 0)
    with pytest.raises(SourceError, match=r"/exchange/data_white holds 6 frames .* says 4 \(spec.tomography.flats \+ "
                                          r"spec.tomography.flatsAfter\)"):
        kind(load_session(dx_manifest(path, darks=6, flats=4)).spec, 0)
    with pytest.raises(SourceError, match="does not exist"):
        kind(load_session(dx_manifest(tmp_path / "nowhere.h5")).spec, 0)
    with pytest.raises(SpecError, match="spec.source.path: is required when source.kind is dxchange"):
        load_session(dx_manifest(""))


def test_the_volume_file_records_the_volume_and_its_accounting(tmp_path):
    angles = np.arange(10) * 18.0
    sink = VolumeFile(tmp_path / "vol.h5", (6, 8, 8), angles, voxel_size=1.5e-6, tiff=True)
    band = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    sink.write_band(0, band)
    used = np.ones(10, bool)
    used[7] = False
    totals = sink.record({"filter": "ram-lak", "centre": 3.5, "paganin": {"deltaBeta": 100.0}}, used)
    assert totals == {"projections_expected": 10, "projections_used": 9, "projections_lost": 1,
                      "slices_missing": 2, "complete": False}
    assert not (tmp_path / "vol.h5").exists()
    sink.close()
    with h5py.File(tmp_path / "vol.h5") as f:
        data = f["exchange/data"]
        assert data.dtype == np.float32 and data.chunks == (1, 8, 8) and data.attrs["units"] == "m"
        np.testing.assert_array_equal(data[:4], band)
        assert np.isnan(data[4:]).all()
        assert list(f["accounting/projection_status"][()]) == [0] * 7 + [2] + [0] * 2
        assert f["accounting"].attrs["projections_lost"] == 1 and not f["accounting"].attrs["complete"]
        assert f["process/reconstruction"].attrs["centre"] == 3.5
        assert f["process/reconstruction/paganin"].attrs["deltaBeta"] == 100.0
        np.testing.assert_array_equal(f["exchange/theta"][()], angles)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "vol_tiff" / "slice_00002.tif"), band[2])
    with pytest.raises(FileExistsError, match="results are never overwritten"):
        VolumeFile(tmp_path / "vol.h5", (6, 8, 8), angles)
    aborted = VolumeFile(tmp_path / "other.h5", (6, 8, 8), angles)
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.h5", "vol_tiff"]


def test_a_tomography_session_streams_every_frame_through_the_pipeline(tmp_path):
    """A plugin of raw frames (noop) carries a tomography scan as any scan, whole frames routed by block:
    every projection, flat and dark is accounted for."""
    doc = tomo_manifest(workers={"replicas": 1}, lanes=2)
    path = tmp_path / "tomo.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    result = subprocess.run(DETSTREAM + ["run", str(path), "--output", str(out), "--report", str(out / "r.json")],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    (scan,) = json.loads((out / "r.json").read_text())["scans"]
    assert (scan["expected"], scan["written"], scan["lost"]) == (FRAMES, FRAMES, 0)
