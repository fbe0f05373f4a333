"""The soak benchmark, short: half a minute of scans back to back; nothing lost, nothing grows."""

import json
import subprocess
import sys

from helpers import ROOT, no_stage_left


def test_half_a_minute_of_back_to_back_scans_loses_nothing_and_grows_nothing(tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--minutes", "0.5", "--rate", "120",
                             "--scan", "16", "--detector", "128", "--interval", "2", "--max-growth-mb", "10",
                             "--json", str(out), "--keep", str(tmp_path / "files")],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    soak = json.loads(out.read_text())
    assert soak["ok"] and soak["frames_written"] == soak["frames_expected"] == 256 * soak["scans"]
    assert soak["frames_lost"] == soak["unaccounted"] == 0
    assert all(s["complete"] and s["duplicates"] == 0 for s in soak["scan_accounts"])
    assert len(soak["samples"]) >= 6 and set(soak["rss_growth_bytes"]) == set(soak["peak_rss_bytes"])
    assert all(g < 10e6 for g in soak["rss_growth_bytes"].values()), soak["rss_growth_bytes"]
    assert len(list((tmp_path / "files").glob("soak-scan*.h5"))) == soak["scans"]
    assert not no_stage_left(str(tmp_path))
