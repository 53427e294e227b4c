"""Checks of the ``[devices]``, ``[log]``, ``[jobs]`` and ``[limits]`` settings, kept apart
from agent/config.py for size; ``config.validate`` runs them in its order."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from flexmesh.agent.config import ConfigError, Settings
from flexmesh.agent.containers import config_problem as containers_config_problem
from flexmesh.agent.node.config import DEAD_GRACE


def validate_logs_and_devices(s: Settings, at: Any) -> None:
    if s.log_format not in ("text", "json"):
        raise ConfigError(f"{at('log_format')}: log format must be text or json")
    if s.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{at('log_level')}: log level must be debug, info, warning or error")
    if s.enforcement not in ("auto", "mps", "hami-core", "watchdog", "none"):
        raise ConfigError(f"{at('enforcement')}: enforcement must be auto, mps, hami-core, "
                          "watchdog or none")
    if s.sim_load_file and not s.sim_devices:
        raise ConfigError(f"{at('sim_load_file')}: sim_load_file is set but there are no "
                          "sim devices")
    if s.npu_smi and not Path(s.npu_smi).is_file():
        raise ConfigError(f"{at('npu_smi')}: npu_smi {s.npu_smi!r} does not exist")
    if s.jetson not in ("auto", "on", "off"):
        raise ConfigError(f"{at('jetson')}: jetson must be auto, on or off")
    if not (math.isfinite(s.jetson_memory_share) and 0 < s.jetson_memory_share <= 1):
        raise ConfigError(f"{at('jetson_memory_share')}: jetson_memory_share must be a share "
                          "of memory, more than 0 and at most 1")
    if s.jetson_tegrastats_log and s.jetson == "off":
        raise ConfigError(f"{at('jetson_tegrastats_log')}: jetson_tegrastats_log is set but "
                          "jetson is off")


def validate_jobs(s: Settings, at: Any) -> None:
    if s.keep_finished < 0:
        raise ConfigError(f"{at('keep_finished')}: keep_finished must be a number of jobs, "
                          "0 or more")
    if not (math.isfinite(s.keep_finished_for) and s.keep_finished_for >= 0):
        raise ConfigError(f"{at('keep_finished_for')}: keep_finished_for must be a number of "
                          "seconds, 0 or more")
    grace = s.owner_dead_grace or DEAD_GRACE[s.profile][0]
    limit = s.orphan_limit or DEAD_GRACE[s.profile][1]
    if limit >= grace:
        # An owner must stop a run of a silent origin before that origin requeues it
        # elsewhere, or both may run at once.
        raise ConfigError(f"{at('orphan_limit', 'owner_dead_grace')}: [jobs] orphan_limit "
                          f"({limit:g} s) must be shorter than owner_dead_grace ({grace:g} s)")
    if problem := containers_config_problem(s.containers_runtime, s.containers_extra_args):
        raise ConfigError(f"{at('containers_runtime')}: [containers] {problem}")
    if not re.fullmatch(r"[A-Za-z0-9_.@-]*", s.job_locale):
        raise ConfigError(f"{at('job_locale')}: locale {s.job_locale!r} is not a locale name "
                          "(such as C.UTF-8 or en_US.UTF-8)")


def validate_limits(s: Settings, at: Any) -> None:
    from flexmesh.protocol.wire import MAX_FRAME
    least = MAX_FRAME // (1024 * 1024)
    if s.tcp_frame_budget_mib < least:
        raise ConfigError(f"{at('tcp_frame_budget_mib')}: [limits] frame_budget_mib must be "
                          f"at least {least}, the largest frame, or no large frame gets in")
    for key in ("tcp_max_connections", "tcp_max_connections_per_ip", "tcp_slow_link_kib_s"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{at(key)}: [limits] {key.removeprefix('tcp_')} must be at "
                              "least 1")
    for key in ("tcp_header_timeout", "tcp_body_timeout"):
        value = getattr(s, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{at(key)}: [limits] {key.removeprefix('tcp_')} must be a "
                              "positive number of seconds")


# [network] bulk_rate by profile: a narrow radio link keeps most of itself for gossip,
# calls and the jobs' own traffic; elsewhere bulk goes as fast as TCP takes it.
BULK_RATES = {"local": "0", "lan": "0", "wan": "0", "edge": "2Mbit"}


def bulk_rate_bytes(s: Settings) -> int:
    """Bytes per second of bulk this agent sends at most (0: no limit)."""
    from flexmesh.agent.units import parse_rate
    try:
        return parse_rate(s.bulk_rate or BULK_RATES.get(s.profile, "0"))
    except ValueError:
        return 0  # (validate_network refused it at load)


def validate_network(s: Settings, at: Any) -> None:
    from flexmesh.agent.units import parse_rate
    if s.bulk_rate:
        try:
            rate = parse_rate(s.bulk_rate)
        except ValueError as exc:
            raise ConfigError(f"{at('bulk_rate')}: [network] bulk_rate: {exc}") from None
        if 0 < rate < 1000:
            raise ConfigError(f"{at('bulk_rate')}: [network] bulk_rate {s.bulk_rate!r} is "
                              "below 1000 bytes/s (8kbit): a bundle would never arrive; "
                              "0 means no limit")
