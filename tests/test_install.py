"""scripts/install and scripts/uninstall in a throw-away root; the unit passes systemd-analyze."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
UNIT = "etc/systemd/system/flexmesh.service"
CONFIG = "etc/flexmesh/agent.toml"
VENV_BIN = "opt/flexmesh/venv/bin/flexmesh"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                           reason="systemd-analyze is not installed")


def run(script: str, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["bash", str(SCRIPTS / script), *map(str, args)],
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def unit_directives(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values]}}`` of a unit file (keys may repeat, as systemd allows)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)


def verifiable_copy(root: Path, unit: Path, dest: Path) -> Path:
    """The unit with ExecStart pointed at a stand-in executable inside ``root``.

    verify checks that ExecStart exists on this machine; the throw-away root has no venv
    (--no-venv), so a stand-in script takes the venv's place.
    """
    fake = root / VENV_BIN
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = unit.read_text()
    assert "ExecStart=/opt/flexmesh/venv/bin/flexmesh " in text
    dest.mkdir(parents=True, exist_ok=True)
    copy = dest / "flexmesh.service"
    copy.write_text(text.replace("ExecStart=/opt/flexmesh/", f"ExecStart={root}/opt/flexmesh/"))
    return copy


@pytest.fixture
def installed(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "root"
    result = run("install", "--root", root, "--no-venv")
    return root, result.stdout


# --- install ----------------------------------------------------------------------------------


def test_install_writes_unit_config_and_share(installed) -> None:
    root, _ = installed
    assert (root / UNIT).read_text() == (SCRIPTS / "flexmesh.service").read_text()
    assert (root / CONFIG).read_text() == (SCRIPTS / "agent.toml").read_text()
    assert stat.S_IMODE((root / CONFIG).stat().st_mode) == 0o640
    assert stat.S_IMODE((root / UNIT).stat().st_mode) == 0o644
    share = root / "opt/flexmesh/share"
    assert (share / "agent.toml.example").read_text() == (SCRIPTS / "agent.toml").read_text()
    assert (share / "README.md").read_text() == (ROOT / "README.md").read_text()
    link = root / "usr/local/bin/flexmesh"
    assert link.is_symlink() and os.readlink(link) == "/opt/flexmesh/venv/bin/flexmesh"


def test_install_under_a_root_touches_no_group_and_no_systemctl(installed) -> None:
    root, out = installed
    assert "not creating the flexmesh group" in out
    assert "not enabling the service" in out
    assert not (root / "opt/flexmesh/venv").exists()  # --no-venv
    assert not (root / "etc/group").exists()


def test_install_never_overwrites_an_operators_config(installed) -> None:
    root, _ = installed
    (root / CONFIG).write_text('name = "edited-by-the-operator"\n')
    (root / UNIT).write_text("[Unit]\n")  # the unit, on the other hand, is ours: replaced
    out = run("install", "--root", root, "--no-venv").stdout
    assert (root / CONFIG).read_text() == 'name = "edited-by-the-operator"\n'
    assert "kept" in out and "agent.toml" in out
    assert (root / UNIT).read_text() == (SCRIPTS / "flexmesh.service").read_text()


def test_install_refuses_unknown_options(tmp_path: Path) -> None:
    result = run("install", "--root", tmp_path, "--bogus", check=False)
    assert result.returncode == 2 and "unknown option --bogus" in result.stderr
    assert not (tmp_path / UNIT).exists()


def test_install_help_describes_the_options() -> None:
    out = run("install", "--help").stdout
    for option in ("--root", "--python", "--no-venv", "--wheels"):
        assert option in out


@pytest.mark.skipif(os.environ.get("FLEXMESH_TEST_VENV_INSTALL") != "1",
                    reason="builds a venv with pip (needs a package index): set "
                           "FLEXMESH_TEST_VENV_INSTALL=1")
def test_install_builds_a_working_venv(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run("install", "--root", root, "--python", sys.executable)
    out = subprocess.run([str(root / VENV_BIN), "agent", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--config" in out.stdout
    assert not list(ROOT.glob("*.egg-info")) and not (ROOT / "build").exists()


# --- the unit ---------------------------------------------------------------------------------


def test_unit_has_the_service_contract() -> None:
    service = unit_directives((SCRIPTS / "flexmesh.service").read_text())["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/opt/flexmesh/venv/bin/flexmesh agent --config /etc/flexmesh/agent.toml",
        "Restart": "on-failure",
        "WatchdogSec": "30",
        "TimeoutStopSec": "30",
        "KillMode": "process",
        "RuntimeDirectory": "flexmesh",
        "StateDirectory": "flexmesh",
        "ConfigurationDirectory": "flexmesh",
        "OOMPolicy": "continue",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], key


def test_unit_keeps_jobs_able_to_run_as_other_users() -> None:
    service = unit_directives((SCRIPTS / "flexmesh.service").read_text())["Service"]
    assert "User" not in service and "DynamicUser" not in service  # root, to setuid jobs
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices",
                "DevicePolicy", "ProtectClock", "RestrictNamespaces", "MemoryDenyWriteExecute",
                "SystemCallFilter", "RestrictSUIDSGID", "AmbientCapabilities"):
        assert key not in service, f"{key} would be inherited by every job; see the unit"
    [bounding] = service["CapabilityBoundingSet"]
    assert bounding.startswith("~")  # a deny-list: setuid helpers in jobs keep working
    for needed in ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_SYS_ADMIN", "CAP_SYS_MODULE"):
        assert needed not in bounding
    assert service["ProtectSystem"] == ["full"]


def test_main_py_stops_within_the_units_timeout() -> None:
    from flexmesh.agent import main

    stop_timeout = getattr(main, "STOP_TIMEOUT", None)
    if stop_timeout is None:
        pytest.skip("flexmesh.agent.main has no STOP_TIMEOUT any more")
    service = unit_directives((SCRIPTS / "flexmesh.service").read_text())["Service"]
    assert float(service["TimeoutStopSec"][0]) > stop_timeout


@needs_systemd_analyze
def test_systemd_analyze_accepts_the_installed_unit(installed, tmp_path: Path) -> None:
    root, _ = installed
    unit = verifiable_copy(root, root / UNIT, tmp_path / "verify")
    result = verify(unit)
    # verify exits 0 on unknown keys and bad values too, but says so: demand silence.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr)


@needs_systemd_analyze
@pytest.mark.parametrize(("find", "replace"), [
    ("WatchdogSec=30", "WatchdogSecs=30"),
    ("KillMode=process", "KillMode=sometimes"),
    ("Type=notify", "Type=notifying"),
])
def test_the_verify_check_notices_a_broken_unit(installed, tmp_path: Path, find, replace) -> None:
    root, _ = installed
    unit = root / UNIT
    unit.write_text(unit.read_text().replace(find, replace))
    result = verify(verifiable_copy(root, unit, tmp_path / "verify"))
    assert result.returncode != 0 or (result.stdout + result.stderr).strip()


# --- uninstall --------------------------------------------------------------------------------


def test_uninstall_keeps_config_and_state_unless_purged(installed) -> None:
    root, _ = installed
    (root / "var/lib/flexmesh").mkdir(parents=True)
    (root / "var/lib/flexmesh/journal.sqlite").write_bytes(b"jobs")
    (root / "usr/local/bin/other").write_text("not ours")
    out = run("uninstall", "--root", root).stdout
    assert not (root / UNIT).exists()
    assert not (root / "opt/flexmesh").exists()
    assert not (root / "usr/local/bin/flexmesh").is_symlink()
    assert (root / "usr/local/bin/other").exists()
    assert (root / CONFIG).exists() and (root / "var/lib/flexmesh/journal.sqlite").exists()
    assert "kept" in out
    run("uninstall", "--root", root, "--purge")
    assert not (root / "etc/flexmesh").exists() and not (root / "var/lib/flexmesh").exists()


def test_uninstall_leaves_a_flexmesh_command_that_is_not_ours(installed) -> None:
    root, _ = installed
    link = root / "usr/local/bin/flexmesh"
    link.unlink()
    link.write_text("#!/bin/sh\n")
    run("uninstall", "--root", root)
    assert link.exists()


def test_install_after_uninstall_restores_everything(installed) -> None:
    root, _ = installed
    (root / CONFIG).write_text('profile = "edge"\n')
    run("uninstall", "--root", root)
    run("install", "--root", root, "--no-venv")
    assert (root / UNIT).exists()
    assert (root / CONFIG).read_text() == 'profile = "edge"\n'
