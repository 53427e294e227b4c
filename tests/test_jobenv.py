"""A job's environment: clean (never the agent's), the submitter's variables, then the
owner's, which a submitter can neither set nor override."""

from __future__ import annotations

import json
import os
import pwd

import pytest

from flexmesh.agent.api import BadRequest, parse_submit
from flexmesh.agent.jobenv import (
    ROOT_PATH,
    USER_PATH,
    base_env,
    is_reserved,
    job_environment,
    reserved_problem,
    user_layer,
)
from flexmesh.agent.localmesh import LocalMesh

# Every variable the owner's layer may set, in every enforcement mode, and the loader's
# hooks: none may come from a submitter.
OWNERS = ["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES",
          "ASCEND_VISIBLE_DEVICES", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
          "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "CUDA_MPS_PIPE_DIRECTORY",
          "CUDA_MPS_LOG_DIRECTORY", "CUDA_DEVICE_MEMORY_LIMIT", "CUDA_DEVICE_MEMORY_LIMIT_0",
          "CUDA_DEVICE_MEMORY_SHARED_CACHE", "CUDA_DEVICE_SM_LIMIT", "LD_PRELOAD", "LD_AUDIT",
          "FLEXMESH_JOB_ID", "FLEXMESH_DEVICE", "FLEXMESH_MEMORY_MIB", "FLEXMESH_GANG_RANK"]


@pytest.mark.parametrize("name", OWNERS)
def test_a_submit_that_sets_an_owners_variable_is_refused_naming_it(name: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_submit({"command": ["true"], "env": {"A": "1", name: "7"}})
    assert name in str(info.value) and "A," not in str(info.value)


@pytest.mark.parametrize("name", OWNERS)
def test_an_owners_variable_from_a_peer_never_reaches_the_job(name: str) -> None:
    # A StartJob from an older or hostile origin skips the API's check: the owner drops
    # the name, and its own value (if it sets one) wins.
    env = job_environment({"PATH": USER_PATH}, {name: "7", "KEEP": "me"},
                          {"CUDA_VISIBLE_DEVICES": "GPU-1"})
    assert env["KEEP"] == "me"
    if name.startswith("FLEXMESH_GANG"):
        assert env[name] == "7"  # set by the gang's origin, which strips the user's own
    elif name == "CUDA_VISIBLE_DEVICES":
        assert env[name] == "GPU-1"
    else:
        assert name not in env


def test_ordinary_variables_pass_and_override_the_base() -> None:
    assert reserved_problem({"PATH": "/opt/bin", "OMP_NUM_THREADS": "4", "HOME": "/x"}) is None
    env = job_environment(base_env(0), {"PATH": "/opt/bin"}, {"FLEXMESH_JOB_ID": "j"})
    assert env["PATH"] == "/opt/bin" and env["FLEXMESH_JOB_ID"] == "j"
    assert not is_reserved("LD_LIBRARY_PATH") and not is_reserved("CUDA_HOME")
    assert user_layer({"FLEXMESH_DEVICE": "x", "FLEXMESH_GANG": "g"}) == {"FLEXMESH_GANG": "g"}


def test_the_base_is_the_users_own_and_not_the_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_SECRET", "s3cret")
    nobody = pwd.getpwnam("nobody")
    env = base_env(nobody.pw_uid, "en_US.UTF-8")
    assert env == {"PATH": USER_PATH, "HOME": nobody.pw_dir, "USER": "nobody",
                   "LOGNAME": "nobody", "SHELL": nobody.pw_shell, "LANG": "en_US.UTF-8"}
    root = base_env(0, "")
    assert root["PATH"] == ROOT_PATH and root["USER"] == "root" and "LANG" not in root
    stranger = base_env(4_000_000_001)  # no passwd entry
    assert stranger["USER"] == "4000000001" and stranger["HOME"] == "/"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_borrowed_job_sees_a_clean_environment(mesh: LocalMesh,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_SECRET", "s3cret")  # the agents inherit it; jobs must not
    mesh.start("a", sim="gpu:1x16GiB")
    mesh.start("d", join=["a"])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "d"]))
    bad = mesh.cli("d", "submit", "--env", "CUDA_VISIBLE_DEVICES=7", "--", "true",
                   check=False)
    assert bad.returncode == 2 and "CUDA_VISIBLE_DEVICES" in bad.stderr
    res = mesh.cli("d", "submit", "--gpu", "0.5", "--env", "MINE=1", "-o", "json",
                   "--", "env")
    job_id = json.loads(res.stdout)["id"]
    job = mesh.wait_for("the job to end", lambda: _ended(mesh, job_id))
    assert job["state"] == "succeeded" and job["node"] == "a", job
    out = mesh.cli("d", "logs", job_id).stdout
    seen = dict(line.split("=", 1) for line in out.splitlines())
    assert "AGENT_SECRET" not in seen and "VIRTUAL_ENV" not in seen
    assert seen["MINE"] == "1" and seen["LANG"] == "C.UTF-8"
    user = pwd.getpwnam(seen["USER"])
    assert seen["HOME"] == user.pw_dir and seen["LOGNAME"] == seen["USER"]
    assert seen["PATH"] == (ROOT_PATH if user.pw_uid == 0 else USER_PATH)
    if os.geteuid() == 0:
        assert seen["USER"] == "nobody"  # borrowed: the owner's borrowed_user
    assert seen["FLEXMESH_JOB_ID"] == job_id and seen["FLEXMESH_ORIGIN"] == "d"
    assert seen["FLEXMESH_MEMORY_MIB"] == "8192"  # half of 16 GiB: in proportion, not 0
    assert {k for k in seen if k.startswith("FLEXMESH_")} <= {
        "FLEXMESH_JOB_ID", "FLEXMESH_DEVICE", "FLEXMESH_COMPUTE_MILLI",
        "FLEXMESH_MEMORY_MIB", "FLEXMESH_ORIGIN", "FLEXMESH_OUTPUT"}
    assert seen["FLEXMESH_OUTPUT"].endswith(f"/{job_id}/1.output")  # a fresh one per run


def _ended(mesh: LocalMesh, job_id: str) -> dict[str, object] | None:
    job: dict[str, object] = mesh.json("d", "show", job_id)
    return job if job["state"] in ("succeeded", "failed", "cancelled", "lost") else None
