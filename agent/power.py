"""Reading the battery: Linux's ``/sys/class/power_supply``, a file another process
writes (a flight controller bridge), or nothing (mains power). ``[power]`` in the config.

``read(settings, wall_now)`` never raises: a source that cannot be read, is stale or holds
garbage gives a reading without a level and a ``problem`` saying why. The node treats a
reading without a level as mains power (it lends as usual: a broken or misconfigured
source must not take the node's devices away from the mesh); the runtime logs and counts
the problem once, when it appears, and logs again when the source reads well again.

sysfs
    ``path`` is ``/sys/class/power_supply`` (the default) or one supply in it. Supplies
    whose ``type`` is ``Battery`` are read; with several, the lowest level counts. The
    level is ``capacity`` (percent), or ``energy_now``/``energy_full`` (or
    ``charge_now``/``charge_full``) where there is no ``capacity``. ``status``
    ``Charging`` or ``Full`` means on the charger; ``Not charging`` too when a ``Mains``
    or ``USB`` supply reports ``online`` 1 (plugged in, charging held back), else not;
    ``Discharging`` and ``Unknown`` mean on battery.
file
    ``path`` names a file holding either JSON, ``{"level": 57, "charging": false}``
    (``charging`` optional, false when left out), or text, ``57`` or ``57 charging`` (the
    words ``charging``, ``full``, ``discharging``, ``not-charging``; case does not matter).
    The level is a number from 0 to 100 (a fraction is rounded). A file not rewritten for
    ``stale_after`` seconds (0: never stale) is stale: its writer may have died.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexmesh.agent.node.power import SOURCES, PowerPolicy, PowerReading

if TYPE_CHECKING:
    from flexmesh.agent.config import Settings

SYSFS = "/sys/class/power_supply"
MAX_FILE = 4096  # bytes of a battery file read at most
_ON_CHARGER = {"charging": True, "full": True, "discharging": False, "not-charging": False,
               "not charging": False}


class PowerError(Exception):
    """Why a source gave no level; the message says so in a few words."""


def read(settings: Settings, wall_now: float) -> PowerReading:
    """The battery as the configured source says now (never raises)."""
    source = settings.power_source
    if source == "none":
        return PowerReading()
    try:
        if source == "sysfs":
            level, charging = read_sysfs(Path(settings.power_path or SYSFS))
        else:
            level, charging = read_file(Path(settings.power_path),
                                        settings.power_stale_after, wall_now)
    except PowerError as exc:
        return PowerReading(source, None, False, str(exc))
    return PowerReading(source, level, charging)


def policy(settings: Settings) -> PowerPolicy:
    return PowerPolicy(settings.lend_floor, settings.charging_lend_floor)


# --- sysfs ------------------------------------------------------------------------------


def read_sysfs(path: Path) -> tuple[int, bool]:
    """(level, on the charger) from a power_supply tree, or one supply in it."""
    supplies = [path] if (path / "type").exists() else _children(path)
    types = {p: _text(p / "type") for p in supplies}
    batteries = [p for p in supplies if types[p] == "Battery"]
    if not batteries:
        raise PowerError(f"no battery in {path}")
    plugged = any(types[p] in ("Mains", "USB") and _text(p / "online") == "1"
                  for p in supplies)
    readings = [_battery(p, plugged) for p in batteries]
    return min(readings, key=lambda r: r[0])


def _children(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except OSError as exc:
        raise PowerError(f"cannot list {path}: {exc.strerror or exc}") from None


def _battery(supply: Path, plugged: bool) -> tuple[int, bool]:
    status = (_text(supply / "status") or "Unknown").lower()
    charging = status in ("charging", "full") or (status == "not charging" and plugged)
    capacity = _text(supply / "capacity")
    if capacity is not None:
        return _level(capacity, supply / "capacity"), charging
    for now, full in (("energy_now", "energy_full"), ("charge_now", "charge_full")):
        a, b = _text(supply / now), _text(supply / full)
        if a is not None and b is not None:
            if not (a.isdigit() and b.isdigit() and int(b) > 0):
                raise PowerError(f"{supply}: {now}/{full} are not counts: {a!r}/{b!r}")
            return min(round(100 * int(a) / int(b)), 100), charging
    raise PowerError(f"{supply}: no capacity, energy_now or charge_now")


def _text(path: Path) -> str | None:
    """A sysfs attribute's text, stripped; None where it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_FILE).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PowerError(f"cannot read {path}: {exc.strerror or exc}") from None


# --- a file another process writes --------------------------------------------------------


def read_file(path: Path, stale_after: float, wall_now: float) -> tuple[int, bool]:
    """(level, on the charger) from a battery file (JSON or ``57 charging``)."""
    try:
        with open(path, "rb") as f:
            age = wall_now - os.fstat(f.fileno()).st_mtime
            data = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise PowerError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stale_after > 0 and age > stale_after:
        raise PowerError(f"{path} is stale: not rewritten for over {stale_after:g} s")
    if len(data) > MAX_FILE:
        raise PowerError(f"{path} is longer than {MAX_FILE} bytes")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise PowerError(f"{path} is not text") from None
    return _parse_json(text, path) if text.startswith("{") else _parse_words(text, path)


def _parse_json(text: str, path: Path) -> tuple[int, bool]:
    try:
        doc: Any = json.loads(text)
    except ValueError:
        raise PowerError(f"{path}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise PowerError(f"{path}: not a JSON object")
    charging = doc.get("charging", False)
    if not isinstance(charging, bool):
        raise PowerError(f"{path}: charging must be true or false, not {charging!r}")
    return _level(doc.get("level"), path), charging


def _parse_words(text: str, path: Path) -> tuple[int, bool]:
    words = text.split(maxsplit=1)
    if not words:
        raise PowerError(f"{path} is empty")
    state = words[1].strip().lower() if len(words) > 1 else "discharging"
    if state not in _ON_CHARGER:
        raise PowerError(f"{path}: {state!r} is not charging, full, discharging or "
                         "not-charging")
    try:
        value = float(words[0].removesuffix("%"))
    except ValueError:
        raise PowerError(f"{path}: {words[0]!r} is not a level") from None
    return _level(value, path), _ON_CHARGER[state]


def _level(value: Any, where: Path) -> int:
    """A level in percent (0..100, rounded), from a number or its text."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise PowerError(f"{where}: {value!r} is not a level") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PowerError(f"{where}: level must be a number, not {value!r}")
    if not (math.isfinite(value) and 0 <= value <= 100):
        raise PowerError(f"{where}: level {value!r} is not between 0 and 100")
    return round(value)


# --- settings -----------------------------------------------------------------------------


def validate_power(s: Settings, at: Callable[..., str]) -> None:
    """The ``[power]`` settings, checked as ``config.validate`` checks the others."""
    from flexmesh.agent.config import ConfigError  # (config imports this module)

    if s.power_source not in SOURCES:
        raise ConfigError(f"{at('power_source')}: [power] source must be "
                          f"{', '.join(SOURCES[:-1])} or {SOURCES[-1]}")
    if s.power_source == "file" and not s.power_path:
        raise ConfigError(f"{at('power_source', 'power_path')}: [power] source \"file\" "
                          "needs a path")
    for key in ("lend_floor", "charging_lend_floor"):
        if not 0 <= getattr(s, key) <= 100:
            raise ConfigError(f"{at(key)}: [power] {key} must be a percentage, 0 to 100")
    if not (math.isfinite(s.power_stale_after) and s.power_stale_after >= 0):
        raise ConfigError(f"{at('power_stale_after')}: [power] stale_after must be a number "
                          "of seconds, 0 (never stale) or more")
