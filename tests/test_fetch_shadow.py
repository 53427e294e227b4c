"""A job's origin out of reach while the owner fetches its workdir (a drone in a radio
shadow, an origin agent restarted): the owner keeps trying for as long as it keeps the
run, rather than failing the job after a few seconds of refused connections."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from payloadmesh import partial_size, payload_config

from flexmesh.agent.localmesh import LocalMesh

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")
# Long enough that neither side gives up on the other while the origin is down here.
JOBS = '[jobs]\norphan_limit = 60\nowner_dead_grace = 90\n'


def _retries(mesh: LocalMesh, node: str) -> list[str]:
    return [line for line in mesh.agents[node].log.read_text(errors="replace").splitlines()
            if "bundle_fetch_retry" in line]


def _fetching(mesh: LocalMesh, tmp_path: Path, work_root: Path, jobs: str = JOBS) -> str:
    """Agents ``a`` (a GPU) and ``d`` (the origin, serving at 8 MiB/s); a job with a 40 MiB
    workdir submitted on ``d`` and part of its bundle fetched by ``a``: its id."""
    src = tmp_path / "project"
    src.mkdir()
    with open(src / "blob", "wb") as f:
        for _ in range(40):
            f.write(os.urandom(1 << 20))
    mesh.start("a", sim="gpu:1x16GiB", extra=payload_config(mesh, "a", work_root, jobs))
    mesh.start("d", join=["a"], extra=["--priority", "10", *payload_config(
        mesh, "d", work_root, f'{jobs}[network]\nbulk_rate = "8MiB/s"\n')])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "d"]))
    res = mesh.cli("d", "submit", "--gpu", "0.25", "--workdir", str(src), "-o", "json", "--",
                   "sh", "-c", "wc -c < blob")
    job_id: str = json.loads(res.stdout)["id"]
    mesh.wait_for("part of the bundle", lambda: partial_size(mesh, "a") > 4 << 20,
                  timeout=60, interval=0.05)
    return job_id


def _ended(mesh: LocalMesh, job_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = mesh.json("d", "show", job_id)
        return job if job["state"] in TERMINAL else None

    found: dict[str, Any] = mesh.wait_for("the job to end", ended, timeout=120)
    return found


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_an_origin_down_longer_than_the_retries_still_gets_its_job_run(
        mesh: LocalMesh, tmp_path: Path, work_root: Path) -> None:
    job_id = _fetching(mesh, tmp_path, work_root)
    mesh.kill("d", signal.SIGKILL)
    # More failed tries in a row than the five after which a fetch used to give up (and
    # about 12 s of pauses, against 6 s then), each one logged with its reason.
    tries = mesh.wait_for("the owner to try 7 times", lambda: len(_retries(mesh, "a")) >= 7,
                          timeout=90, interval=0.2)
    assert tries
    first = _retries(mesh, "a")[0]
    assert f"job={job_id}" in first and "error=" in first and "pause=0.2" in first, first
    mesh.restart("d")
    job = _ended(mesh, job_id)
    assert job["state"] == "succeeded" and job["attempts"] == 0, job  # (never requeued)
    assert mesh.cli("d", "logs", job_id).stdout.strip() == str(40 << 20)
    fetched = [line for line in mesh.agents["a"].log.read_text().splitlines()
               if "bundle_fetched" in line and f"job={job_id}" in line]
    assert fetched and "resumed_at=0 " in fetched[-1], fetched  # (one fetch, resumed in it)
    counters = mesh.json("a", "status")["status"]["counters"]
    assert counters.get("bundle_fetch_retries", 0) >= 7 and not counters.get(
        "bundle_fetches_failed"), counters


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_an_origin_down_longer_than_the_orphan_limit_has_its_job_run_again(
        mesh: LocalMesh, tmp_path: Path, work_root: Path) -> None:
    """The owner stops the run it fetches for (``preempted``: its origin stopped asking
    after it) rather than failing it, and the origin, back, requeues the job."""
    job_id = _fetching(mesh, tmp_path, work_root,
                       jobs="[jobs]\norphan_limit = 4\nowner_dead_grace = 60\n")
    mesh.kill("d", signal.SIGKILL)

    mesh.wait_for("the owner to stop the run", lambda: mesh.json("a", "status")["status"][
        "counters"].get("bundle_fetches_stopped"), timeout=60, interval=0.2)
    counters = mesh.json("a", "status")["status"]["counters"]
    assert counters.get("orphans_stopped") == 1 and not counters.get(
        "bundle_fetches_failed"), counters
    mesh.restart("d")
    job = _ended(mesh, job_id)
    assert job["state"] == "succeeded" and job["attempts"] == 1, job  # (requeued once)
    assert mesh.cli("d", "logs", job_id).stdout.strip() == str(40 << 20)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_run_stopped_while_its_fetch_hangs_ends_the_fetch_at_once(
        mesh: LocalMesh, tmp_path: Path, work_root: Path) -> None:
    """An origin frozen mid-stream (SIGSTOP: its connection open, silent): once the orphan
    rule stops the run, its fetch ends then, not when the call's 30 s timeout runs out,
    so the owner takes the job again as soon as the origin requeues it."""
    job_id = _fetching(mesh, tmp_path, work_root,
                       jobs="[jobs]\norphan_limit = 4\nowner_dead_grace = 60\n")
    frozen = mesh.agents["d"].proc
    assert frozen is not None
    frozen.send_signal(signal.SIGSTOP)
    try:
        def counters() -> dict[str, int]:
            found: dict[str, int] = mesh.json("a", "status")["status"]["counters"]
            return found

        mesh.wait_for("the owner to stop the run", lambda: counters().get("orphans_stopped"),
                      timeout=60, interval=0.2)
        # (within a third of the call's timeout: the stop ended it, not the timeout)
        mesh.wait_for("the fetch to end", lambda: counters().get("bundle_fetches_stopped"),
                      timeout=10, interval=0.1)
        assert not counters().get("bundle_fetches_failed"), counters()
    finally:
        frozen.send_signal(signal.SIGCONT)
    job = _ended(mesh, job_id)
    assert job["state"] == "succeeded" and job["attempts"] == 1, job  # (requeued once)
