"""Checks of the ``[devices]`` and ``[log]`` settings, kept apart from agent/config.py for
size; ``config.validate`` runs them in its order."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flexmesh.agent.config import ConfigError, Settings


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
