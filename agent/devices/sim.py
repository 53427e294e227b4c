"""Simulated devices, configured by a spec string, for tests and demos.

``parse_sim_devices("gpu:2x16GiB,npu:1x32GiB")`` gives ``gpu0``, ``gpu1`` and ``npu0``
(numbered per kind, in the order written). ``SimBackend`` reports them and, when given a
*load file*, the foreign (non-flexmesh) usage written there, so an integration test can
make a local workload rise or a device fail by rewriting one JSON file::

    {"gpu0": {"memory_mib": 4096, "compute_milli": 500},
     "npu0": {"healthy": false, "detail": "ECC errors"}}

A missing, unreadable or malformed file means no foreign load; a malformed entry is
ignored. The backend never raises from ``discover`` or ``sample``.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from flexmesh.agent.devices.base import Device, DeviceSample
from flexmesh.agent.units import MILLI, format_mib, parse_size

KINDS = ("gpu", "npu")
MAX_SIM_DEVICES = 1024
_ENTRY_RE = re.compile(r"^\s*([a-zA-Z]+)\s*:\s*(\d+)\s*[xX*]\s*(\S+)\s*$")


def parse_sim_devices(spec: str) -> list[Device]:
    """Parse ``KIND:COUNTxMEMORY[,...]`` into devices; ValueError names what is wrong."""
    if not spec or not spec.strip():
        raise ValueError("empty --sim-devices spec: expected KIND:COUNTxMEMORY, e.g. gpu:2x16GiB")
    counters = dict.fromkeys(KINDS, 0)
    devices: list[Device] = []
    for part in spec.split(","):
        match = _ENTRY_RE.match(part)
        if match is None:
            raise ValueError(
                f"malformed sim device entry {part.strip()!r} in {spec!r}: "
                "expected KIND:COUNTxMEMORY, e.g. gpu:2x16GiB"
            )
        kind, count_text, size_text = match.group(1).lower(), match.group(2), match.group(3)
        if kind not in KINDS:
            raise ValueError(f"unknown device kind {kind!r} in {spec!r}: use one of {KINDS}")
        count = int(count_text)
        if count < 1:
            raise ValueError(f"sim device entry {part.strip()!r} has a count of zero")
        memory = parse_size(size_text)
        if memory < 1:
            raise ValueError(f"sim device entry {part.strip()!r} has no memory")
        if len(devices) + count > MAX_SIM_DEVICES:
            raise ValueError(f"too many sim devices in {spec!r} (at most {MAX_SIM_DEVICES})")
        for _ in range(count):
            index = counters[kind]
            counters[kind] += 1
            devices.append(
                Device(
                    id=f"{kind}{index}",
                    kind=kind,
                    model=f"sim-{kind}-{format_mib(memory, 'table')}",  # one model per size
                    memory_mib=memory,
                    backend="sim",
                    compute_milli=MILLI,
                )
            )
    return devices


def _as_int(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if value != value:  # NaN
        return 0
    return int(min(max(value, low), high))


def read_load_file(path: Path | None) -> dict[str, dict[str, Any]]:
    """The load file as ``{device_id: entry}``; anything unreadable reads as empty."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)}


class SimBackend:
    """Configured devices whose foreign load and health come from an optional JSON file."""

    name = "sim"
    inline = True  # a sample blocks on nothing (at most a small local file): read on the loop

    def __init__(self, devices: list[Device], load_file: Path | None = None) -> None:
        self._devices = list(devices)
        self._load_file = Path(load_file) if load_file is not None else None

    def discover(self) -> list[Device]:
        load = read_load_file(self._load_file)
        return [replace(d, healthy=self._healthy(load.get(d.id, {}))) for d in self._devices]

    def sample(self, job_pids: frozenset[int]) -> list[DeviceSample]:
        load = read_load_file(self._load_file)
        return [self._sample_one(device, load.get(device.id, {})) for device in self._devices]

    def close(self) -> None:
        return None

    @staticmethod
    def _healthy(entry: dict[str, Any]) -> bool:
        return entry.get("healthy", True) is not False

    def _sample_one(self, device: Device, entry: dict[str, Any]) -> DeviceSample:
        memory = _as_int(entry.get("memory_mib", 0), 0, device.memory_mib)
        compute = _as_int(entry.get("compute_milli", 0), 0, device.compute_milli)
        healthy = self._healthy(entry)
        detail = entry.get("detail", "")
        if not isinstance(detail, str):
            detail = ""
        if not healthy and not detail:
            detail = "marked unhealthy in the sim load file"
        return DeviceSample(
            id=device.id,
            healthy=healthy,
            foreign_memory_mib=memory,
            foreign_compute_milli=compute,
            utilization_pct=compute * 100 // device.compute_milli,
            detail=detail,
            memory_used_mib=memory,
            lost=entry.get("lost", False) is True,
        )
