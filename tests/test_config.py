"""flexmesh.agent.config.load: every kind of bad value stops the agent with one clear line.

Each refusal is a ConfigError whose message is one line that starts with the file and
names the key. Then the sources: ``FLEXMESH_<KEY>`` overrides a default, the file
overrides the environment, a flag overrides both. The bugs found here earlier (bad integer
text, NaN durations, blaming the file for a flag's value) stay as plain tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flexmesh.agent.config import ConfigError, Settings, is_loopback_host, load


@pytest.fixture
def cfg(tmp_path: Path):
    """Write a config file and return its path."""

    def write(text: str) -> str:
        path = tmp_path / "agent.toml"
        path.write_text(text)
        return str(path)

    return write


def refused(path: str | None, flags: dict[str, Any] | None = None,
            env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, flags or {}, env={} if env is None else env)
    message = str(info.value)
    assert "\n" not in message, "one line, for journald"
    if path is not None:
        assert message.startswith(f"{path}: "), message
    return message


# --- one test per kind of bad value ------------------------------------------------------------


@pytest.mark.parametrize("text", ['colour = "blue"\n', 'Name = "n1"\n', 'sim = "gpu:1x8GiB"\n'])
def test_unknown_top_level_key(cfg, text: str) -> None:
    key = text.split(" ")[0]
    assert refused(cfg(text)).endswith(f"unknown key {key}")


@pytest.mark.parametrize(("text", "named"), [
    ("[devices]\ngpus = 2\n", "[devices] gpus"),
    ("[scheduler]\nstop_grace = 5.0\n", "[scheduler] stop_grace"),  # lives in [jobs]
    ("[log]\nlog_level = \"info\"\n", "[log] log_level"),  # the key is [log] level
])
def test_unknown_key_in_a_table(cfg, text: str, named: str) -> None:
    assert refused(cfg(text)).endswith(f"unknown key {named}")


def test_unknown_table(cfg) -> None:
    assert refused(cfg("[nonsense]\nx = 1\n")).endswith("unknown key nonsense")


@pytest.mark.parametrize(("text", "named", "want"), [
    ("bind = 7946\n", "bind", "str"),
    ("join = \"a:1\"\nname = 5\n", "name", "str"),
    ('join = ["h:1", 2]\n', "join", "list"),
    ("[devices]\nnvml = \"maybe\"\n", "[devices] nvml", "bool"),
    ("[devices]\nnvml = 1\n", "[devices] nvml", "bool"),
    ("[devices]\nreserve_memory_mib = 1.5\n", "[devices] reserve_memory_mib", "int"),
    ("[devices]\nreserve_memory_mib = \"4GiB\"\n", "[devices] reserve_memory_mib", "int"),
    ("[scheduler]\npriority = true\n", "[scheduler] priority", "int"),
    ("[scheduler]\nlease_ttl = \"soon\"\n", "[scheduler] lease_ttl", "float"),
    ("[scheduler]\nlease_ttl = true\n", "[scheduler] lease_ttl", "float"),
    ("[jobs]\nstop_grace = [10]\n", "[jobs] stop_grace", "float"),
    ("[log]\nlevel = 3\n", "[log] level", "str"),
    ("[bind]\nport = 1\n", "bind", "str"),
])
def test_wrong_type(cfg, text: str, named: str, want: str) -> None:
    assert f"{named} must be a {want}, got " in refused(cfg(text))


@pytest.mark.parametrize("key", ["reserve_memory_mib", "reserve_compute_milli"])
def test_negative_size(cfg, key: str) -> None:
    assert f"{key} must not be negative" in refused(cfg(f"[devices]\n{key} = -1\n"))


def test_fraction_above_one_device(cfg) -> None:
    message = refused(cfg("[devices]\nreserve_compute_milli = 1001\n"))
    assert "reserve_compute_milli is above one device" in message


@pytest.mark.parametrize(("text", "named"), [
    ('[scheduler]\nlease_ttl = 0\n', "lease_ttl"),
    ('[scheduler]\nlease_ttl = -1.5\n', "lease_ttl"),
    ('[jobs]\nstop_grace = -1\n', "stop_grace"),
    ('[jobs]\nowner_away_limit = 0\n', "owner_away_limit"),
])
def test_impossible_duration(cfg, text: str, named: str) -> None:
    assert named in refused(cfg(text))


@pytest.mark.parametrize(("text", "problem"), [
    ("frame_budget_mib = 7", "[limits] frame_budget_mib must be at least 8"),
    ("max_connections = 0", "[limits] max_connections must be at least 1"),
    ("max_connections_per_ip = -1", "[limits] max_connections_per_ip must be at least 1"),
    ("slow_link_kib_s = 0", "[limits] slow_link_kib_s must be at least 1"),
    ("header_timeout = 0", "[limits] header_timeout must be a positive number of seconds"),
    ("body_timeout = nan", "[limits] body_timeout must be a positive number of seconds"),
    ("max_connections = 1.5", "[limits] max_connections must be a int"),
])
def test_impossible_limits(cfg, text: str, problem: str) -> None:
    assert problem in refused(cfg(f"[limits]\n{text}\n"))


def test_limits_are_read_from_their_table(cfg) -> None:
    s = load(cfg("[limits]\nframe_budget_mib = 16\nmax_connections_per_ip = 30\n"
                 "body_timeout = 2.5\n"), {}, env={"FLEXMESH_TCP_MAX_CONNECTIONS": "40"})
    assert (s.tcp_frame_budget_mib, s.tcp_max_connections_per_ip, s.tcp_body_timeout,
            s.tcp_max_connections) == (16, 30, 2.5, 40)


@pytest.mark.parametrize(("text", "named", "problem"), [
    ('bind = "0.0.0.0:70000"\n', "bind", "port 70000 is out of range 0..65535"),
    ('bind = "0.0.0.0:-1"\n', "bind", "port -1 is out of range"),
    ('bind = "0.0.0.0:http"\n', "bind", "port 'http' is not a number"),
    ('bind = "7946"\n', "bind", "is not HOST:PORT"),
    ('join = ["10.0.0.1:65536"]\n', "join", "port 65536 is out of range"),
    ('advertise = "10.0.0.1:99999"\n', "advertise", "out of range"),
    ('advertise = "10.0.0.1:0"\n', "advertise", "needs a real port, not 0"),
])
def test_port_out_of_range(cfg, text: str, named: str, problem: str) -> None:
    message = refused(cfg(text))
    assert f"{named}: " in message or f"{named} " in message
    assert problem in message


def test_bad_profile(cfg) -> None:
    message = refused(cfg('profile = "moon"\n'))
    assert "profile 'moon' is not one of" in message and "lan" in message


def test_bad_policy(cfg) -> None:
    message = refused(cfg('[scheduler]\npolicy = "worst-fit"\n'))
    assert "policy 'worst-fit' is not one of" in message and "best-fit" in message


def test_missing_npu_smi(cfg, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "npu-smi"
    message = refused(cfg(f'[devices]\nnpu_smi = "{missing}"\n'))
    assert f"npu_smi '{missing}' does not exist" in message


@pytest.mark.parametrize(("spec", "problem"), [
    ("tpu:2x16GiB", "unknown device kind 'tpu'"),
    ("gpu:0x16GiB", "count of zero"),
    ("gpu:2", "malformed sim device entry"),
    ("gpu:2x16furlongs", "16furlongs"),
    ("   ", "empty"),
])
def test_bad_sim_spec(cfg, spec: str, problem: str) -> None:
    message = refused(cfg(f'[devices]\nsim = "{spec}"\n'))
    assert "sim devices: " in message and problem in message


def test_sim_load_file_without_sim_devices(cfg) -> None:
    assert "sim_load_file is set" in refused(cfg('[devices]\nsim_load_file = "/x.json"\n'))


@pytest.mark.parametrize(("text", "named"), [
    ('[log]\nformat = "xml"\n', "log format"),
    ('[log]\nlevel = "INFO"\n', "log level"),
    ('[devices]\nenforcement = "strict"\n', "enforcement"),
])
def test_bad_choice(cfg, text: str, named: str) -> None:
    assert f"{named} must be" in refused(cfg(text))


@pytest.mark.parametrize("name", ["", "two words", "a/b", "host:1", "x" * 65])
def test_bad_name(cfg, name: str) -> None:
    assert f"name {name!r} must be 1-64 characters" in refused(cfg(f'name = "{name}"\n'))


@pytest.mark.parametrize(("text", "where"), [
    ('name = "n1"\nbind = \n', "line 2"),
    ('name = "n1"\n[devices\nsim = "gpu:1x8GiB"\n', "line 2"),
    ('name = "n1"\nname = "n2"\n', "line 2"),  # a key defined twice
    ('[devices]\nnvml = yes\n', "line 2"),
])
def test_malformed_toml(cfg, text: str, where: str) -> None:
    message = refused(cfg(text))
    assert "not valid TOML" in message and where in message


def test_missing_config_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nowhere.toml")
    assert refused(path).endswith("no such file")


def test_unreadable_config_file(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_bytes(b'name = "\xff\xfe"\n')
    assert "cannot read" in refused(str(tmp_path / "bad.toml"))
    assert "cannot read" in refused(str(tmp_path))  # a directory


# --- bugs found earlier, fixed ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["--1", "²"])
def test_bad_integer_text_in_file(cfg, value: str) -> None:
    assert "[scheduler] priority must be a int" in refused(
        cfg(f'[scheduler]\npriority = "{value}"\n'))


def test_bad_integer_text_in_environment() -> None:
    assert "FLEXMESH_PRIORITY" in refused(None, env={"FLEXMESH_PRIORITY": "--1"})


@pytest.mark.parametrize("text", ["[scheduler]\nlease_ttl = nan\n",
                                  "[scheduler]\nlease_ttl = inf\n",
                                  "[jobs]\nstop_grace = nan\n"])
def test_not_a_number_duration(cfg, text: str) -> None:
    refused(cfg(text))


@pytest.mark.parametrize(("flags", "env", "source"), [
    ({"bind": "0.0.0.0:99999"}, {}, "--bind"),
    ({}, {"FLEXMESH_PROFILE": "moon"}, "FLEXMESH_PROFILE"),
])
def test_a_bad_value_is_blamed_on_where_it_came_from(cfg, flags, env, source: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(cfg('name = "n1"\n'), flags, env=env)
    assert str(info.value).startswith(f"{source}: ")


# --- where values come from ------------------------------------------------------------------


def test_defaults_without_file_flags_or_environment() -> None:
    settings = load(None, {}, env={})
    assert settings == Settings(name=settings.name)
    assert settings.bind == "127.0.0.1:7946" and settings.profile == "lan"


def test_environment_overrides_defaults() -> None:
    env = {"FLEXMESH_PROFILE": "wan", "FLEXMESH_NVML": "false", "FLEXMESH_PRIORITY": "-3",
           "FLEXMESH_LEASE_TTL": "2.5", "FLEXMESH_JOIN": "10.0.0.1:7946,10.0.0.2:7946",
           "FLEXMESH_SIM_DEVICES": "gpu:1x8GiB", "FLEXMESH_LOG_LEVEL": "debug",
           "FLEXMESH_COORDINATOR_ELIGIBLE": "no"}
    s = load(None, {}, env=env)
    assert (s.profile, s.nvml, s.priority, s.lease_ttl) == ("wan", False, -3, 2.5)
    assert s.join == ["10.0.0.1:7946", "10.0.0.2:7946"]
    assert (s.sim_devices, s.log_level, s.coordinator_eligible) == ("gpu:1x8GiB", "debug", False)


def test_environment_is_read_from_os_environ_by_default(monkeypatch) -> None:
    monkeypatch.setenv("FLEXMESH_PROFILE", "edge")
    assert load(None, {}).profile == "edge"


def test_flexmesh_socket_is_for_the_cli_not_the_agent() -> None:
    assert load(None, {}, env={"FLEXMESH_SOCKET": "/tmp/x.sock"}).socket == Settings.socket


def test_bad_environment_value_names_the_variable() -> None:
    message = refused(None, env={"FLEXMESH_NVML": "perhaps"})
    assert message.startswith("FLEXMESH_NVML: nvml must be a bool")


def test_file_overrides_environment(cfg) -> None:
    path = cfg('profile = "edge"\n[scheduler]\npriority = 7\n')
    s = load(path, {}, env={"FLEXMESH_PROFILE": "wan", "FLEXMESH_PRIORITY": "1",
                            "FLEXMESH_POLICY": "best-fit"})
    assert (s.profile, s.priority, s.policy) == ("edge", 7, "best-fit")


def test_flag_overrides_file_and_environment(cfg) -> None:
    path = cfg('profile = "edge"\nbind = "0.0.0.0:7946"\njoin = ["10.0.0.1:7946"]\n')
    flags = {"profile": "local", "join": ["127.0.0.1:8000"], "priority": 2, "bind": None}
    s = load(path, flags, env={"FLEXMESH_PROFILE": "wan", "FLEXMESH_PRIORITY": "9"})
    assert (s.profile, s.join, s.priority) == ("local", ["127.0.0.1:8000"], 2)
    assert s.bind == "0.0.0.0:7946"  # a flag left at None does not override


def test_bad_flag_value_names_the_flag() -> None:
    message = refused(None, flags={"priority": "high"})
    assert message.startswith("--priority: priority must be a int")


def test_a_bad_file_value_is_not_rescued_by_a_flag(cfg) -> None:
    # The file is checked as it is read, before flags apply: fix the file, not the flags.
    path = cfg('profile = 3\n')
    assert "profile must be a str" in refused(path, flags={"profile": "lan"})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("localhost", True), ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
     ("[::1]", True), ("0.0.0.0", False), ("10.0.0.1", False), ("[fe80::1]", False),
     ("example.org", False), ("", False)],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(("text", "limit", "grace"), [
    ("[jobs]\norphan_limit = 60\n", "60", "60"),  # lan's grace is 60
    ("[jobs]\nowner_dead_grace = 20\n", "30", "20"),  # lan's orphan limit is 30
    ('profile = "edge"\n[jobs]\norphan_limit = 400\n', "400", "300"),
])
def test_orphan_limit_must_be_shorter_than_the_grace(cfg, text: str, limit: str,
                                                     grace: str) -> None:
    """Else an owner keeps running a job its origin has already requeued elsewhere."""
    message = refused(cfg(text))
    assert f"orphan_limit ({limit} s) must be shorter than owner_dead_grace ({grace} s)" in message


def test_orphan_limit_within_the_profiles_grace_is_taken(cfg) -> None:
    s = load(cfg('profile = "edge"\n[jobs]\norphan_limit = 200\n'), {}, env={})
    assert (s.orphan_limit, s.owner_dead_grace) == (200, 0.0)
