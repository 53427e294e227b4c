"""Huawei Ascend NPUs through the ``npu-smi`` command.

``npu-smi info`` prints one table with two rows per chip. The layouts differ by model:

* 910B (Atlas A2): ``Chip | Bus-Id | AICore(%) Memory-Usage(MB) HBM-Usage(MB)``; device
  memory is the HBM column (``Memory-Usage`` reads ``0 / 0``); logical ids come from
  ``npu-smi info -m``. A process table follows.
* 310P (Atlas 300I/300V; a Duo card has two chips): ``Chip Device | Bus-Id | AICore(%)
  Memory-Usage(MB)``; ``Device`` is the logical id. A process table follows.
* 310B (Atlas 200I A2, edge modules): the 310P layout with ``Bus-Id`` ``NA`` and no process
  table; per-process memory then comes from ``npu-smi info -t proc-mem -i N -c C``.

Health is one of OK, Warning, Alarm, Critical or UNKNOWN. OK and Warning (a minor,
non-service-affecting alarm) are usable; Alarm, Critical and UNKNOWN take the chip out of
the pool. ``npu-smi info -t usages -i N -c C`` adds ``NPU Utilization(%)`` (910B) or
``Aicore Usage Rate(%)``; the backend reads it when built with ``usage_detail=True``
(one extra call per chip and sample, so it is off by default).

Foreign usage follows the NVML backend: memory = in use minus what job processes hold;
compute = ``idle.foreign_compute_estimate`` (npu-smi has no per-process utilisation).
Jobs see their chip through ``ASCEND_RT_VISIBLE_DEVICES=<logical id>``.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flexmesh.agent.devices import vnpu
from flexmesh.agent.devices.base import Device, DeviceSample
from flexmesh.agent.devices.idle import foreign_compute_estimate
from flexmesh.agent.units import MILLI

log = logging.getLogger(__name__)

Runner = Callable[[Sequence[str]], str]
HEALTHY_STATES = frozenset({"OK", "Warning"})
HEALTH_STATES = ("OK", "Warning", "Alarm", "Critical", "UNKNOWN")

_BUS_RE = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]$")
_USAGE_RE = re.compile(r"^\s*(\S+)\s*/\s*(\S+)(?:\s+(\S+)\s*/\s*(\S+))?\s*$")
_PROC_RE = re.compile(
    r"Process id\s*:\s*(\d+)\s+Process name\s*:[ \t]*(.*?)\s+Process memory\(MB\)\s*:\s*(\d+)",
    re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class NpuChip:
    npu_id: int
    chip: int  # index of the chip on its card
    logic_id: int | None  # the Device column where the layout has one
    name: str
    health: str
    power_w: float | None
    temperature_c: int | None
    aicore_pct: int | None
    memory_used_mib: int | None
    memory_total_mib: int
    bus_id: str


@dataclass(frozen=True, slots=True)
class NpuProcess:
    npu_id: int
    chip: int
    pid: int
    name: str
    memory_mib: int


@dataclass(slots=True)
class NpuSmiInfo:
    chips: list[NpuChip] = field(default_factory=list)
    processes: list[NpuProcess] = field(default_factory=list)
    has_process_table: bool = False
    layout: str = "memory"  # "hbm" (910B and later) or "memory" (310P, 310B)


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except (ValueError, OverflowError):
        return None


def _num(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parse_info(text: str) -> NpuSmiInfo:
    """Parse ``npu-smi info`` (any of the three layouts); raises ValueError if no table."""
    info = NpuSmiInfo()
    pending: list[str] | None = None  # first row of a chip, waiting for the second
    in_processes = False
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        head = cells[0].split()
        if "Process id" in line and head[:1] == ["NPU"]:
            in_processes = info.has_process_table = True
        elif head[:1] == ["Chip"] and "HBM-Usage(MB)" in line:
            info.layout = "hbm"
        elif in_processes:
            _maybe_process(info, cells)
        elif len(cells) < 3 or not head or not _num(head[0]):
            continue  # rulers and headers
        elif pending is not None and (_BUS_RE.match(cells[1]) or cells[1] in ("NA", "-")):
            try:
                info.chips.append(_chip(pending, cells, info.layout))
            except (ValueError, IndexError) as err:  # one garbled row, not the whole table
                log.debug("skipping npu-smi rows %r / %r: %s", pending, cells, err)
            pending = None
        elif len(head) >= 2:
            pending = cells  # "NPU Name | Health | Power Temp Hugepages"
    if not info.chips:
        raise ValueError("npu-smi info printed no NPU table")
    return info


def _chip(first: list[str], second: list[str], layout: str) -> NpuChip:
    npu_text, name = first[0].split(None, 1)
    power_temp = first[2].split()
    head = second[0].split()
    usage = _USAGE_RE.match(second[2].split(None, 1)[1] if len(second[2].split()) > 1 else "")
    used, total = (usage.group(1), usage.group(2)) if usage else ("NA", "0")
    if layout == "hbm" and usage and usage.group(3) is not None:
        used, total = usage.group(3), usage.group(4)
    return NpuChip(
        npu_id=int(npu_text),
        chip=int(head[0]),
        logic_id=int(head[1]) if layout != "hbm" and len(head) > 1 and _num(head[1]) else None,
        name=name.strip(),
        health=first[1],
        power_w=float(power_temp[0]) if power_temp and _int(power_temp[0]) is not None else None,
        temperature_c=_int(power_temp[1]) if len(power_temp) > 1 else None,
        aicore_pct=_int(second[2].split()[0]) if second[2] else None,
        memory_used_mib=_int(used),
        memory_total_mib=max(0, _int(total) or 0),
        bus_id=second[1],
    )


def _maybe_process(info: NpuSmiInfo, cells: list[str]) -> None:
    head = cells[0].split()
    if len(cells) < 4 or len(head) < 2 or not (_num(head[0]) and _num(head[1])):
        return  # "No running processes found in NPU N" and rulers
    pid, memory = _int(cells[1]), _int(cells[3])
    if pid is not None and memory is not None and pid >= 0 and memory >= 0:
        info.processes.append(NpuProcess(int(head[0]), int(head[1]), pid, cells[2], memory))


def parse_mapping(text: str) -> dict[tuple[int, int], int]:
    """``npu-smi info -m``: (NPU ID, Chip ID) -> Chip Logic ID, NPU chips only."""
    mapping: dict[tuple[int, int], int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and all(_num(p) for p in parts[:3]):
            mapping[(int(parts[0]), int(parts[1]))] = int(parts[2])
    return mapping


def parse_usages(text: str) -> dict[str, int]:
    """``npu-smi info -t usages``: field name -> integer value (NA fields left out)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        number = _int(value.strip().split()[0]) if sep and value.strip() else None
        if number is not None:
            fields.setdefault(key.strip(), number)
    return fields


def usage_utilization(fields: dict[str, int]) -> int | None:
    """The best utilisation figure a usages output offers, in percent."""
    for key in ("NPU Utilization(%)", "Aicore Usage Rate(%)"):
        if key in fields:
            return max(0, min(100, fields[key]))
    return None


def parse_proc_mem(text: str) -> list[tuple[int, str, int]]:
    """``npu-smi info -t proc-mem``: (pid, name, MiB) per process."""
    return [(int(m[1]), m[2].strip(), int(m[3])) for m in _PROC_RE.finditer(text)]


def vnpu_template(model: str, compute_milli: int, memory_mib: int) -> str | None:
    """The smallest vNPU template covering the request (nominal memory), or None (no vNPU
    for this model, or more than the largest template: the whole chip). See ``vnpu``."""
    fit = vnpu.choose(model, compute_milli, memory_mib)
    return None if fit is None else fit.template


def _run(argv: Sequence[str]) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=True)
    return done.stdout


class AscendBackend:
    """Backend over ``npu-smi``; blocking, meant to be called from a worker thread."""

    name = "ascend"

    def __init__(
        self,
        npu_smi_path: str = "npu-smi",
        runner: Runner | None = None,
        usage_detail: bool = False,
    ) -> None:
        self.npu_smi_path = npu_smi_path
        self._runner: Runner = runner or _run
        self.usage_detail = usage_detail
        self._devices: dict[tuple[int, int], Device] = {}

    def _npu_smi(self, *args: str) -> str:
        return self._runner([self.npu_smi_path, *args])

    def discover(self) -> list[Device]:
        try:
            info = parse_info(self._npu_smi("info"))
        except Exception as err:  # missing binary, driver error, unparsable output
            log.warning("npu-smi info failed: %s", err)
            return list(self._devices.values())
        mapping: dict[tuple[int, int], int] = {}
        if any(chip.logic_id is None for chip in info.chips):
            try:
                mapping = parse_mapping(self._npu_smi("info", "-m"))
            except Exception as err:
                log.info("npu-smi info -m failed (%s); numbering NPUs in table order", err)
        devices: dict[tuple[int, int], Device] = {}
        for order, chip in enumerate(info.chips):
            key = (chip.npu_id, chip.chip)
            logic = chip.logic_id if chip.logic_id is not None else mapping.get(key, order)
            model = chip.name if chip.name.lower().startswith("ascend") else f"Ascend {chip.name}"
            devices[key] = Device(
                id=f"npu{logic}",
                kind="npu",
                model=model,
                memory_mib=chip.memory_total_mib,
                backend=self.name,
                compute_milli=MILLI,
                healthy=chip.health in HEALTHY_STATES,
                visible_env={"ASCEND_RT_VISIBLE_DEVICES": str(logic)},
            )
        self._devices = devices
        return list(devices.values())

    def sample(self, job_pids: frozenset[int]) -> list[DeviceSample]:
        if not self._devices:
            self.discover()
        try:
            info = parse_info(self._npu_smi("info"))
        except Exception as err:
            detail = f"npu-smi info failed: {err}"
            return [
                DeviceSample(id=d.id, healthy=False, detail=detail) for d in self._devices.values()
            ]
        chips = {(c.npu_id, c.chip): c for c in info.chips}
        return [
            self._sample_chip(key, device, chips.get(key), info, job_pids)
            for key, device in self._devices.items()
        ]

    def _processes(self, key: tuple[int, int], info: NpuSmiInfo) -> dict[int, int | None] | None:
        if info.has_process_table:
            return {p.pid: p.memory_mib for p in info.processes if (p.npu_id, p.chip) == key}
        try:
            text = self._npu_smi("info", "-t", "proc-mem", "-i", str(key[0]), "-c", str(key[1]))
        except Exception as err:
            log.debug("npu-smi proc-mem failed for NPU %s chip %s: %s", key[0], key[1], err)
            return None
        return {pid: mib for pid, _name, mib in parse_proc_mem(text)}

    def _utilization(self, key: tuple[int, int], chip: NpuChip) -> int | None:
        if self.usage_detail:
            try:
                text = self._npu_smi("info", "-t", "usages", "-i", str(key[0]), "-c", str(key[1]))
                util = usage_utilization(parse_usages(text))
                if util is not None:
                    return util
            except Exception as err:
                log.debug("npu-smi usages failed for NPU %s: %s", key[0], err)
        return None if chip.aicore_pct is None else max(0, min(100, chip.aicore_pct))

    def _sample_chip(
        self,
        key: tuple[int, int],
        device: Device,
        chip: NpuChip | None,
        info: NpuSmiInfo,
        job_pids: frozenset[int],
    ) -> DeviceSample:
        if chip is None:
            return DeviceSample(
                id=device.id,
                healthy=False,
                detail=f"NPU {key[0]} chip {key[1]} is no longer listed by npu-smi",
            )
        procs = self._processes(key, info)
        used = chip.memory_used_mib
        if used is None:  # "NA / total": the processes' memory is the best figure left
            used = sum(mib or 0 for mib in (procs or {}).values())
        job_memory = {pid: mib or 0 for pid, mib in (procs or {}).items() if pid in job_pids}
        util = self._utilization(key, chip)
        healthy = chip.health in HEALTHY_STATES
        detail = "" if chip.health == "OK" else f"npu-smi health {chip.health}"
        if procs is None:
            detail = "; ".join(filter(None, [detail, "per-process memory unavailable"]))
        return DeviceSample(
            id=device.id,
            healthy=healthy,
            foreign_memory_mib=max(0, used - sum(job_memory.values())),
            foreign_compute_milli=foreign_compute_estimate(util, None, procs or {}, job_pids),
            utilization_pct=util or 0,
            detail=detail,
            memory_used_mib=used,
            temperature_c=chip.temperature_c,
            power_mw=None if chip.power_w is None else round(chip.power_w * 1000),
            job_memory_mib=job_memory,
        )

    def close(self) -> None:
        return None
