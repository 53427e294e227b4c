"""Fixtures shared by the tests that start real agents."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flexmesh.agent.localmesh import LocalMesh


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    """Agents on 127.0.0.1 in ``tmp_path``; every one is stopped after the test."""
    m = LocalMesh(tmp_path)
    try:
        yield m
    finally:
        m.close()
