"""``flexmesh submit --wait`` against a real agent: the job's output as it comes (stdout to
stdout, stderr to stderr), its exit code, and ``--timeout`` that gives up on time."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time

import pytest

from flexmesh.agent.localmesh import LocalMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_the_output_comes_as_it_is_written_and_the_exit_code_follows(mesh: LocalMesh) -> None:
    mesh.start("a", sim="gpu:1x8GiB")
    res = mesh.cli("a", "submit", "--wait", "--gpu", "0.5", "--", "sh", "-c",
                   "echo one; echo two >&2; echo three; printf 'four'; exit 7", check=False)
    assert res.returncode == 7
    assert res.stdout == "one\nthree\nfour"  # the job's stdout, nothing else
    assert res.stderr.startswith("two\n")
    assert "exited with code 7" in res.stderr.splitlines()[-1]
    # -o json: only the job's JSON, once it has ended
    res = mesh.cli("a", "submit", "--wait", "--gpu", "0.5", "-o", "json", "--", "sh", "-c",
                   "echo out; exit 3", check=False)
    assert res.returncode == 3 and json.loads(res.stdout)["exit_code"] == 3

    # Output printed while the job still runs: read before the job ends (it is cancelled).
    with subprocess.Popen(
            [sys.executable, "-m", "flexmesh.agent.cli", "submit", "--wait", "--gpu", "0.5",
             "--", "sh", "-c", "echo ready; exec sleep 300"],
            env={**os.environ, "FLEXMESH_SOCKET": mesh.agents["a"].socket},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                assert sel.select(timeout=60), "no output while the job runs"
            assert proc.stdout.readline() == b"ready\n"
            (job,) = [j for j in mesh.json("a", "jobs") if j["state"] == "running"]
            mesh.cli("a", "cancel", job["id"])
            # the job's own exit code (its shell's, killed by SIGTERM), as for a failure
            assert proc.wait(timeout=60) == 128 + 15
            assert b"cancelled by user" in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()


def test_timeout_gives_up_on_time_and_says_how_to_cancel(mesh: LocalMesh) -> None:
    mesh.start("a", sim="gpu:1x8GiB")
    for output in ("text", "json"):
        t0 = time.monotonic()
        res = mesh.cli("a", "submit", "--wait", "--timeout", "1", "--kind", "npu", "-o", output,
                       "--", "true", check=False)
        took = time.monotonic() - t0
        assert res.returncode == 124, res.stderr
        assert took < 10, took
        (line,) = res.stderr.splitlines()
        job_id = line.split("job ")[1].split()[0]
        assert line.startswith(f"flexmesh: gave up waiting after 1s: job {job_id} is still "
                               "queued (")
        assert line.endswith(f"`flexmesh cancel {job_id}` cancels it")
        if output == "json":
            assert json.loads(res.stdout)["state"] == "queued"
        else:
            assert res.stdout == ""
    assert [j["state"] for j in mesh.json("a", "jobs")] == ["queued", "queued"]  # they go on
