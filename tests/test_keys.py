"""Key files are treated like ssh keys, and the keyring in use is never a surprise."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from flexmesh.agent.config import Settings
from flexmesh.agent.runtime.keys import UNKNOWN_KEY_LOG_EVERY, Keys, KeysError
from flexmesh.protocol.crypto import Keyring, generate_key


def _keys(tmp_path: Path, mode: int, *keys: str) -> Keys:
    path = tmp_path / "cluster.keys"
    path.write_text("".join(k + "\n" for k in keys))
    path.chmod(mode)
    return Keys(Settings(key_file=str(path)), tmp_path / "state")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_key_file_others_may_read_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    keys = _keys(tmp_path, mode, generate_key())
    with pytest.raises(KeysError) as info:
        keys.load()
    assert f"chmod 600 {tmp_path / 'cluster.keys'}" in str(info.value)
    assert f"{mode:04o}" in str(info.value)


def test_a_private_key_file_loads(tmp_path: Path) -> None:
    keys = _keys(tmp_path, 0o600, generate_key())
    keys.load()
    assert keys.sealer is not None and len(keys.keyring) == 1


def test_the_log_says_when_the_state_dirs_keyring_overrides_the_key_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = _keys(tmp_path, 0o600, generate_key())
    (tmp_path / "state").mkdir()
    kept = Keyring([generate_key()])
    keys.path.write_text(json.dumps(kept.to_list()))
    with caplog.at_level(logging.WARNING, "flexmesh.agent"):
        keys.load()
    assert keys.keyring.keys == kept.keys
    assert f"using {keys.path}" in caplog.text and "differ" in caplog.text


def test_unknown_keys_are_logged_at_most_once_a_minute(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = _keys(tmp_path, 0o600, generate_key())
    with caplog.at_level(logging.WARNING, "flexmesh.agent"):
        for t in (100.0, 101.0, 100.0 + UNKNOWN_KEY_LOG_EVERY - 1):
            keys.unknown_key("10.0.0.9:7946", "abcd1234", t)
        assert caplog.text.count("does not have") == 1
        keys.unknown_key("10.0.0.9:7946", "abcd1234", 100.0 + UNKNOWN_KEY_LOG_EVERY)
    assert caplog.text.count("does not have") == 2 and "abcd1234" in caplog.text


def _keygen(*argv: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flexmesh.agent.cli", "keygen", *argv],
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60,
                          preexec_fn=lambda: os.umask(0o022))


def test_keygen_writes_private_files(tmp_path: Path) -> None:
    target = tmp_path / "new.keys"
    assert _keygen(str(target)).returncode == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert len(target.read_text().strip()) == 44
    again = _keygen(str(target))
    assert again.returncode == 1 and "exists" in again.stderr
    redirected = tmp_path / "redirected.keys"
    with open(redirected, "w") as f:  # as `flexmesh keygen > FILE` under umask 022
        os.chmod(redirected, 0o644)
        assert _keygen(stdout=f.fileno()).returncode == 0
    assert stat.S_IMODE(redirected.stat().st_mode) == 0o600
    assert len(redirected.read_text().strip()) == 44


def test_a_reload_with_a_refused_key_file_keeps_the_running_keys(tmp_path: Path) -> None:
    keys = _keys(tmp_path, 0o600, generate_key())
    keys.load()
    running, settings = keys.keyring.keys, keys.settings
    bad = tmp_path / "other.keys"
    bad.write_text(generate_key() + "\n")
    bad.chmod(0o644)
    with pytest.raises(KeysError, match="chmod 600"):
        keys.reload(Settings(key_file=str(bad)))
    assert keys.keyring.keys == running and keys.settings is settings


def test_no_key_is_refused_on_loopback_too_with_how_to_make_one(tmp_path: Path) -> None:
    keys = Keys(Settings(bind="127.0.0.1:7946"), tmp_path / "state")
    with pytest.raises(KeysError) as info:
        keys.load()
    text = str(info.value)
    assert "flexmesh keygen FILE" in text and "[security] key_file" in text
    assert "--insecure-plaintext" in text


@pytest.mark.parametrize(("bind", "where"), [("127.0.0.1:7946", "on loopback"),
                                             ("0.0.0.0:7946", "NOT loopback")])
def test_plaintext_asked_for_by_name_runs_and_warns_loudly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, bind: str, where: str) -> None:
    keys = Keys(Settings(bind=bind, insecure_plaintext=True), tmp_path / "state")
    with caplog.at_level(logging.WARNING, "flexmesh.agent"):
        keys.load()
    assert keys.sealer is None and keys.view()["encrypted"] is False
    assert "INSECURE" in caplog.text and where in caplog.text


def test_insecure_plaintext_comes_from_the_file_the_environment_or_the_flag(
        tmp_path: Path) -> None:
    from flexmesh.agent import config

    cfg = tmp_path / "agent.toml"
    cfg.write_text("[security]\ninsecure_plaintext = true\n")
    assert config.load(str(cfg), {}, env={}).insecure_plaintext
    assert config.load(None, {}, env={"FLEXMESH_INSECURE_PLAINTEXT": "1"}).insecure_plaintext
    assert config.load(None, {"insecure_plaintext": True}, env={}).insecure_plaintext
    assert not config.load(None, {"insecure_plaintext": None}, env={}).insecure_plaintext


def test_a_refused_reload_keeps_the_ring_and_a_kept_ring_needs_no_key_file(
        tmp_path: Path) -> None:
    keys = _keys(tmp_path, 0o600, generate_key())
    keys.load()
    running = keys.keyring.keys
    with pytest.raises(KeysError):  # the key file left the configuration, no plaintext
        keys.reload(Settings())
    assert keys.keyring.keys == running and keys.view()["keys"] == list(running)
    (tmp_path / "state").mkdir()
    keys.path.write_text(json.dumps(keys.keyring.to_list()))  # as `flexmesh keys` keeps it
    (tmp_path / "cluster.keys").unlink()  # the old file is gone: the kept ring still loads
    again = Keys(keys.settings, tmp_path / "state")
    again.load()
    assert again.keyring.keys == running
