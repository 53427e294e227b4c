"""Who may do what on the socket: jobs run as their submitter, others cannot touch them.

Needs root (to switch users); the agent and the clients run as real, different uids.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexmesh.agent.localmesh import LocalMesh

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root"),
]

GROUP = 4242  # the socket's group in this test
ALICE, BOB, EVE = 12345, 12346, 12347  # uids with no passwd entry: gid = uid


@pytest.fixture
def mesh() -> Iterator[LocalMesh]:
    root = Path(tempfile.mkdtemp(prefix="flexmesh-priv-"))
    root.chmod(0o755)  # other users must reach the socket inside
    m = LocalMesh(root)
    try:
        yield m
    finally:
        m.close()
        shutil.rmtree(root, ignore_errors=True)


def as_user(mesh: LocalMesh, uid: int, groups: list[int], method: str, path: str,
            body: object = None) -> tuple[int, str]:
    """An HTTP request on the agent's socket from a forked child running as ``uid``.

    (A child that execs Python would need the interpreter to be readable by that user;
    forking keeps the test independent of where Python is installed.)"""
    from flexmesh.agent.cli import _UnixConnection

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, make one request, report, exit
        result: list[object]
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(uid)
            os.setuid(uid)
            conn = _UnixConnection(mesh.agents["a"].socket, 30)
            payload = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=payload)
            resp = conn.getresponse()
            result = [resp.status, resp.read().decode(errors="replace")]
        except OSError as exc:
            result = [-1, f"{type(exc).__name__}: {exc}"]
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(result))
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        status, text = json.loads(f.read())
    os.waitpid(pid, 0)
    return status, text


def test_jobs_run_as_their_submitter_and_only_they_may_touch_them(mesh: LocalMesh) -> None:
    config = mesh.root / "agent.toml"
    config.write_text(f'socket_group = "{GROUP}"\n')
    mesh.start("a", sim="gpu:1x8GiB", extra=["--config", str(config)])
    assert os.stat(mesh.agents["a"].socket).st_gid == GROUP
    assert os.stat(mesh.agents["a"].socket).st_mode & 0o777 == 0o660

    status, text = as_user(mesh, ALICE, [GROUP], "POST", "/v1/jobs", {
        "command": ["sh", "-c", "id -u; id -g; sleep 60"], "compute_milli": 500})
    assert status == 201, text
    job_id = json.loads(text)["id"]
    mesh.wait_for("running", lambda: mesh.json("a", "show", job_id)["state"] == "running")
    mesh.wait_for("output", lambda: len(mesh.cli("a", "logs", job_id).stdout.split()) == 2)

    # Bob is in the socket's group but did not submit it: he may not read or cancel it.
    status, text = as_user(mesh, BOB, [GROUP], "GET", f"/v1/jobs/{job_id}/logs")
    assert status == 403 and "not allowed" in text
    status, text = as_user(mesh, BOB, [GROUP], "DELETE", f"/v1/jobs/{job_id}")
    assert status == 403 and "not allowed" in text
    # Eve is not in the group: she cannot even connect.
    status, text = as_user(mesh, EVE, [], "GET", "/v1/jobs")
    assert status == -1 and "PermissionError" in text
    # Alice reads her job's output: it ran as her.
    status, text = as_user(mesh, ALICE, [GROUP], "GET", f"/v1/jobs/{job_id}/logs")
    assert status == 200 and text.split() == [str(ALICE), str(ALICE)]
    status, text = as_user(mesh, ALICE, [GROUP], "DELETE", f"/v1/jobs/{job_id}")
    assert status == 202, text
    job = mesh.wait_for("cancelled", lambda: (lambda j: j if j["state"] == "cancelled"
                        else None)(mesh.json("a", "show", job_id)))
    assert job["reason"] == "cancelled by user"
    log = mesh.agents["a"].log.read_text()
    assert f"uid={BOB}" in log and "refused cancel" in log


def test_root_submissions_do_not_run_as_root_unless_allowed(mesh: LocalMesh) -> None:
    mesh.start("a", sim="gpu:1x8GiB")
    out = mesh.cli("a", "submit", "--wait", "--gpu", "0.5", "--", "id", "-u").stdout
    (job_id,) = [j["id"] for j in mesh.json("a", "jobs")]
    assert out.strip() == mesh.cli("a", "logs", job_id).stdout.strip() != "0"
