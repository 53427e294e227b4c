"""Fixtures shared by the tests that start real agents."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flexmesh.agent.localmesh import LocalMesh

try:
    from hypothesis import settings
except ImportError:  # the GPU check's bundle (scripts/gpu-check) carries no hypothesis
    pass
else:
    # Property tests draw fresh examples on every developer run, so new counterexamples
    # keep turning up; the CI gate (.ci/run sets HYPOTHESIS_PROFILE=ci) draws the same
    # examples every time, so whether a submission lands never depends on the luck of the
    # draw.
    settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    """Agents on 127.0.0.1 in ``tmp_path``; every one is stopped after the test."""
    m = LocalMesh(tmp_path)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def open_tmp() -> Iterator[Callable[[str, int], Path]]:
    """Makes directories under /tmp with a mode others may enter (pytest's own temporary
    directories are 0700, shut to the user a borrowed job runs as); removed after."""
    made: list[Path] = []

    def make(prefix: str, mode: int) -> Path:
        made.append(Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")))
        made[-1].chmod(mode)
        return made[-1]

    try:
        yield make
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def work_root(open_tmp: Callable[[str, int], Path]) -> Path:
    """Where owners unpack runs (``[payload] work_dir``): searchable by a job's user."""
    return open_tmp("flexmesh-work-", 0o711)
