"""Sealed gossip and calls between real agents: wrong keys, rotation, plaintext refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexmesh.agent.localmesh import LocalMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]



def keygen() -> str:
    out = subprocess.run([sys.executable, "-m", "flexmesh.agent.cli", "keygen"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert len(out) == 44  # base64 of 32 bytes
    return out


def keyfile(mesh: LocalMesh, name: str, *keys: str) -> list[str]:
    path = mesh.root / f"{name}.keys"
    path.write_text("".join(k + "\n" for k in keys))
    path.chmod(0o600)
    return ["--key-file", str(path)]


def test_a_wrong_key_cannot_join_and_its_packets_are_counted(mesh: LocalMesh) -> None:
    k1, k2 = keygen(), keygen()
    mesh.start("a", sim="gpu:1x8GiB", extra=keyfile(mesh, "a", k1))
    mesh.start("b", join=["a"], extra=[*keyfile(mesh, "b", k1), "--priority", "5"])
    mesh.start("x", join=["a"], extra=keyfile(mesh, "x", k2))
    mesh.wait_for("a and b to converge", lambda: mesh.converged(["a", "b"]))
    assert mesh.cli("b", "submit", "--wait", "--gpu", "0.5", "--", "true").returncode == 0

    def rejected() -> dict[str, int] | None:
        c: dict[str, int] = mesh.json("a", "status")["status"]["counters"]
        return c if c.get("frames_dropped_unknown_key", 0) >= 1 else None

    mesh.wait_for("a to count x's join attempt", rejected)
    mesh.wait_for("a to log the unknown key", lambda: "sealed under a key this agent does "
                  "not have" in mesh.agents["a"].log.read_text())
    assert {r["name"] for r in mesh.json("a", "nodes")} == {"a", "b"}
    assert {r["name"] for r in mesh.json("x", "nodes")} == {"x"}
    assert mesh.json("a", "keys")["encrypted"] is True


def test_keys_rotate_on_a_running_mesh(mesh: LocalMesh) -> None:
    old, new = keygen(), keygen()
    mesh.start("a", sim="gpu:1x8GiB", extra=keyfile(mesh, "a", old))
    mesh.start("b", join=["a"], extra=[*keyfile(mesh, "b", old), "--priority", "5"])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "b"]))
    for step in (("add", new), ("promote", new), ("remove", old)):
        for n in ("a", "b"):
            mesh.cli(n, "keys", *step)
        assert mesh.converged(["a", "b"])
    view = mesh.json("a", "keys")
    assert len(view["keys"]) == 1 and view["primary"] == view["keys"][0]
    assert mesh.cli("b", "submit", "--wait", "--gpu", "0.5", "--", "true").returncode == 0
    # A newcomer with only the new key joins; one with only the old key cannot.
    mesh.start("c", join=["a"], extra=[*keyfile(mesh, "c", new), "--priority", "6"])
    mesh.start("o", join=["a"], extra=[*keyfile(mesh, "o", old), "--priority", "7"])
    mesh.wait_for("c to join", lambda: mesh.converged(["a", "b", "c"]))
    # The primary key cannot be removed.
    res = mesh.cli("a", "keys", "remove", new, check=False)
    assert res.returncode != 0 and "primary" in res.stderr


def agent_without_key(tmp_path: Path, bind: str, *extra: str,
                      env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Start an agent with no key; one that starts is stopped at once by its timeout."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "flexmesh.agent.cli", "agent", "--name", "p",
             "--bind", bind, "--socket", str(tmp_path / "s"), "--state-dir",
             str(tmp_path / "st"), "--ui", "", *extra], capture_output=True, text=True,
            timeout=60, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the agent started: {exc.stderr!r}") from None


@pytest.mark.parametrize("bind", ["0.0.0.0:0", "127.0.0.1:0"])
def test_no_key_refuses_to_start_and_says_how_to_make_one(tmp_path: Path, bind: str) -> None:
    """Issue 11: on loopback too; before, a loopback agent ran in plaintext, and any local
    user could read and cancel others' jobs through its port."""
    res = agent_without_key(tmp_path, bind)
    assert res.returncode == 2
    assert "no key is configured" in res.stderr and "flexmesh keygen FILE" in res.stderr
    assert "key_file" in res.stderr and "--insecure-plaintext" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_plaintext_asked_for_by_name_starts_and_warns(mesh: LocalMesh) -> None:
    mesh.plaintext = True
    mesh.start("a")
    assert mesh.json("a", "keys")["encrypted"] is False
    log = mesh.agents["a"].log.read_text()
    assert "INSECURE" in log and "plaintext" in log


def test_without_the_key_a_local_user_can_neither_read_a_job_nor_forge_a_death(
        mesh: LocalMesh) -> None:
    """Issue 11, as the attacker did it on loopback: a JobSync read another user's job
    output, a Cancel stopped it, a forged Dead marked its owner dead. A mesh (LocalMesh,
    the demo, the tests) now seals under its own key, so all three are dropped unread."""
    import asyncio
    import socket

    from flexmesh.agent import rpc
    from flexmesh.protocol import wire

    mesh.start("a", sim="gpu:1x8GiB")
    mesh.start("b", join=["a"], extra=["--priority", "5"])
    mesh.wait_for("a and b to converge", lambda: mesh.converged(["a", "b"]))
    res = mesh.cli("b", "submit", "--gpu", "0.5", "-o", "json", "--", "sh", "-c",
                   "echo secret; sleep 60")
    job_id = json.loads(res.stdout)["id"]
    mesh.wait_for("the job to run on a", lambda: (j := mesh.json("b", "show", job_id))[
        "state"] == "running" and j["node"] == "a")
    for msg in (wire.JobSync(job_id, 0, 0, 0), wire.Cancel(job_id, "by a stranger")):
        with pytest.raises(rpc.CallError):
            asyncio.run(rpc.call(mesh.agents["a"].addr, msg, 5.0))
    host, port = mesh.agents["a"].addr.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for inc in range(4):
            udp.sendto(wire.encode_packet([wire.Dead("b", inc, "x")]), (host, int(port)))
    mesh.wait_for("a to drop the forged datagrams", lambda: sum(
        v for k, v in mesh.json("a", "status")["status"]["counters"].items()
        if k.startswith("packets_dropped_")) >= 4)
    assert {r["name"]: r["state"] for r in mesh.json("a", "nodes")} == {
        "a": "alive", "b": "alive"}
    assert mesh.json("b", "show", job_id)["state"] == "running"


def test_fault_injection_is_refused_off_loopback(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('bind = "0.0.0.0:0"\n[testing]\nfault_drop = 0.1\n')
    res = subprocess.run(
        [sys.executable, "-m", "flexmesh.agent.cli", "agent", "--config", str(cfg),
         "--name", "p", "--socket", str(tmp_path / "s"), "--state-dir", str(tmp_path / "st")],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "loopback only" in res.stderr
