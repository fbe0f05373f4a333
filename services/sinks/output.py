"""Where results go: the scan files' and the accounting file's names, and the checks that keep them safe.

A result is never overwritten: `detstream run` refuses to start when a scan file it would write is
in the output folder already, and the writer refuses to create one over an existing file (a
session on Kubernetes whose volume holds an earlier run's files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def scan_file(folder: Path, session: str, number: int) -> Path:
    """The file of one scan's results: SESSION-scanNNNN.h5."""
    return Path(folder) / f"{session}-scan{number:04d}.h5"


def existing_results(folder: Path, session: str, scans: int) -> list[Path]:
    """The files in `folder` that a session of `scans` scans would write (left there by an earlier run)."""
    try:
        present = set(os.listdir(folder))
    except OSError:
        return []
    ours = [scan_file(folder, session, n) for n in range(scans)] + [accounting_file(folder, session)]
    return [path for path in ours if path.name in present]


def accounting_file(folder: Path, session: str) -> Path:
    """Where the writer keeps a line per closed scan (JSON: scan, expected, written, partial, lost, duplicates,
    unaccounted, complete, file): in its output folder, next to the scan files."""
    return Path(folder) / f"{session}-accounting.jsonl"


def read_accounting(path: Path) -> list[dict]:
    """The closed scans an accounting file lists, in scan order; [] if there is none (or its folder is not one)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:  # no such file, or an output path that is not a folder (the session failed on it already)
        return []
    return sorted((json.loads(line) for line in lines if line.strip()), key=lambda s: s["scan"])


def never_overwrite(path: Path) -> str:
    """Why the writer stops rather than write over `path`."""
    return (f"{path} exists already (an earlier run): results are never overwritten; give another output folder "
            f"(spec.output.path) or move the file away")


def folder_problem(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (made if missing), or None."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    probe = folder / ".detstream-write-test"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"{folder} is not writable: {exc.strerror}"
    return None
