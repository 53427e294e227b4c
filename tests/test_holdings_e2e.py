"""Real agents on 127.0.0.1: an owner that fetched a job's working directory gossips that it
holds it, and the next job with the same directory is placed there, over a node the
placement would otherwise prefer, and is not fetched again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flexmesh.agent.localmesh import LocalMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")
BIG = 256 * 2**20  # bytes: a holding bonus of 0.01, twice what packing weighs (see below)


def _config(mesh: LocalMesh, name: str, work: Path) -> list[str]:
    path = mesh.root / f"{name}.toml"
    path.write_text(f'[payload]\nwork_dir = "{work / name}"\n')
    return ["--config", str(path)]


def _show(mesh: LocalMesh, job_id: str, on: str = "d") -> dict[str, Any]:
    job: dict[str, Any] = mesh.json(on, "show", job_id)
    return job


def _submit(mesh: LocalMesh, *argv: str) -> str:
    res = mesh.cli("d", "submit", "-o", "json", *argv)
    job_id: str = json.loads(res.stdout)["id"]
    return job_id


def _in_state(mesh: LocalMesh, job_id: str, states: tuple[str, ...],
              on: str = "d") -> dict[str, Any] | None:
    job = _show(mesh, job_id, on)
    return job if job["state"] in states else None


def _counters(mesh: LocalMesh, node: str) -> dict[str, int]:
    counters: dict[str, int] = mesh.json(node, "status")["status"]["counters"]
    return counters


def _leased(mesh: LocalMesh, node: str) -> int:
    return sum(d["leased_compute_milli"] for d in mesh.json("d", "devices")
               if d["node"] == node)


def _held(mesh: LocalMesh, node: str) -> int:
    held: int = next(n["held"] for n in mesh.json("d", "nodes") if n["name"] == node)
    return held


def test_the_second_job_with_a_workdir_goes_to_its_holder_and_is_not_fetched(
        mesh: LocalMesh, tmp_path: Path, work_root: Path) -> None:
    src = tmp_path / "project"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"\0" * BIG)
    (src / "data.txt").write_text("forty-two\n")
    for name in ("a", "b"):
        mesh.start(name, sim="gpu:1x16GiB", extra=_config(mesh, name, work_root),
                   join=["a"] if name == "b" else None)
    mesh.start("d", join=["a"], extra=["--priority", "10", *_config(mesh, "d", work_root)])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "b", "d"]))

    first = _submit(mesh, "--gpu", "0.5", "--workdir", str(src), "--", "sleep", "300")
    job = mesh.wait_for("the first job to run", lambda: _in_state(mesh, first, ("running",)),
                        timeout=90)
    holder = job["node"]  # it fetched the bundle to start the job
    other = "b" if holder == "a" else "a"
    mesh.cli("d", "cancel", first)
    mesh.wait_for("the first job to end", lambda: _in_state(mesh, first, TERMINAL))
    mesh.wait_for("the holder's lease to go from gossip", lambda: _leased(mesh, holder) == 0)
    # The other node runs a job of its own (its origin's bonus keeps it there). Half of
    # its GPU is then in use: packing puts the next half there (no more fragmentation
    # either way, and the holder would be left with half a GPU idle, 0.005 worse).
    blocker = mesh.cli(other, "submit", "-o", "json", "--gpu", "0.5", "--", "sleep", "300")
    blocker_id = json.loads(blocker.stdout)["id"]
    job = mesh.wait_for("the other node's job to run", lambda: _in_state(
        mesh, blocker_id, ("running",), on=other))
    assert job["node"] == other
    mesh.wait_for("the other node's lease in gossip", lambda: _leased(mesh, other) == 500)
    mesh.wait_for("the holder's digest to reach the coordinator",
                  lambda: _held(mesh, holder) >= 1)
    second = _submit(mesh, "--gpu", "0.5", "--workdir", str(src), "--", "cat", "data.txt")
    job = mesh.wait_for("the second job to end", lambda: _in_state(mesh, second, TERMINAL),
                        timeout=60)
    assert job["state"] == "succeeded", job
    assert job["node"] == holder  # the holder, not the node packing prefers
    assert mesh.cli("d", "logs", second).stdout == "forty-two\n"
    owner = _counters(mesh, holder)
    assert owner.get("bundle_fetches") == 1  # the first job's fetch only
    assert owner.get("bundle_cache_hits") == 1
    assert owner.get("bundle_fetch_bytes", 0) > BIG
    assert "bundle_cache_hit bundle=" in mesh.agents[holder].log.read_text()
    assert _counters(mesh, other).get("bundle_fetches", 0) == 0
    mesh.cli(other, "cancel", blocker_id)
