"""Real agents on 127.0.0.1: a job submitted with --workdir on a deviceless node runs on
another node's device in a copy of that directory, and a second job with the same
directory is not fetched again."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from flexmesh.agent.localmesh import LocalMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")
JOB_PATH = "/usr/local/bin:/usr/bin:/bin"  # a job's PATH (its environment is clean)

SCRIPT = """\
import os
with open("data.txt") as f:
    print("read", f.read().strip())
print("cwd is workdir", os.getcwd() == os.environ["FLEXMESH_WORKDIR"])
"""


def _config(mesh: LocalMesh, name: str, work: Path) -> list[str]:
    path = mesh.root / f"{name}.toml"
    path.write_text(f'[payload]\nwork_dir = "{work / name}"\n')
    return ["--config", str(path)]


def _ended(mesh: LocalMesh, node: str, job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = mesh.json(node, "show", job_id)
    return job if job["state"] in TERMINAL else None


def _counters(mesh: LocalMesh, node: str) -> dict[str, int]:
    counters: dict[str, int] = mesh.json(node, "status")["status"]["counters"]
    return counters


def test_a_workdir_travels_to_the_owner_and_is_cached(mesh: LocalMesh, tmp_path: Path,
                                                      work_root: Path) -> None:
    python = shutil.which("python3", path=JOB_PATH)
    if python is None:
        pytest.skip(f"no python3 on a job's PATH ({JOB_PATH})")
    src = tmp_path / "project"
    (src / "sub").mkdir(parents=True)
    (src / "main.py").write_text(SCRIPT)
    (src / "data.txt").write_text("forty-two\n")
    (src / "sub" / "more.txt").write_text("x" * 3_000_000)  # several chunks
    mesh.start("a", sim="gpu:1x16GiB", extra=_config(mesh, "a", work_root))
    mesh.start("d", join=["a"], extra=["--priority", "10", *_config(mesh, "d", work_root)])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "d"]))

    ids = []
    for _ in range(2):
        res = mesh.cli("d", "submit", "--gpu", "0.25", "--workdir", str(src), "-o", "json",
                       "--", "python3", "main.py")
        ids.append(json.loads(res.stdout)["id"])
        job = mesh.wait_for("the job to end", lambda: _ended(mesh, "d", ids[-1]))
        assert job["state"] == "succeeded", job
        assert job["node"] == "a" and job["bundle"] and job["workdir"] == str(src)
        logs = mesh.cli("d", "logs", ids[-1])
        assert logs.stdout == "read forty-two\ncwd is workdir True\n", logs.stderr

    owner = _counters(mesh, "a")
    assert owner.get("bundle_fetches") == 1  # the second job found it in the cache
    assert owner.get("bundle_cache_hits") == 1
    assert owner.get("bundle_fetch_bytes", 0) > 3_000_000
    origin = _counters(mesh, "d")
    assert origin.get("bundle_chunks_served", 0) >= 3 and origin.get("bundle_streams_served")
    # Each run's directory was removed when it ended.
    mesh.wait_for("the runs' directories to go", lambda: not any((work_root / "a").iterdir()))


def test_a_workdir_is_checked_at_submit(mesh: LocalMesh, tmp_path: Path,
                                        work_root: Path) -> None:
    src = tmp_path / "many"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_text("x")
    (src / "escape").symlink_to("/etc/passwd")
    conf = tmp_path / "a.toml"
    conf.write_text(f'[payload]\nmax_files = 3\nwork_dir = "{work_root / "a"}"\n')
    mesh.start("a", sim="gpu:1x16GiB", extra=["--config", str(conf)])
    res = mesh.cli("a", "submit", "--workdir", str(src), "--", "true", check=False)
    assert res.returncode != 0 and "outside the directory" in res.stderr
    os.unlink(src / "escape")
    res = mesh.cli("a", "submit", "--workdir", str(src), "--", "true", check=False)
    assert res.returncode != 0 and "more than 3 entries (max_files)" in res.stderr
    res = mesh.cli("a", "submit", "--workdir", str(tmp_path / "nope"), "--", "true",
                   check=False)
    assert res.returncode != 0 and "does not exist" in res.stderr


def test_a_job_placed_on_its_own_origin_uses_its_workdir(mesh: LocalMesh, tmp_path: Path,
                                                         work_root: Path) -> None:
    src = tmp_path / "here"
    src.mkdir()
    (src / "data.txt").write_text("local\n")
    mesh.start("a", sim="gpu:1x16GiB", extra=_config(mesh, "a", work_root))
    res = mesh.cli("a", "submit", "--gpu", "0.5", "--workdir", str(src), "-o", "json", "--",
                   "sh", "-c", 'cat data.txt; test "$PWD" = "$FLEXMESH_WORKDIR" && echo same')
    job_id = json.loads(res.stdout)["id"]
    job = mesh.wait_for("the job to end", lambda: _ended(mesh, "a", job_id))
    assert job["state"] == "succeeded" and job["node"] == "a", job
    assert mesh.cli("a", "logs", job_id).stdout == "local\nsame\n"
    counters = _counters(mesh, "a")
    assert counters.get("bundle_cache_hits") == 1 and not counters.get("bundle_fetches")


def test_a_bundle_the_owner_will_not_take_fails_the_job_with_a_reason(
        mesh: LocalMesh, tmp_path: Path, work_root: Path) -> None:
    src = tmp_path / "big"
    src.mkdir()
    (src / "blob").write_bytes(os.urandom(2 * 1024 * 1024))
    small = mesh.root / "a.toml"
    small.write_text(f'[payload]\nmax_bundle = 1\nwork_dir = "{work_root / "a"}"\n')
    mesh.start("a", sim="gpu:1x16GiB", extra=["--config", str(small)])
    mesh.start("d", join=["a"], extra=["--priority", "10", *_config(mesh, "d", work_root)])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "d"]))
    res = mesh.cli("d", "submit", "--gpu", "0.5", "--workdir", str(src), "-o", "json", "--",
                   "true")
    job_id = json.loads(res.stdout)["id"]
    job = mesh.wait_for("the job to end", lambda: _ended(mesh, "d", job_id))
    assert job["state"] == "failed" and job["node"] == "a", job
    assert job["reason"].startswith("workdir: ") and "max_bundle" in job["reason"]
    assert not _counters(mesh, "a").get("bundle_fetches")
    # The owner is unharmed: a job without a workdir runs there as before.
    res = mesh.cli("d", "submit", "--gpu", "0.5", "--wait", "--", "echo", "fine")
    assert res.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root agent runs jobs as another user")
def test_a_work_dir_the_jobs_user_cannot_reach_fails_the_job_saying_why(
        mesh: LocalMesh, tmp_path: Path) -> None:
    """A root agent whose work dir sits under a 0700 directory (pytest's own, as
    ``mktemp -d`` makes): a borrowed job that runs in its workdir fails at once, and the
    reason names the directory and the fix; the agent warned of it at start."""
    src = tmp_path / "project"
    src.mkdir()
    (src / "main.sh").write_text("echo hi\n")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    mesh.start("a", sim="gpu:1x16GiB", extra=_config(mesh, "a", closed))
    mesh.start("d", join=["a"], extra=["--priority", "10"])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "d"]))
    job_id = mesh.cli("d", "submit", "--gpu", "0.25", "--workdir", str(src), "--",
                      "sh", "main.sh").stdout.strip()
    job = mesh.wait_for("the job to end", lambda: _ended(mesh, "d", job_id))
    assert job["state"] == "failed", job
    assert "out of reach of the job's user" in job["reason"], job
    assert "chmod o+x" in job["reason"], job
    assert "work_dir_unreachable" in mesh.agents["a"].log.read_text()
