"""Where results go: the scan files' names, and the checks that keep them safe.

A result is never overwritten: `detstream run` refuses to start when a scan file it would write is
in the output folder already, and the writer refuses to create one over an existing file (a
session on Kubernetes whose volume holds an earlier run's files).
"""

from __future__ import annotations

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
    return [path for path in (scan_file(folder, session, n) for n in range(scans)) if path.name in present]


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
