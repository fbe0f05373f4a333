"""Fixtures and hooks for the whole suite; the helpers the tests import are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# The Kubernetes control plane's fixtures (control_plane, kubectl, helm), for the tests that ask for them.
pytest_plugins = ["cluster.fixtures"]

# A failed stage exits at once in tests (the default, 30 s, lets Prometheus scrape it); the tests
# of that linger set the variable themselves.
os.environ.setdefault("DETSTREAM_FAILED_LINGER_S", "0")


@pytest.fixture
def write_manifest(tmp_path):
    def write(doc: dict, name: str = "session.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc))
        return path
    return write


@pytest.fixture
def local_session(tmp_path):
    """Start sessions in-process (real stage processes on 127.0.0.1); all stopped at the end."""
    from detstream.services.launcher.runner import LocalSession
    from detstream.services.model.session import load_session

    sessions = []

    def start(doc):
        local = LocalSession(load_session(doc), tmp_path)
        sessions.append(local)
        local.launch()
        local.wait_healthy()
        local.start()
        return local
    yield start
    for local in sessions:
        local.stop()
