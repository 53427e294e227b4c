"""attack36: streamed bundle fetches under failure.

1. A fetch whose writes fail (a full disk) leaves its partial file behind, as large as the
   disk let it grow: the disk stays full (the journal then cannot write, and no later job
   can fetch anything) until someone deletes it by hand.
2. An owner killed while it fetches a job's bundle and restarted with the same state dir
   ends the job ``lost`` ("process vanished while the agent was down": there never was a
   process) and never fetches or runs it; the partial it had is left behind.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import time
from pathlib import Path
from typing import IO, Any

import pytest
from payloadmesh import partial_size, payload_config

from flexmesh.agent import bundlefetch
from flexmesh.agent.bundle import sha256_file
from flexmesh.agent.bundlefetch import FetchError, Want, fetch, read_chunk
from flexmesh.agent.localmesh import LocalMesh
from flexmesh.protocol import wire

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")


class _FullDisk:
    """A file that takes ``room`` bytes, then fails every write with ENOSPC."""

    def __init__(self, f: IO[bytes], room: int) -> None:
        self.f, self.room = f, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def test_a_fetch_that_fills_the_disk_leaves_no_partial(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "origin.tar"
    path.write_bytes(os.urandom(64_000))
    want = Want(sha256_file(path), 64_000, "job1")

    async def call(msg: wire.Message) -> tuple[wire.Message | None, str]:
        assert isinstance(msg, wire.FetchBundle)
        data, total = read_chunk(path, msg.offset, msg.length)
        return wire.BundleChunk(msg.bundle, msg.offset, data, total), ""

    real_open = open

    def full_open(p: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        f = real_open(p, mode, *a, **k)
        return _FullDisk(f, 20_000) if "a" in mode else f

    monkeypatch.setattr(bundlefetch, "open", full_open, raising=False)
    partial, dest = tmp_path / "partial" / "p.part", tmp_path / "b.tar"
    with pytest.raises((FetchError, OSError)):
        asyncio.run(fetch(call, want, partial, dest, chunk=4000, pause=0))
    assert not dest.exists()
    # What filled the disk must go with the failed fetch (else the disk stays full).
    assert not partial.exists() or partial.stat().st_size == 0, partial.stat().st_size


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_an_owner_killed_mid_fetch_still_runs_the_job(mesh: LocalMesh, tmp_path: Path,
                                                      work_root: Path) -> None:
    src = tmp_path / "project"
    src.mkdir()
    with open(src / "blob", "wb") as f:
        for _ in range(60):
            f.write(os.urandom(1 << 20))
    mesh.start("a", sim="gpu:1x16GiB", extra=payload_config(mesh, "a", work_root))
    mesh.start("d", join=["a"], extra=["--priority", "10", *payload_config(
        mesh, "d", work_root, '[network]\nbulk_rate = "10MiB/s"\n')])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "d"]))
    res = mesh.cli("d", "submit", "--gpu", "0.25", "--workdir", str(src), "-o", "json", "--",
                   "sh", "-c", "wc -c < blob")
    job_id = json.loads(res.stdout)["id"]
    mesh.wait_for("part of the bundle", lambda: partial_size(mesh, "a") > 10 << 20,
                  timeout=60, interval=0.05)
    mesh.kill("a", signal.SIGKILL)
    mesh.restart("a")
    deadline = time.monotonic() + 120

    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = mesh.json("d", "show", job_id)
        return job if job["state"] in TERMINAL else None

    job = mesh.wait_for("the job to end", ended, timeout=deadline - time.monotonic())
    assert job["state"] == "succeeded", job  # now: lost, "process vanished while ..."
    assert mesh.cli("d", "logs", job_id).stdout.strip() == str(60 << 20)
    fetched = [line for line in mesh.agents["a"].log.read_text().splitlines()
               if "bundle_fetched" in line]
    assert fetched and "resumed_at=0 " not in fetched[-1], fetched
