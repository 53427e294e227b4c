"""Real agents on 127.0.0.1: results. A job submitted on a deviceless node with a workdir
runs on another node's device, writes files under $FLEXMESH_OUTPUT, and they are read back
on the submitter with ``flexmesh results``; ``show`` names them; the owner keeps no copy
once the origin has them; a job placed on its own origin needs no fetch; results beyond
``max_results`` are cut, and the reason says so; an origin away when its job ends gets the
results when it is back, though their owner restarted meanwhile."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from flexmesh.agent.localmesh import LocalMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")
JOB_PATH = "/usr/local/bin:/usr/bin:/bin"

SCRIPT = """\
import os
out = os.environ["FLEXMESH_OUTPUT"]
with open("data.txt") as f:
    value = int(f.read())
os.makedirs(os.path.join(out, "sub"))
with open(os.path.join(out, "answer.txt"), "w") as f:
    f.write(f"{value * 2}\\n")
with open(os.path.join(out, "sub", "big.bin"), "wb") as f:
    f.write(b"x" * 3_000_000)
os.symlink("/etc/passwd", os.path.join(out, "escape"))
print("wrote to", out)
"""


def _config(mesh: LocalMesh, name: str, work: Path, extra: str = "") -> list[str]:
    path = mesh.root / f"{name}.toml"
    path.write_text(f'[payload]\nwork_dir = "{work / name}"\n{extra}')
    return ["--config", str(path)]


def _results_in(mesh: LocalMesh, node: str, job_id: str) -> dict[str, Any] | None:
    """The job, once it has ended and its results are no longer on their way."""
    job: dict[str, Any] = mesh.json(node, "show", job_id)
    if job["state"] in TERMINAL and job["results"]["state"] not in ("pending", "fetching"):
        return job
    return None


def _submit(mesh: LocalMesh, node: str, *args: str) -> str:
    res = mesh.cli(node, "submit", "--gpu", "0.25", "-o", "json", *args)
    return str(json.loads(res.stdout)["id"])


def test_results_come_back_to_a_deviceless_submitter(mesh: LocalMesh, tmp_path: Path,
                                                     work_root: Path) -> None:
    if shutil.which("python3", path=JOB_PATH) is None:
        pytest.skip(f"no python3 on a job's PATH ({JOB_PATH})")
    src = tmp_path / "project"
    src.mkdir()
    (src / "main.py").write_text(SCRIPT)
    (src / "data.txt").write_text("21\n")
    mesh.start("a", sim="gpu:1x16GiB", extra=_config(mesh, "a", work_root))
    mesh.start("d", join=["a"], extra=["--priority", "10", *_config(mesh, "d", work_root)])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "d"]))

    job_id = _submit(mesh, "d", "--workdir", str(src), "--", "python3", "main.py")
    job = mesh.wait_for("the results", lambda: _results_in(mesh, "d", job_id))
    assert job["state"] == "succeeded" and job["node"] == "a", job
    results = job["results"]
    assert results["state"] == "here", results
    assert {f["name"]: f["size"] for f in results["files"]} == {
        "answer.txt": 3, "sub/big.bin": 3_000_000}
    assert "1 entries skipped" in results["note"]  # the link out of the directory

    dest = tmp_path / "back"
    res = mesh.cli("d", "results", job_id, str(dest))
    assert sorted(res.stdout.split()) == [str(dest / "answer.txt"), str(dest / "sub/big.bin")]
    assert (dest / "answer.txt").read_text() == "42\n"
    assert (dest / "sub" / "big.bin").stat().st_size == 3_000_000
    assert not (dest / "escape").exists()

    # The owner's copy goes once the origin has it, and the run's directories are gone.
    mesh.wait_for("the owner's copy to go",
                  lambda: not list((mesh.root / "a" / "state" / "results").glob("*.tar")))
    mesh.wait_for("the run's directories to go", lambda: not any((work_root / "a").iterdir()))
    counters = mesh.json("a", "status")["status"]["counters"]
    assert counters.get("results_chunks_served", 0) >= 3


def test_results_of_a_job_run_on_its_origin_and_the_limit(mesh: LocalMesh, tmp_path: Path,
                                                          work_root: Path) -> None:
    mesh.start("a", sim="gpu:1x16GiB",
               extra=_config(mesh, "a", work_root, 'max_results = "1MiB"\n'))
    script = ('cd "$FLEXMESH_OUTPUT" && echo small > a.txt && '
              'head -c 3000000 /dev/zero > b.bin && echo late > c.txt')
    job_id = _submit(mesh, "a", "--", "sh", "-c", script)
    job = mesh.wait_for("the results", lambda: _results_in(mesh, "a", job_id))
    results = job["results"]
    assert results["state"] == "here", results
    assert [f["name"] for f in results["files"]] == ["a.txt", "c.txt"]
    assert "results cut at 11 of 3000011 bytes" in results["note"]
    files = mesh.json("a", "results", job_id, str(tmp_path / "r"))
    assert [Path(f).name for f in files] == ["a.txt", "c.txt"]

    # A job that writes nothing has results all the same: none of them files.
    job_id = _submit(mesh, "a", "--", "true")
    job = mesh.wait_for("the results", lambda: _results_in(mesh, "a", job_id))
    assert job["results"]["state"] == "here" and job["results"]["files"] == []
    res = mesh.cli("a", "results", job_id, str(tmp_path / "none"))
    assert "no files" in res.stdout


def test_results_wait_for_an_origin_away_and_outlive_an_owner_restart(
        mesh: LocalMesh, tmp_path: Path, work_root: Path) -> None:
    flag = work_root / "go"  # (where the user a borrowed job runs as can look)
    mesh.start("a", sim="gpu:1x16GiB", extra=_config(mesh, "a", work_root))
    mesh.start("d", join=["a"], extra=["--priority", "10", *_config(mesh, "d", work_root)])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "d"]))
    script = (f'echo early > "$FLEXMESH_OUTPUT/r.txt"; until [ -e {flag} ]; do sleep 0.05; '
              'done; head -c 5000000 /dev/zero > "$FLEXMESH_OUTPUT/big"')
    job_id = _submit(mesh, "d", "--", "sh", "-c", script)
    mesh.wait_for("the job to run", lambda: mesh.json("d", "show", job_id)["state"] == "running")

    mesh.kill("d", signal.SIGTERM)  # the origin goes away while its job runs ...
    flag.touch()  # ... which then ends: its owner packs its results and keeps them
    store = mesh.root / "a" / "state" / "results"
    mesh.wait_for("the run to end", lambda: [r["state"] for r in mesh.json(
        "a", "jobs", "--here")] == ["succeeded"])
    (archive,) = store.glob("*.tar")
    mesh.kill("a")  # the owner dies, and comes back with them
    mesh.restart("a")
    mesh.restart("d")
    job = mesh.wait_for("the results", lambda: _results_in(mesh, "d", job_id), 60)
    assert job["state"] == "succeeded" and job["results"]["state"] == "here", job
    dest = tmp_path / "back"
    mesh.cli("d", "results", job_id, str(dest))
    assert (dest / "r.txt").read_text() == "early\n"
    assert (dest / "big").stat().st_size == 5_000_000
    mesh.wait_for("the owner's copy to go", lambda: not archive.exists())
