"""Tomography: reconstructing while acquiring (a `tomo-fbp` session) against reconstructing after the scan.

    python -m benchmarks.tomo [--size 256] [--angles 361] [--repeats 1] [--batches 8 32] [--workers 1 2 4]
                              [--rate R | --no-paced]

One simulated scan (tomo-simulator's phantom, 10 darks, 20 flats, ANGLES projections over 180 degrees of a SIZE x
SIZE uint16 detector, rotation axis 1.5 px off centre), rendered once and replayed from a DXchange file by the
`dxchange` source (so the simulator's own rendering, ~36 ms of CPU per 256x256 projection, is not measured on the
same 2 cores: a detector does not render). Measured, alternated in rounds:

  reference   what a file-based pipeline does once the scan is on disk, in this process on one core: correct the
              projections (flat/dark, -log, the axis shifted to the centre) into sinograms, then astra's CPU FBP
              of each slice over all its angles (`astra_fbp`, the call tomo-fbp makes)
  session     a `tomo-fbp` session (source -> distributor -> workers routed by slice -> writer) with each of
              WORKERS workers and the first of BATCHES (projections per back-projection call), and 2 workers
              with the other batches; timed from the writer's Start to the volume file closed. Its volume is
              checked against the reference's (relative RMS < 1e-3)
  paced       a 2-worker session fed at --rate projections/s (default: half of round 1's 2-worker rate with the
              first batch), so processing keeps up, as at a beamline
  files       the file-based way, whole: 1. write: the frames (darks, flats, projections) and theta written to a
              DXchange HDF5 file one frame at a time as they come, fsync'ed (as an acquisition hands a file on);
              2. read: the file read back; 3. reconstruct: the reference's correction and FBP, in 2 processes
              (one band of slices each, as the 2-worker session); 4. volume: written and closed in the session's
              layout (VolumeFile). Once as fast as the machine goes, once paced at the paced session's rate
              (frames written as a detector delivers them); its volume is checked as the sessions'

Printed: projections/s absorbed by each session and the reference's projections/s (angles / its time), as ratios
session / reference; the CPU time per projection of every process; scaling with the workers (projections/s with
each count, rate(N) / (N x rate(1)); this machine has few cores, the output says how many: more workers than cores
share them); the paced session's turnaround (the source's log line for the scan's end, its last projection taken,
to the volume file under its final name, wall clock) against the reference's reconstruction time (reference /
turnaround: how much sooner the volume is there than when reconstructed after the scan; an unpaced source runs
ahead of the workers by its window, so their turnaround, in the JSON, is mostly the backlog); the file-based way's
time (each part) against the 2-worker session's time to the volume on disk, files / streaming, as fast as the
machine goes and at the paced rate. Results: benchmarks/results/tomo.json.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np

from benchmarks.files import paced, sync
from benchmarks.report import Report
from benchmarks.sessions import SessionRun, manifest
from benchmarks.turnaround import scan_sent, wait_for
from detstream.services.model.session import load_session
from detstream.services.plugins.flatfield import FlatDark, minus_log
from detstream.services.plugins.tomo_fbp import astra_fbp, to_centre
from detstream.services.sinks.volume import VolumeFile
from detstream.services.sources.dxchange import DATASETS
from detstream.services.sources.tomo_simulator import TomoScan

DARKS, FLATS, OFFSET = 10, 20, 1.5
ACCURACY = 1e-3   # the session's volume against the reference's, relative RMS (issue 18)
PACE = 0.5        # the paced session's rate, of round 1's 2-worker rate (at 0.7 a loaded machine fell behind)
PAIR = 2          # workers of the paced session and of the other batches; the file way's processes
Scan = tuple[np.ndarray, np.ndarray, np.ndarray]   # darks, flats, projections: each (frames, rows, cols) uint16


def scan_doc(name: str, size: int, angles: int, **spec) -> dict:
    """A tomography session of the benchmark (the source and plugin sections given by `spec`)."""
    return manifest(name, scan={"rows": 1, "cols": DARKS + FLATS + angles},
                    detector={"rows": size, "cols": size, "sectors": 1, "dtype": "uint16"},
                    tomography={"angles": angles, "arcDegrees": 180, "darks": DARKS, "flats": FLATS}, **spec)


def render(size: int, angles: int) -> tuple[Scan, np.ndarray]:
    """The simulated scan's frames and its angles (degrees)."""
    spec = load_session(scan_doc("render", size, angles, source={
        "kind": "tomo-simulator", "tomoSimulator": {"seed": 1, "centreOffset": OFFSET}})).spec
    sim = TomoScan(spec)
    frames = np.stack([sim.frame(0, f) for f in range(DARKS + FLATS + angles)])
    return (frames[:DARKS], frames[DARKS:DARKS + FLATS], frames[DARKS + FLATS:]), spec.tomography.angles_deg()


def write_dxchange(path: Path, scan: Scan, theta_deg: np.ndarray, rate: float = 0.0, fsync: bool = False) -> Path:
    """`scan` written to `path` in DXchange's layout (what the `dxchange` source reads) one frame at a time, as a
    detector delivers them: darks, flats, projections at `rate` frames/s (0: as fast as it goes); fsync'ed at the
    end when asked."""
    with h5py.File(path, "w") as f:
        f[DATASETS["theta"]] = theta_deg
        order = []
        for key, frames in zip(("dark", "white", "data"), scan):
            ds = f.create_dataset(DATASETS[key], frames.shape, frames.dtype, chunks=(1,) + frames.shape[1:])
            order += [(ds, frames, i) for i in range(len(frames))]
        for k in paced(len(order), rate):
            ds, frames, i = order[k]
            ds[i] = frames[i]
    if fsync:
        sync(path)
    return path


def fbp_band(task: tuple) -> tuple[np.ndarray, float, float]:
    """The reference's reconstruction of a band of slices. `task`: darks, flats, projections (frames, rows, cols)
    of the band's detector rows, theta (angles,) radians, the rotation axis' column. Corrects the projections
    (flat/dark, -log, the axis shifted to the centre) into sinograms, then astra's CPU FBP of each slice over all
    its angles; returns the volume (rows, cols, cols) float32, the correction's and the FBP's seconds."""
    darks, flats, projections, theta, centre = task
    t0 = time.perf_counter()
    field = FlatDark(darks.shape[1:])
    for f in darks:
        field.add_dark(f)
    for f in flats:
        field.add_flat(f)
    lines = np.stack([minus_log(field.transmission(p)) for p in projections], axis=1)
    sinograms = to_centre(lines, centre)   # (slices, angles, cols)
    t1 = time.perf_counter()
    volume = np.stack([astra_fbp(s, theta) for s in sinograms])
    return volume, t1 - t0, time.perf_counter() - t1


def reference(scan: Scan, theta: np.ndarray, centre: float) -> dict:
    """The file-based way's reconstruction after the scan, in this process, timed."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    volume, correction_s, astra_s = fbp_band((*scan, theta, centre))
    return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0, "correction_s": correction_s,
            "astra_s": astra_s, "volume": volume}


def check(name: str, volume: np.ndarray, volume_ref: np.ndarray, complete: bool = True) -> float:
    """The relative RMS of `volume` to the reference's; RuntimeError when above ACCURACY or not complete."""
    rms = float(np.sqrt(np.mean((volume - volume_ref) ** 2) / np.mean(volume_ref ** 2)))
    if not complete or not rms < ACCURACY:
        raise RuntimeError(f"{name}: volume complete={complete}, relative RMS to the reference {rms:.2e}")
    return rms


def file_way(scan: Scan, theta_deg: np.ndarray, centre: float, tmp: Path, rate: float, pool,
             volume_ref: np.ndarray) -> dict:
    """The file-based way, timed as a whole and by part: write the DXchange file (at `rate` frames/s, 0: as fast
    as it goes; fsync'ed), read it back, reconstruct in `pool`'s PAIR processes (`fbp_band`, a band of slices
    each), write the volume; its volume checked against the reference's."""
    work = Path(tempfile.mkdtemp(prefix="files-", dir=tmp))
    t0 = time.monotonic()
    path = write_dxchange(work / "scan.h5", scan, theta_deg, rate, fsync=True)
    t1 = time.monotonic()
    with h5py.File(path) as f:
        darks, flats, projections, theta = (f[DATASETS[k]][()] for k in ("dark", "white", "data", "theta"))
    t2 = time.monotonic()
    bands = [slice(b[0], b[-1] + 1) for b in np.array_split(np.arange(projections.shape[1]), PAIR)]
    parts = pool.map(fbp_band, [(darks[:, b], flats[:, b], projections[:, b], np.radians(theta), centre)
                                for b in bands])
    volume = np.concatenate([v for v, _, _ in parts])
    t3 = time.monotonic()
    out = VolumeFile(work / "files-scan0000.h5", volume.shape, theta)
    out.write_band(0, volume)
    totals = out.record({"centre": centre}, np.ones(theta.size, bool))
    out.close().unlink()
    t4 = time.monotonic()
    path.unlink()
    return {"seconds": t4 - t0, "write_s": t1 - t0, "read_s": t2 - t1, "reconstruct_s": t3 - t2,
            "volume_s": t4 - t3, "relative_rms": check("files", volume, volume_ref, totals["complete"])}


def session(doc: dict, tmp: Path, volume_ref: np.ndarray) -> dict:
    """Run a session once: its seconds, CPU per stage, turnaround; its volume checked against the reference."""
    name = doc["metadata"]["name"]
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))   # each run its own folder: never overwritten
    path = work / f"{name}-scan0000.h5"
    closed: list[float] = []
    with SessionRun(doc, work) as run:
        watch = threading.Thread(target=lambda: closed.append(wait_for(path, 600)), daemon=True)
        watch.start()
        result = run.stream(timeout=900)
        watch.join(10)
        sent = scan_sent(run.local.run_dir / "logs" / "source-0.log", 0, 10)
    with h5py.File(path) as f:
        volume = f["exchange/data"][()]
        complete = bool(f["accounting"].attrs["complete"])
    rms = check(name, volume, volume_ref, complete)
    path.unlink()
    return {"seconds": result["seconds"], "cpu": result["cpu"], "turnaround_s": closed[0] - sent,
            "relative_rms": rms}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tomo", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="detector rows = cols = slices (default 256)")
    parser.add_argument("--angles", type=int, default=361, help="projections over 180 degrees (default 361)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (default 1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32],
                        help="tomo-fbp's batch values; the first with each of --workers, the others with 2 workers")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4],
                        help="worker counts measured with the first batch (default 1 2 4; 2 runs in any case: the "
                             "paced session and the file-based way compare with it)")
    parser.add_argument("--rate", type=float, help="the paced session's projections/s (default: half the "
                                                   "2-worker rate of round 1)")
    parser.add_argument("--no-paced", action="store_true", help="leave out the paced session and paced file way")
    args = parser.parse_args(argv)
    size, angles, first = args.size, args.angles, args.batches[0]
    cores = len(os.sched_getaffinity(0))
    report = Report("tomo", size=size, angles=angles, darks=DARKS, flats=FLATS, repeats=args.repeats,
                    batches=args.batches, workers=args.workers, rate=args.rate, cores=cores)
    centre = (size - 1) / 2 + OFFSET
    theta = np.radians(np.arange(angles) * 180 / angles)
    counts = sorted({*args.workers, PAIR})
    runs = list(dict.fromkeys([(w, first) for w in counts] + [(PAIR, b) for b in args.batches[1:]]))
    pair = f"w{PAIR}_b{first}"
    rounds: list[dict] = []
    # the file way's processes, forked before any session's threads, astra imported (start-up is not timed)
    with multiprocessing.get_context("fork").Pool(PAIR, importlib.import_module, ("astra",)) as pool, \
            tempfile.TemporaryDirectory(prefix="detstream-bench-") as tmp_name:
        tmp = Path(tmp_name)
        scan, theta_deg = render(size, angles)
        source = {"kind": "dxchange", "path": str(write_dxchange(tmp / "scan.h5", scan, theta_deg))}
        rate = args.rate
        for r in range(args.repeats):
            ref = reference(scan, theta, centre)
            out = {"reference": {k: v for k, v in ref.items() if k != "volume"}}
            for workers, batch in runs:
                key = f"w{workers}_b{batch}"
                doc = scan_doc(key.replace("_", "-"), size, angles, source=source, workers={"replicas": workers},
                               plugin={"name": "tomo-fbp", "params": {"centre": centre, "batch": batch}})
                out[key] = session(doc, tmp, ref["volume"])
            out["files"] = file_way(scan, theta_deg, centre, tmp, 0.0, pool, ref["volume"])
            if not args.no_paced:
                rate = rate or PACE * angles / out[pair]["seconds"]
                doc = scan_doc("paced", size, angles, source={**source, "rate": rate}, workers={"replicas": PAIR},
                               plugin={"name": "tomo-fbp", "params": {"centre": centre, "batch": first}})
                out["paced"] = session(doc, tmp, ref["volume"])
                out["files_paced"] = file_way(scan, theta_deg, centre, tmp, rate, pool, ref["volume"])
            rounds.append(out)
            print(f"tomo:   round {r + 1}: reference {ref['seconds']:.1f} s; " + ", ".join(
                f"{k} {v['seconds']:.1f} s" for k, v in out.items() if k != "reference")
                + (f" (turnaround {out['paced']['turnaround_s']:.2f} s)" if "paced" in out else ""), flush=True)

    def best(key: str) -> dict:
        return min((o[key] for o in rounds), key=lambda v: v["seconds"])

    ref_s = best("reference")["seconds"]
    ref_cpu = min(o["reference"]["cpu_s"] for o in rounds) / angles * 1e3   # ms per projection
    report.figure("reference", f"reference (after the scan, one core): {ref_s:.2f} s = {angles / ref_s:.1f} "
                  f"projections/s (correction {best('reference')['correction_s']:.2f} s, astra FBP of {size} slices "
                  f"{best('reference')['astra_s']:.2f} s; CPU {ref_cpu:.1f} ms per projection)", seconds=ref_s,
                  projections_per_s=angles / ref_s, correction_s=best("reference")["correction_s"],
                  astra_s=best("reference")["astra_s"], cpu_ms_per_projection=ref_cpu)
    for workers, batch in runs:
        key = f"w{workers}_b{batch}"
        secs = best(key)["seconds"]
        cpu = min((o[key]["cpu"] for o in rounds), key=lambda c: sum(c.values()))
        per = {k: round(v / angles * 1e3, 2) for k, v in sorted(cpu.items())}
        workers_cpu = sum(v for k, v in per.items() if k.startswith("worker"))
        turn = min(o[key]["turnaround_s"] for o in rounds)
        report.figure(key, f"session, {workers} worker(s), batch {batch}: {angles / secs:.1f} projections/s, "
                      f"session / reference = {ref_s / secs:.2f}; CPU per projection: workers {workers_cpu:.1f} ms "
                      f"(reference {ref_cpu:.1f} ms), all {sum(per.values()):.1f} ms {per}",
                      seconds=secs, projections_per_s=angles / secs, ratio=ref_s / secs,
                      cpu_ms_per_projection=per, workers_cpu_ratio=ref_cpu / workers_cpu,
                      turnaround_s=turn, relative_rms=max(o[key]["relative_rms"] for o in rounds))
    scaling(report, {w: angles / best(f"w{w}_b{first}")["seconds"] for w in counts}, first, cores)
    if not args.no_paced:
        turn = min(o["paced"]["turnaround_s"] for o in rounds)
        report.figure("turnaround", f"paced at {rate:.1f} projections/s ({(DARKS + FLATS + angles) / rate:.0f} s of "
                      f"acquisition), {PAIR} workers, batch {first}: volume on disk {turn:.2f} s after the last "
                      f"projection (best of {len(rounds)}; target < 1 s); the reference reconstructs "
                      f"for {ref_s:.1f} s after the scan: reference / turnaround = {ref_s / turn:.0f}",
                      rate=rate, turnaround_s=turn, ratio=ref_s / turn,
                      runs=[o["paced"]["turnaround_s"] for o in rounds])
    others = {f"{PAIR} workers, batch {b}": f"w{PAIR}_b{b}" for b in args.batches[1:]}
    files(report, "as fast as the machine goes", "files", best("files"), best(pair)["seconds"],
          f"{PAIR} workers, batch {first}",
          {label: best("files")["seconds"] / best(k)["seconds"] for label, k in others.items()})
    if not args.no_paced:
        files(report, f"at the paced session's {rate:.1f} projections/s", "files_at_rate", best("files_paced"),
              best("paced")["seconds"], f"paced, {PAIR} workers, batch {first}, turnaround "
              f"{min(o['paced']['turnaround_s'] for o in rounds):.2f} s", {})
    report.extra["rounds"] = rounds
    return report.save()


def scaling(report: Report, rates: dict[int, float], batch: int, cores: int) -> None:
    """Projections/s with each worker count and, with 1 measured, the efficiency rate(N) / (N x rate(1))."""
    one = rates.get(1)
    efficiency = {w: r / (w * one) for w, r in rates.items()} if one else {}
    report.figure("scaling", f"scaling, batch {batch}, on {cores} cores (workers beyond {cores} share them with "
                  f"each other and the source, distributor and writer: no gain expected): " + ", ".join(
                      f"{w} worker(s) {r:.1f} projections/s" + (f" (rate/(N x rate(1)) {efficiency[w]:.2f})"
                                                                 if w in efficiency and w > 1 else "")
                      for w, r in rates.items()), cores=cores, projections_per_s=rates, efficiency=efficiency)


def files(report: Report, how: str, key: str, way: dict, streaming_s: float, against: str,
          others: dict[str, float]) -> None:
    """The file-based way's figure: its parts, and files / streaming against the session `against`'s time to the
    volume on disk, `streaming_s` (`others`: the ratios against the other sessions)."""
    ratio = way["seconds"] / streaming_s
    after = way["read_s"] + way["reconstruct_s"] + way["volume_s"]
    report.figure(key, f"{how}: files {way['seconds']:.2f} s (write the DXchange file, fsync'ed, {way['write_s']:.2f} "
                  f"s; then read it {way['read_s']:.2f} s, reconstruct in {PAIR} processes {way['reconstruct_s']:.2f} "
                  f"s, write the volume {way['volume_s']:.2f} s: {after:.2f} s once the file is on disk) against "
                  f"streaming ({against}) {streaming_s:.2f} s to the volume on disk: files / streaming = {ratio:.2f}"
                  + "".join(f" ({k}: {v:.2f})" for k, v in others.items()),
                  **way, after_file_s=after, streaming_s=streaming_s, ratio=ratio, other_ratios=others)


if __name__ == "__main__":
    main()
