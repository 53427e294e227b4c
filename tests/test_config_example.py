"""scripts/agent.toml documents every key the agent accepts, with the real defaults.

The example lists each setting commented out as ``#key = value`` (no space after ``#``;
prose comments have one). These tests load the file as shipped, load it again with every
setting uncommented, and compare both the keys and the values with agent/config.py, so the
documentation cannot drift from the loader.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from flexmesh.agent import config
from flexmesh.agent.config import Settings

EXAMPLE = Path(__file__).resolve().parents[1] / "scripts" / "agent.toml"
SETTING = re.compile(r"^#([a-z_]+) = ")


def uncommented(text: str) -> str:
    return "\n".join(line[1:] if SETTING.match(line) else line for line in text.splitlines())


def documented_keys(text: str) -> set[tuple[str, str]]:
    """(table, key) of every commented-out setting, "" being the top level."""
    keys, table = set(), ""
    for line in text.splitlines():
        header = re.match(r"^\[([a-z_]+)\]\s*$", line)
        if header:
            table = header.group(1)
        elif match := SETTING.match(line):
            keys.add((table, match.group(1)))
    return keys


def accepted_keys() -> set[tuple[str, str]]:
    return {(table, key) for table, keys in config._TABLES.items() for key in keys}


@pytest.fixture
def active_example(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(uncommented(EXAMPLE.read_text()))
    return path


def test_the_example_as_shipped_loads() -> None:
    settings = config.load(str(EXAMPLE), {}, env={})
    assert settings == Settings(name=settings.name)  # everything is commented out


def test_the_example_documents_every_accepted_key() -> None:
    missing = accepted_keys() - documented_keys(EXAMPLE.read_text())
    assert not missing, f"add to scripts/agent.toml: {sorted(missing)}"


def test_the_example_documents_no_key_the_agent_refuses() -> None:
    extra = documented_keys(EXAMPLE.read_text()) - accepted_keys()
    assert not extra, f"agent/config.py does not accept: {sorted(extra)}"


def test_each_key_is_documented_once() -> None:
    lines = [SETTING.match(line) for line in EXAMPLE.read_text().splitlines()]
    names = [m.group(1) for m in lines if m]
    assert len(names) == len(documented_keys(EXAMPLE.read_text()))


def test_every_setting_uncommented_still_loads(active_example: Path) -> None:
    data = tomllib.loads(active_example.read_text())
    assert {(t, k) for t, v in data.items() if isinstance(v, dict) for k in v} | {
        ("", k) for k, v in data.items() if not isinstance(v, dict)} == accepted_keys()
    config.load(str(active_example), {}, env={})


def test_the_documented_values_are_the_defaults(active_example: Path) -> None:
    loaded = config.load(str(active_example), {}, env={})
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        if f.name == "name":  # the default is this host's name; the example shows a sample
            continue
        assert getattr(loaded, f.name) == getattr(defaults, f.name), f.name


def test_the_example_is_the_config_the_unit_uses() -> None:
    unit = (EXAMPLE.parent / "flexmesh.service").read_text()
    assert "--config /etc/flexmesh/agent.toml" in unit
    defaults = Settings()
    assert defaults.socket.startswith("/run/flexmesh/")  # RuntimeDirectory=flexmesh
    assert defaults.state_dir == "/var/lib/flexmesh"  # StateDirectory=flexmesh
