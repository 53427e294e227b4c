"""Real agent processes on 127.0.0.1: an owner whose battery file drops below its lend
floor stops lending, and the job it had borrowed is requeued and finishes elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flexmesh.agent.localmesh import LocalMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def shared(open_tmp: Callable[[str, int], Path]) -> Path:
    """A directory the jobs can see into (as root, the agents run them as nobody)."""
    return open_tmp("flexmesh-battery-", 0o755)


def job_when(mesh: LocalMesh, job_id: str, state: str) -> dict[str, Any] | None:
    job: dict[str, Any] = mesh.json("z", "show", job_id)
    return job if job["state"] == state else None


def battery_of(mesh: LocalMesh, seen_by: str, node: str) -> Any:
    return next(r["battery"] for r in mesh.json(seen_by, "nodes") if r["name"] == node)


def test_below_the_floor_the_borrowed_job_is_requeued_and_finishes_elsewhere(
        mesh: LocalMesh, tmp_path: Path, shared: Path) -> None:
    level = tmp_path / "battery-a"
    level.write_text('{"level": 64, "charging": false}')
    config = tmp_path / "a.toml"
    config.write_text(f'[power]\nsource = "file"\npath = "{level}"\nlend_floor = 25\n')
    mark = shared / "go"  # the jobs wait for it
    mesh.start("a", sim="gpu:1x8GiB", extra=["--config", str(config)])
    mesh.start("z", join=["a"], extra=["--priority", "10"])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "z"]))
    mesh.wait_for("a's battery seen by z", lambda: battery_of(mesh, "z", "a") == {
        "level": 64, "charging": False, "floor": 25, "lending": True})

    # z has no device: its job borrows a's GPU, and waits there for the mark.
    job_id = mesh.cli("z", "submit", "--gpu", "0.5", "--memory", "2GiB", "--", "sh", "-c",
                      f'while [ ! -e "{mark}" ]; do sleep 0.1; done; echo finished').stdout.strip()
    job = mesh.wait_for("running on a", lambda: job_when(mesh, job_id, "running"))
    assert job["node"] == "a"
    own = mesh.cli("a", "submit", "--gpu", "0.25", "--", "sh", "-c",
                   f'while [ ! -e "{mark}" ]; do sleep 0.1; done; echo mine').stdout.strip()
    mesh.wait_for("a's own job running", lambda: (
        mesh.json("a", "show", own)["state"] == "running"))

    level.write_text("18 discharging")  # the bridge writes a lower level
    job = mesh.wait_for("requeued", lambda: job_when(mesh, job_id, "queued"))
    assert "battery 18% below lend floor 25% (lends again at 30%)" in job["reason"], job
    assert mesh.json("a", "show", own)["state"] == "running"  # its own job runs on
    assert battery_of(mesh, "z", "a") == {"level": 18, "charging": False, "floor": 30,
                                          "lending": False}
    assert "battery 18% not lending" in mesh.cli("z", "status").stdout
    assert "18% not lending" in mesh.cli("z", "nodes").stdout

    # Another node with a free GPU joins: the requeued job runs there and finishes.
    mesh.start("b", sim="gpu:1x8GiB", join=["a"])
    job = mesh.wait_for("running on b", lambda: job_when(mesh, job_id, "running"), timeout=60)
    assert job["node"] == "b"
    mark.write_text("")
    job = mesh.wait_for("finished", lambda: job_when(mesh, job_id, "succeeded"))
    assert job["node"] == "b" and mesh.cli("z", "logs", job_id).stdout == "finished\n"
    mine = mesh.wait_for("a's own job finished", lambda: (
        lambda j: j if j["state"] == "succeeded" else None)(mesh.json("a", "show", own)))
    assert mine["node"] == "a"
    counters = mesh.json("a", "status")["status"]["counters"]
    assert counters["lending_stopped"] == 1 and counters["battery_handbacks"] == 1
