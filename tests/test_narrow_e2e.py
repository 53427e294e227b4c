"""Real agents on 127.0.0.1: a workdir and a job's output cross compressed where the caller
asked for it (and as they are where it did not, as from an older peer), paced under a
``bulk_rate``, and arrive byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from flexmesh.agent.localmesh import LocalMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")
JOB_PATH = "/usr/local/bin:/usr/bin:/bin"
LINES = 20_000
JOB = f"""\
import hashlib
h = hashlib.sha256(open("noise.bin", "rb").read()).hexdigest()
for i in range({LINES}):
    print("step", i, "loss", 1 / (1 + i % 97), h[:8])
"""


def _config(mesh: LocalMesh, name: str, work: Path, network: str) -> list[str]:
    path = mesh.root / f"{name}.toml"
    path.write_text(f'[payload]\nwork_dir = "{work / name}"\n[network]\n{network}\n')
    return ["--config", str(path)]


def _counters(mesh: LocalMesh, node: str) -> dict[str, int]:
    counters: dict[str, int] = mesh.json(node, "status")["status"]["counters"]
    return counters


def _ended(mesh: LocalMesh, job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = mesh.json("d", "show", job_id)
    return job if job["state"] in TERMINAL else None


@pytest.mark.parametrize("origin_compresses", [True, False])
def test_a_workdir_and_output_cross_compressed_where_asked(
        mesh: LocalMesh, tmp_path: Path, work_root: Path, origin_compresses: bool) -> None:
    if shutil.which("python3", path=JOB_PATH) is None:
        pytest.skip(f"no python3 on a job's PATH ({JOB_PATH})")
    src = tmp_path / "project"
    src.mkdir()
    (src / "main.py").write_text(JOB)
    noise = os.urandom(1 << 20)
    (src / "noise.bin").write_bytes(noise)
    (src / "notes.txt").write_text("the same line of notes, again and again\n" * 80_000)
    mesh.start("a", sim="gpu:1x16GiB",
               extra=_config(mesh, "a", work_root, 'bulk_rate = "2MB/s"'))
    network = f'bulk_rate = "1MB/s"\ncompress = {str(origin_compresses).lower()}'
    mesh.start("d", join=["a"], extra=["--priority", "10",
                                       *_config(mesh, "d", work_root, network)])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "d"]))

    res = mesh.cli("d", "submit", "--gpu", "0.25", "--workdir", str(src), "-o", "json",
                   "--", "python3", "main.py")
    job_id = json.loads(res.stdout)["id"]
    job = mesh.wait_for("the job to end", lambda: _ended(mesh, job_id), timeout=90)
    assert job["state"] == "succeeded" and job["node"] == "a", job
    h = hashlib.sha256(noise).hexdigest()[:8]
    want = "".join(f"step {i} loss {1 / (1 + i % 97)} {h}\n" for i in range(LINES))
    assert mesh.cli("d", "logs", job_id).stdout == want

    origin, owner = _counters(mesh, "d"), _counters(mesh, "a")
    assert owner["bundle_fetch_bytes"] > 4_000_000  # counted as they were, and hashed so
    assert origin["bulk_paced_bytes"] > 1_000_000  # at its rate (the noise at least)
    if origin_compresses:  # the bundle served compressed (its text), the output too
        assert origin["bulk_packed_bytes"] < origin["bulk_raw_bytes"] / 2
        assert owner["bulk_packed_bytes"] < owner["bulk_raw_bytes"] / 3
        assert owner["bulk_raw_bytes"] >= len(want)
    else:  # it neither compresses nor asks for it, as an older peer: none either way
        assert origin["bulk_paced_bytes"] > 4_000_000
        assert "bulk_raw_bytes" not in origin and "bulk_raw_bytes" not in owner
    assert not any(k.startswith("bulk_dropped") for k in (*origin, *owner))
