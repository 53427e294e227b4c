"""Sealed gossip and calls between real agents: wrong keys, rotation, plaintext refusal."""

from __future__ import annotations

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


def test_no_key_off_loopback_refuses_to_start(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "flexmesh.agent.cli", "agent", "--name", "p",
         "--bind", "0.0.0.0:0", "--socket", str(tmp_path / "s"), "--state-dir",
         str(tmp_path / "st")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "no key is configured" in res.stderr and "flexmesh keygen" in res.stderr


def test_fault_injection_is_refused_off_loopback(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('bind = "0.0.0.0:0"\n[testing]\nfault_drop = 0.1\n')
    res = subprocess.run(
        [sys.executable, "-m", "flexmesh.agent.cli", "agent", "--config", str(cfg),
         "--name", "p", "--socket", str(tmp_path / "s"), "--state-dir", str(tmp_path / "st")],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "loopback only" in res.stderr
