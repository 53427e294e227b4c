"""Agent settings: TOML file, ``FLEXMESH_*`` environment, flags; validated with clear errors.

Precedence: a command-line flag overrides the file; the file overrides an environment
variable ``FLEXMESH_<KEY>``; that overrides the built-in default. Every problem is
reported as one line naming the file (or flag), the key and what is wrong.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexmesh.agent.netaddr import is_loopback_host
from flexmesh.agent.power import validate_power
from flexmesh.policies import DEFAULT_POLICY, POLICIES
from flexmesh.protocol.membership import PRESETS


class ConfigError(Exception):
    """A setting is missing, of the wrong type or impossible; the message says which."""


@dataclass
class Settings:
    name: str = field(default_factory=socket.gethostname)
    bind: str = "127.0.0.1:7946"
    advertise: str = ""  # address others reach us at; defaults to bind
    join: list[str] = field(default_factory=list)
    socket: str = "/run/flexmesh/agent.sock"
    state_dir: str = "/var/lib/flexmesh"
    profile: str = "lan"
    sim_devices: str = ""
    sim_load_file: str = ""
    npu_smi: str = ""
    npu_dev_dir: str = "/dev"  # where the davinciN nodes are (N: a chip's physical id)
    nvml: bool = True
    jetson: str = "auto"  # the Jetson backend: auto, on or off (devices/discovery.py)
    jetson_memory_share: float = 0.5  # of MemTotal, lent as the Jetson GPU's memory
    jetson_tegrastats_log: str = ""  # a `tegrastats --logfile` where no GPU load file is
    reserve_memory_mib: int = 0
    reserve_compute_milli: int = 0
    priority: int = 0
    coordinator_eligible: bool = True
    policy: str = DEFAULT_POLICY
    lease_ttl: float = 15.0
    impossible_grace: float = 60.0  # a request no device could ever hold fails after this
    stop_grace: float = 10.0
    owner_away_limit: float = 900.0  # a borrowed job's owner that left may be back this late
    owner_dead_grace: float = 0.0  # ... one declared dead; 0: the profile's (node.config)
    orphan_limit: float = 0.0  # a run whose origin is declared dead is stopped after this
    keep_finished: int = 1000  # ended jobs (and finished leases) kept, at most
    keep_finished_for: float = 7 * 86400.0  # ... and for at most this many seconds
    socket_group: str = "flexmesh"  # group that may use the socket (name or number)
    ui: str = "127.0.0.1:0"  # HOST:PORT of the read-only web page; "" = off; 0 = any port
    metrics: str = ""  # HOST:PORT of a TCP /metrics listener; "" = socket only
    allow_root: bool = False  # run root's submissions as root (else as borrowed_user)
    borrowed_user: str = "nobody"  # runs jobs borrowed from other nodes; never root
    operator_group: str = "flexmesh-admin"  # may cancel and read every job here
    job_locale: str = "C.UTF-8"  # LANG of every job; "" = none
    enforcement: str = "auto"
    hami_lib: str = ""
    log_format: str = "text"
    log_level: str = "info"
    key: str = ""  # base64 cluster key (`flexmesh keygen`); prefer key_file
    key_file: str = ""  # file with one base64 key per line, the sealing key first
    cluster: str = "flexmesh"  # bound into every sealed packet: meshes never mix
    # No key: gossip and calls in plaintext, which anyone who reaches the port may read
    # and forge. Only when asked for by name, for throwaway tests.
    insecure_plaintext: bool = False
    # What inbound TCP connections may make the agent hold ([limits], see rpc.Limits).
    tcp_frame_budget_mib: int = 64  # frame bodies being read, all connections together
    tcp_max_connections: int = 512  # inbound connections open at once
    tcp_max_connections_per_ip: int = 128  # ... from one address (an origin keeps one
    # JobSync open per job it follows here; a loopback mesh shares 127.0.0.1)
    tcp_header_timeout: float = 10.0  # seconds from accept to the first frame's header
    tcp_body_timeout: float = 10.0  # seconds for a frame body, plus its size at ...
    tcp_slow_link_kib_s: int = 64  # ... this rate (KiB/s): a slow but honest link
    # Working directories jobs carry ([payload]): sizes take MiB/GiB (a plain number: MiB).
    payload_cache_size: str = "10GiB"  # bundles kept here (packed or fetched), LRU
    payload_max_bundle: str = "1GiB"  # the largest archive a workdir may pack to
    payload_max_files: int = 100_000  # entries in one workdir (or results), at most
    payload_max_results: str = "1GiB"  # a run's results archive, at most (cut beyond)
    payload_work_dir: str = ""  # jobs' unpacked workdirs; "": STATE_DIR-work
    bulk_rate: str = ""  # [network] bytes/s of bulk sent (runtime/bulk.py); "": the profile's
    compress: bool = True  # [network] bundle chunks and job output compressed where it saves
    power_source: str = "none"  # [power] (agent/power.py): none (mains), sysfs or file
    power_path: str = ""  # sysfs: /sys/class/power_supply or one supply; file: the file
    lend_floor: int = 20  # percent: on battery, below it lend nothing to other nodes
    charging_lend_floor: int = 10  # ... on the charger
    power_stale_after: float = 120.0  # a battery file not rewritten this long: unknown
    containers_runtime: str = "auto"  # [containers]: "auto", "podman", "docker" or "none"
    containers_extra_args: list[str] = field(default_factory=list)  # added to every run
    fault_drop: float = 0.0  # share of own outgoing datagrams dropped (loopback only)
    fault_duplicate: float = 0.0  # share sent twice (loopback only)
    fault_delay_ms: int = 0  # extra delay of every outgoing datagram (loopback only)

    def cache_bytes(self) -> int:
        return _size_bytes(self.payload_cache_size)

    def max_bundle_bytes(self) -> int:
        return _size_bytes(self.payload_max_bundle)

    def max_results_bytes(self) -> int:
        return _size_bytes(self.payload_max_results)

    def work_dir(self) -> Path:
        state = Path(self.state_dir)
        return Path(self.payload_work_dir) if self.payload_work_dir else (
            state.parent / f"{state.name}-work")

    def is_loopback(self) -> bool:
        host, _ = self.bind_host_port()
        return is_loopback_host(host)

    def bind_host_port(self) -> tuple[str, int]:
        return split_hostport(self.bind, "bind")


# TOML layout: top-level keys mirror the flags; tables group the rest.
_TABLES: dict[str, dict[str, str]] = {
    "": {"name": "name", "bind": "bind", "advertise": "advertise", "join": "join",
         "socket": "socket", "socket_group": "socket_group", "state_dir": "state_dir",
         "profile": "profile", "ui": "ui", "metrics": "metrics"},
    "devices": {"sim": "sim_devices", "sim_load_file": "sim_load_file", "npu_smi": "npu_smi",
                "npu_dev_dir": "npu_dev_dir",
                "nvml": "nvml", "reserve_memory_mib": "reserve_memory_mib", "jetson": "jetson",
                "jetson_memory_share": "jetson_memory_share",
                "jetson_tegrastats_log": "jetson_tegrastats_log",
                "reserve_compute_milli": "reserve_compute_milli",
                "enforcement": "enforcement", "hami_lib": "hami_lib"},
    "scheduler": {"policy": "policy", "priority": "priority",
                  "coordinator_eligible": "coordinator_eligible", "lease_ttl": "lease_ttl",
                  "impossible_grace": "impossible_grace"},
    "jobs": {"stop_grace": "stop_grace", "owner_away_limit": "owner_away_limit",
             "owner_dead_grace": "owner_dead_grace", "orphan_limit": "orphan_limit",
             "keep_finished": "keep_finished", "keep_finished_for": "keep_finished_for",
             "allow_root": "allow_root",
             "borrowed_user": "borrowed_user", "operator_group": "operator_group",
             "locale": "job_locale"},
    "security": {"key": "key", "key_file": "key_file", "cluster": "cluster",
                 "insecure_plaintext": "insecure_plaintext"},
    "limits": {"frame_budget_mib": "tcp_frame_budget_mib",
               "max_connections": "tcp_max_connections",
               "max_connections_per_ip": "tcp_max_connections_per_ip",
               "header_timeout": "tcp_header_timeout", "body_timeout": "tcp_body_timeout",
               "slow_link_kib_s": "tcp_slow_link_kib_s"},
    "power": {"source": "power_source", "path": "power_path", "lend_floor": "lend_floor",
              "charging_lend_floor": "charging_lend_floor", "stale_after": "power_stale_after"},
    "testing": {"fault_drop": "fault_drop", "fault_duplicate": "fault_duplicate",
                "fault_delay_ms": "fault_delay_ms"},
    "log": {"format": "log_format", "level": "log_level"},
    "network": {"bulk_rate": "bulk_rate", "compress": "compress"},
    "payload": {"cache_size": "payload_cache_size", "max_bundle": "payload_max_bundle",
                "max_files": "payload_max_files", "work_dir": "payload_work_dir",
                "max_results": "payload_max_results"},
    "containers": {"runtime": "containers_runtime", "extra_args": "containers_extra_args"},
}
# A number (MiB) or "10GiB".
_SIZES = ("payload_cache_size", "payload_max_bundle", "payload_max_results")


def _size_bytes(text: str) -> int:
    from flexmesh.agent.units import parse_size
    return parse_size(text) * 1024 * 1024


def split_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"{what}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"{what}: port {p} is out of range 0..65535")
    return host.strip("[]"), p


def _coerce(where: str, key: str, value: Any, default: Any) -> Any:
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
            return int(value)
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif want is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
    elif isinstance(value, str):
        return value
    raise ConfigError(f"{where}: {key} must be a {want.__name__}, got {value!r}")


def load(path: str | None, flags: dict[str, Any], env: dict[str, str] | None = None) -> Settings:
    """Build and validate settings from a file, the environment and flags."""
    s = Settings()
    sources: dict[str, str] = {}  # where each setting came from, to blame the right place
    env = dict(os.environ if env is None else env)
    for attr in Settings.__dataclass_fields__:
        value = env.get(f"FLEXMESH_{attr.upper()}")
        if value is not None and attr != "socket":
            where = f"FLEXMESH_{attr.upper()}"
            setattr(s, attr, _coerce(where, attr, value, getattr(s, attr)))
            sources[attr] = where
    if path:
        for attr in _apply_file(s, Path(path)):
            sources[attr] = str(path)
    for attr, value in flags.items():
        if value is not None:
            where = f"--{attr.replace('_', '-')}"
            setattr(s, attr, _coerce(where, attr, value, getattr(s, attr)))
            sources[attr] = where
    validate(s, path or "settings", sources)
    return s


def _apply_file(s: Settings, path: Path) -> list[str]:
    """Apply a TOML file's settings; returns the names of those it set."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    applied = []
    for key, value in data.items():
        if isinstance(value, dict) and key in _TABLES and key:
            for sub, v in value.items():
                attr = _TABLES[key].get(sub)
                if attr is None:
                    raise ConfigError(f"{path}: unknown key [{key}] {sub}")
                if attr in (*_SIZES, "bulk_rate") and type(v) is int:  # (not a bool)
                    v = str(v)
                setattr(s, attr, _coerce(str(path), f"[{key}] {sub}", v, getattr(s, attr)))
                applied.append(attr)
            continue
        attr = _TABLES[""].get(key)
        if attr is None:
            raise ConfigError(f"{path}: unknown key {key}")
        setattr(s, attr, _coerce(str(path), key, value, getattr(s, attr)))
        applied.append(attr)
    return applied


def validate(s: Settings, default_where: str, sources: dict[str, str] | None = None) -> None:
    """Raise ConfigError for an impossible value, blaming the file, flag or variable that
    set it."""
    sources = sources or {}

    def at(*attrs: str) -> str:
        return next((sources[a] for a in attrs if a in sources), default_where)

    from flexmesh.agent.configcheck import (
        validate_jobs,
        validate_limits,
        validate_logs_and_devices,
        validate_network,
    )

    # The first problem found is the one reported, so the order of the checks is kept.
    for check in (_validate_addresses, _validate_scheduling, validate_logs_and_devices,
                  _validate_security, _validate_testing, validate_jobs, validate_limits,
                  _validate_payload, validate_power, validate_network):
        check(s, at)


def _validate_addresses(s: Settings, at: Any) -> None:
    if not s.name or any(c.isspace() or c in "/:" for c in s.name) or len(s.name) > 64:
        raise ConfigError(f"{at('name')}: name {s.name!r} must be 1-64 characters without spaces, "
                          "'/' or ':'")
    split_hostport(s.bind, f"{at('bind')}: bind")
    if s.advertise:
        _, port = split_hostport(s.advertise, f"{at('advertise')}: advertise")
        if port == 0:
            raise ConfigError(f"{at('advertise')}: advertise needs a real port, not 0")
    for seed in s.join:
        split_hostport(seed, f"{at('join')}: join")
    for key in ("ui", "metrics"):
        if getattr(s, key):
            split_hostport(getattr(s, key), f"{at(key)}: {key}")


def _validate_scheduling(s: Settings, at: Any) -> None:
    if s.profile not in PRESETS:
        raise ConfigError(f"{at('profile')}: profile {s.profile!r} is not one of "
                          f"{', '.join(sorted(PRESETS))}")
    if s.policy not in POLICIES:
        raise ConfigError(f"{at('policy')}: policy {s.policy!r} is not one of "
                          f"{', '.join(sorted(POLICIES))}")
    for key in ("reserve_memory_mib", "reserve_compute_milli"):
        if getattr(s, key) < 0:
            raise ConfigError(f"{at(key)}: {key} must not be negative")
    if s.reserve_compute_milli > 1000:
        raise ConfigError(f"{at('reserve_compute_milli')}: reserve_compute_milli is above "
                          "one device (1000)")
    if not (math.isfinite(s.lease_ttl) and s.lease_ttl > 0):
        raise ConfigError(f"{at('lease_ttl')}: lease_ttl must be a positive number of seconds")
    if not (math.isfinite(s.impossible_grace) and s.impossible_grace >= 0):
        raise ConfigError(f"{at('impossible_grace')}: impossible_grace must be a number of "
                          "seconds, 0 or more")
    for key in ("owner_away_limit", "owner_dead_grace", "orphan_limit"):
        value = getattr(s, key)
        if not (math.isfinite(value) and value >= 0) or (value == 0 and key == "owner_away_limit"):
            raise ConfigError(f"{at(key)}: {key} must be a positive number of seconds")
    if not (math.isfinite(s.stop_grace) and s.stop_grace >= 0):
        raise ConfigError(f"{at('stop_grace')}: stop_grace must be a number of seconds, 0 or more")


def _validate_security(s: Settings, at: Any) -> None:
    if s.borrowed_user in ("root", "0"):
        raise ConfigError(f"{at('borrowed_user')}: borrowed_user must not be root: jobs from "
                          "other nodes never run as root")
    if s.key_file and not Path(s.key_file).is_file():
        raise ConfigError(f"{at('key_file')}: key_file {s.key_file!r} does not exist")
    if s.key:
        from flexmesh.protocol.crypto import KeyringError, decode_key
        try:
            decode_key(s.key)
        except KeyringError as exc:
            raise ConfigError(f"{at('key')}: key: {exc}") from None
    if not s.cluster or len(s.cluster) > 128:
        raise ConfigError(f"{at('cluster')}: cluster must be 1-128 characters")


def _validate_testing(s: Settings, at: Any) -> None:
    for key in ("fault_drop", "fault_duplicate"):
        share = getattr(s, key)
        if not (math.isfinite(share) and 0 <= share <= 1):
            raise ConfigError(f"{at(key)}: {key} must be a share between 0 and 1")
    if s.fault_delay_ms < 0:
        raise ConfigError(f"{at('fault_delay_ms')}: fault_delay_ms must not be negative")
    faulty = s.fault_drop or s.fault_duplicate or s.fault_delay_ms
    if faulty and not is_loopback_host(split_hostport(s.bind, "bind")[0]):
        raise ConfigError(f"{at('fault_drop', 'fault_duplicate', 'fault_delay_ms')}: fault "
                          "injection is for tests on loopback only; bind is not loopback")
    if s.sim_devices:
        from flexmesh.agent.devices.sim import parse_sim_devices
        try:
            parse_sim_devices(s.sim_devices)
        except ValueError as exc:
            raise ConfigError(f"{at('sim_devices')}: sim devices: {exc}") from None


def _validate_payload(s: Settings, at: Any) -> None:
    sizes = {}
    for key in _SIZES:
        try:
            sizes[key] = _size_bytes(getattr(s, key))
        except ValueError as exc:
            raise ConfigError(f"{at(key)}: [payload] {key.removeprefix('payload_')}: "
                              f"{exc}") from None
        if sizes[key] < 1024 * 1024:
            raise ConfigError(f"{at(key)}: [payload] {key.removeprefix('payload_')} must be "
                              "at least 1 MiB")
    if sizes["payload_cache_size"] < sizes["payload_max_bundle"]:
        raise ConfigError(f"{at('payload_cache_size')}: [payload] cache_size must be at least "
                          "max_bundle, or the largest bundle never stays cached")
    if s.payload_max_files < 1:
        raise ConfigError(f"{at('payload_max_files')}: [payload] max_files must be at least 1")
    if s.payload_work_dir and not os.path.isabs(s.payload_work_dir):
        raise ConfigError(f"{at('payload_work_dir')}: [payload] work_dir must be an absolute "
                          "path")
