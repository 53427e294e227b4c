"""Real agents, real podman: a job submitted with --image on a deviceless node runs in a
container on the one node that has a runtime, with its workdir mounted, as the borrowed
user, without a network, and its output comes back; a cancelled job's container is gone;
a container an earlier agent left behind is removed at start.

The image is built here from busybox with ``podman import`` (no registry is reachable).
The tests skip, saying why, only where podman cannot run a container at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flexmesh.agent.localmesh import LocalMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")
# podman 4.3 on these machines starts a container only with runc (crun, podman's default
# where it is installed, fails on the hybrid cgroups) and lowered rlimits.
EXTRA_ARGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit",
              "nproc=1024:1024"]
APPLETS = ("sh", "cat", "echo", "sleep", "id", "ls", "pwd", "true")


def _podman(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *argv], capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local busybox image, or a skip saying why podman cannot run one."""
    busybox = shutil.which("busybox")
    if shutil.which("podman") is None or busybox is None:
        pytest.skip("podman or busybox is not installed (.ci/run installs podman, runc and "
                    "busybox-static)")
    root = tmp_path_factory.mktemp("rootfs")
    (root / "bin").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "proc", "sys", "dev", "etc"):
        (root / d).mkdir()
    tar = root.parent / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        t.add(root, arcname=".")
    ref = f"localhost/flexmesh-test-busybox:{uuid.uuid4().hex[:8]}"
    done = _podman("import", str(tar), ref)
    if done.returncode != 0:
        pytest.skip(f"podman cannot import an image here: {done.stderr.strip()[-300:]}")
    probe = _podman("run", "--rm", *EXTRA_ARGS, ref, "true")
    if probe.returncode != 0:
        _podman("rmi", "-f", ref)
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-300:]}")
    try:
        yield ref
    finally:
        _podman("rmi", "-f", ref)


def _config(mesh: LocalMesh, name: str, work: Path, runtime: str = "podman") -> list[str]:
    path = mesh.root / f"{name}.toml"
    path.write_text(f'[payload]\nwork_dir = "{work / name}"\n[jobs]\nstop_grace = 2\n'
                    f'[containers]\nruntime = "{runtime}"\nextra_args = {json.dumps(EXTRA_ARGS)}\n')
    return ["--config", str(path)]


def _containers(label: str) -> list[str]:
    done = _podman("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}")
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _ended(mesh: LocalMesh, node: str, job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = mesh.json(node, "show", job_id)
    return job if job["state"] in TERMINAL else None


def _names() -> tuple[str, str, str]:
    """Node names of this test alone: containers are found by a label naming the node."""
    tag = uuid.uuid4().hex[:6]
    return f"box-{tag}", f"bare-{tag}", f"desk-{tag}"


def test_an_image_job_runs_on_the_node_with_a_runtime_and_its_output_comes_back(
        mesh: LocalMesh, image: str, tmp_path: Path, work_root: Path) -> None:
    box, bare, desk = _names()
    src = tmp_path / "project"
    src.mkdir()
    (src / "data.txt").write_text("forty-two\n")
    mesh.start(box, sim="gpu:1x16GiB", extra=_config(mesh, box, work_root))
    mesh.start(bare, sim="gpu:1x16GiB", join=[box],
               extra=_config(mesh, bare, work_root, runtime="none"))
    mesh.start(desk, join=[box], extra=["--priority", "10",
                                        *_config(mesh, desk, work_root, runtime="none")])
    mesh.wait_for("convergence", lambda: mesh.converged([box, bare, desk]))
    script = ('cat data.txt; echo "work=$FLEXMESH_WORKDIR pwd=$(pwd)"; echo "uid=$(id -u)"; '
              'echo "net=$(ls /sys/class/net | tr "\\n" " ")"; echo "path=$PATH"')
    ids = []
    for _ in range(2):  # both go to the one node with podman, though the other is free
        res = mesh.cli(desk, "submit", "--gpu", "0.25", "--image", image, "--workdir",
                       str(src), "-o", "json", "--", "sh", "-c", script)
        ids.append(json.loads(res.stdout)["id"])
    for job_id in ids:
        job = mesh.wait_for("the job to end", lambda j=job_id: _ended(mesh, desk, j), 90)
        assert job["state"] == "succeeded" and job["node"] == box, job
        assert job["image"] == image and job["image_network"] == "none"
        out = mesh.cli(desk, "logs", job_id).stdout.splitlines()
        assert out[0] == "forty-two"
        assert out[1] == "work=/flexmesh/work pwd=/flexmesh/work"
        if os.geteuid() == 0:
            assert out[2] == "uid=65534"  # a borrowed job runs as nobody, in its container too
        assert out[3].split("=", 1)[1].split() == ["lo"]  # no network but loopback
        assert "/flexmesh" not in out[4]
    mesh.wait_for("its containers to go", lambda: not _containers(f"flexmesh.node={box}"))

    def held(node: str) -> int:
        count: int = next(n["held"] for n in mesh.json(desk, "nodes") if n["name"] == node)
        return count

    # box gossips that it holds the image (podman lists it) and the bundle it fetched
    mesh.wait_for("box's digest of what it holds", lambda: held(box) >= 2)
    assert held(bare) == 0


def test_a_cancelled_image_job_leaves_no_container(mesh: LocalMesh, image: str,
                                                   work_root: Path) -> None:
    box, _, _ = _names()
    mesh.start(box, sim="gpu:1x16GiB", extra=_config(mesh, box, work_root))
    # The command ignores SIGTERM: only the runtime's SIGKILL after the grace ends it.
    res = mesh.cli(box, "submit", "--gpu", "0.5", "--image", image, "-o", "json", "--",
                   "sh", "-c", 'trap "" TERM; echo started; while true; do sleep 1; done')
    job_id = json.loads(res.stdout)["id"]
    label = f"flexmesh.job={job_id}"
    mesh.wait_for("the job to start", lambda: "started" in mesh.cli(box, "logs", job_id).stdout,
                  60)
    assert len(_containers(label)) == 1
    mesh.cli(box, "cancel", job_id)
    job = mesh.wait_for("the job to end", lambda: _ended(mesh, box, job_id), 60)
    assert job["state"] == "cancelled", job
    mesh.wait_for("its container to go", lambda: not _containers(label), 30)


def test_a_container_whose_run_is_not_here_is_removed_at_start(
        mesh: LocalMesh, image: str, work_root: Path) -> None:
    box, _, _ = _names()
    stray = f"flexmesh-stray-{box}"
    done = _podman("run", "-d", "--name", stray, "--label", f"flexmesh.node={box}",
                   "--label", "flexmesh.job=0000000000aa", *EXTRA_ARGS, image, "sleep", "300")
    assert done.returncode == 0, done.stderr
    other = _podman("run", "-d", "--name", f"{stray}-other", "--label", "flexmesh.node=else",
                    "--label", "flexmesh.job=0000000000bb", *EXTRA_ARGS, image, "sleep", "300")
    try:
        mesh.start(box, sim="gpu:1x16GiB", extra=_config(mesh, box, work_root))
        mesh.wait_for("the stray container to go",
                      lambda: not _containers(f"flexmesh.node={box}"), 60)
        assert _containers("flexmesh.node=else") == [f"{stray}-other"]  # not this node's
    finally:
        _podman("rm", "-f", "-t", "0", stray, f"{stray}-other")
        assert other.returncode == 0, other.stderr


def test_a_restarted_agent_adopts_its_running_container_and_stops_it(
        mesh: LocalMesh, image: str, work_root: Path) -> None:
    box, _, _ = _names()
    mesh.start(box, sim="gpu:1x16GiB", extra=_config(mesh, box, work_root))
    res = mesh.cli(box, "submit", "--gpu", "0.5", "--image", image, "-o", "json", "--",
                   "sh", "-c", "echo started; while true; do sleep 1; done")
    job_id = json.loads(res.stdout)["id"]
    label = f"flexmesh.job={job_id}"
    mesh.wait_for("the job to start", lambda: "started" in mesh.cli(box, "logs", job_id).stdout,
                  60)
    mesh.kill(box)  # the job's podman client lives on in a session of its own
    mesh.restart(box)
    job = mesh.json(box, "show", job_id)
    assert job["state"] == "running", job
    assert len(_containers(label)) == 1  # adopted: not removed as a stray
    mesh.cli(box, "cancel", job_id)
    job = mesh.wait_for("the job to end", lambda: _ended(mesh, box, job_id), 60)
    assert job["state"] == "cancelled", job
    mesh.wait_for("its container to go", lambda: not _containers(label), 30)


def test_bench_containers_smoke(image: str, capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/bench_containers at its smallest (skipped with the others where podman
    cannot run): one JSON line of the expected shape."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_containers.py"
    spec = importlib.util.spec_from_file_location("_smoke_bench_containers", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    assert bench.main(["--runs", "1"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert line["bench"] == "container-first-line" and line["runs"] == 1
    assert 0 < line["by_hand_p50_s"] < 60 and 0 < line["flexmesh_p50_s"] < 60


def test_an_image_jobs_results_come_back_to_its_submitter(
        mesh: LocalMesh, image: str, tmp_path: Path, work_root: Path) -> None:
    box, _, desk = _names()
    src = tmp_path / "project"
    src.mkdir()
    (src / "data.txt").write_text("forty-two\n")
    mesh.start(box, sim="gpu:1x16GiB", extra=_config(mesh, box, work_root))
    mesh.start(desk, join=[box], extra=["--priority", "10",
                                        *_config(mesh, desk, work_root, runtime="none")])
    mesh.wait_for("convergence", lambda: mesh.converged([box, desk]))
    script = ('cat data.txt > "$FLEXMESH_OUTPUT/copy.txt"; '
              'echo "$FLEXMESH_OUTPUT uid=$(id -u)" > "$FLEXMESH_OUTPUT/where.txt"')
    res = mesh.cli(desk, "submit", "--gpu", "0.25", "--image", image, "--workdir", str(src),
                   "-o", "json", "--", "sh", "-c", script)
    job_id = json.loads(res.stdout)["id"]

    def results_here() -> dict[str, Any] | None:
        job = _ended(mesh, desk, job_id)
        return job if job and job["results"]["state"] not in ("pending", "fetching") else None

    job = mesh.wait_for("the job's results", results_here, 90)
    assert job["state"] == "succeeded" and job["node"] == box, job
    assert job["results"]["state"] == "here", job["results"]
    dest = tmp_path / "back"
    mesh.cli(desk, "results", job_id, str(dest))
    assert (dest / "copy.txt").read_text() == "forty-two\n"
    where, uid = (dest / "where.txt").read_text().split()
    assert where == "/flexmesh/output"
    if os.geteuid() == 0:
        assert uid == "uid=65534"  # written as the borrowed user, in its own directory
    mesh.wait_for("its container to go", lambda: not _containers(f"flexmesh.node={box}"))
