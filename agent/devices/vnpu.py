"""Ascend vNPUs, the pure parts: templates, the share a fraction is leased as, ids,
``npu-smi`` command lines and what they print. Nothing here runs a command.

Why containers only: the driver caps what a process in the host's mount namespace can
enumerate at physical ids (< 100) and vNPU ids start at 100. A vNPU is usable only in
another mount namespace that has ``/dev/vdavinci<ID>`` mounted as ``/dev/davinci<ID>``.
So an NPU fraction in a container runs on a vNPU of its own (hard isolation: its AI cores
and memory are the template's); a fraction run as a plain process shares the whole NPU.

Leases fit templates. When a job that runs in a container asks for a fraction of a chip
that has templates, its owner leases the smallest template whose share covers the ask
(compute and memory), and leases that share, as the chip reports its memory: the books
then hold what the vNPU really takes, and templates never over-commit a chip. A fraction
larger than the largest template is leased as the whole chip (the physical device, no
vNPU). Templates are proportional (cores and memory are the same part of the chip), and a
share is rounded down to whole milli and MiB so that a chip's templates always fit it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from flexmesh.agent.devices.base import Device
from flexmesh.agent.devices.enforcement import effective_mode
from flexmesh.agent.units import MILLI
from flexmesh.policies.proportional import fill


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    cores: int  # AI cores
    memory_mib: int  # nominal


def _t(name: str, cores: int, gib: int) -> Template:
    return Template(name, cores, gib * 1024)


# Per chip family: (AI cores of the whole chip, templates in order of preference on a
# tie). From MindCluster's templateNameLists; the variants (_1c: AI CPUs, _nm / _m /
# dvpp: media units) take the same cores and memory and come after the plain ones.
TEMPLATES: dict[str, tuple[int, tuple[Template, ...]]] = {
    "310P": (8, (_t("vir01", 1, 3), _t("vir02", 2, 6), _t("vir02_1c", 2, 6),
                 _t("vir04", 4, 12), _t("vir04_3c", 4, 12), _t("vir04_3c_ndvpp", 4, 12),
                 _t("vir04_4c_dvpp", 4, 12))),
    "910A": (32, (_t("vir02", 2, 2), _t("vir04", 4, 4), _t("vir08", 8, 8),
                  _t("vir16", 16, 16))),
    "910B1": (24, (_t("vir03_1c_8g", 3, 8), _t("vir06_1c_16g", 6, 16),
                   _t("vir12_3c_32g", 12, 32))),
    "910B3": (20, (_t("vir05_1c_16g", 5, 16), _t("vir10_3c_32g", 10, 32))),
    "910B4": (20, (_t("vir05_1c_8g", 5, 8), _t("vir10_3c_16g", 10, 16),
                   _t("vir10_3c_16g_nm", 10, 16), _t("vir10_4c_16g_m", 10, 16))),
}
_FAMILY_OF = (("910B4-1", "910B3"), ("910B1", "910B1"), ("910B2", "910B1"),
              ("910B3", "910B3"), ("910B4", "910B4"))

VNPU_BASE = 100  # the first vNPU id
VNPU_SLOTS = 16  # ids per chip: phy*16+100 .. phy*16+115

# How a run on an NPU is held to its fraction (``flexmesh devices``, the ``enforcement``
# of a device and of each job on it).
VNPU = "vnpu"


def family(model: str) -> str | None:
    """The template family of an NPU model name (``Ascend 910B3``, ``310P3``), or None."""
    name = re.sub(r"^ASCEND", "", model.upper().replace(" ", ""))
    if name.startswith("310P"):
        return "310P"
    for prefix, fam in _FAMILY_OF:
        if name.startswith(prefix):
            return fam
    if name == "910" or re.fullmatch(r"910(A|PREMIUMA|PROA|PROB)", name):
        return "910A"
    return None


@dataclass(frozen=True, slots=True)
class Share:
    """What a template is leased as on one chip."""

    template: str
    compute_milli: int
    memory_mib: int


def share(template: Template, cores_total: int, chip_memory_mib: int | None) -> Share:
    """A template's part of a chip: its cores' share of compute, and its memory, no more
    than the same part of what the chip reports (``None``: the nominal memory)."""
    compute = template.cores * MILLI // cores_total
    memory = template.memory_mib
    if chip_memory_mib is not None:
        memory = min(memory, chip_memory_mib * template.cores // cores_total)
    return Share(template.name, compute, memory)


def choose(model: str, compute_milli: int, memory_mib: int,
           chip_memory_mib: int | None = None) -> Share | None:
    """The smallest template whose share covers the ask, or None (no vNPU for this model,
    or the ask is more than the largest template: the whole chip)."""
    fam = family(model)
    if fam is None or not 0 < compute_milli < MILLI or memory_mib < 0:
        return None
    cores_total, templates = TEMPLATES[fam]
    for t in sorted(templates, key=lambda t: t.cores):  # (stable: preference on a tie)
        s = share(t, cores_total, chip_memory_mib)
        if t.cores * MILLI >= compute_milli * cores_total and s.memory_mib >= memory_mib:
            return s
    return None


def lease_shape(device: Device, compute_milli: int, memory_mib: int) -> tuple[int, int]:
    """What an owner leases for a job in a container asking this of ``device``: the
    template's share where one fits, the whole chip where the ask is larger than any, the
    ask unchanged where the device has no vNPUs (not an Ascend NPU with templates)."""
    if device.backend != "ascend" or family(device.model) is None:
        return compute_milli, memory_mib
    if compute_milli >= device.compute_milli or memory_mib > device.memory_mib:
        return compute_milli, memory_mib  # (whole already, or more than the chip has)
    fit = choose(device.model, compute_milli, memory_mib, device.memory_mib)
    if fit is None:
        return device.compute_milli, device.memory_mib
    return fit.compute_milli, fit.memory_mib


def leased(device: Device, compute_milli: int, memory_mib: int,
           container: bool) -> tuple[int, int]:
    """What an owner leases of ``device`` for an ask: a zero compute or memory (a request
    in proportion) filled in from the device, and an NPU fraction in a ``container`` made
    a template's share (``lease_shape``). More memory than the device has is left as
    asked, for the books to refuse."""
    filled = fill(compute_milli, memory_mib, device.compute_milli, device.memory_mib)
    if filled is not None:
        compute_milli, memory_mib = filled
    if container:
        return lease_shape(device, compute_milli, memory_mib)
    return compute_milli, memory_mib


def wants_vnpu(device: Device, compute_milli: int) -> bool:
    """A run in a container on this lease gets a vNPU (else the whole physical NPU)."""
    return (device.backend == "ascend" and family(device.model) is not None
            and compute_milli < device.compute_milli)


def device_enforcement(device: Device, mode: str, containers: bool) -> str:
    """The ``enforcement`` gossiped for a device: ``vnpu`` for an Ascend NPU with
    templates on a node with a container runtime (fractions in containers are hard
    isolated there); otherwise the node's ``mode`` as it applies to the device."""
    if containers and device.backend == "ascend" and family(device.model) is not None:
        return VNPU
    return effective_mode(device, mode)


def run_enforcement(device: Device, mode: str, compute_milli: int, container: bool) -> str:
    """How one run is held to its lease: ``vnpu`` for an NPU fraction in a container; an
    NPU fraction as a plain process shares the whole NPU (``none``, or ``watchdog`` where
    the node checks each job's memory); other devices follow the node's ``mode``."""
    if container and wants_vnpu(device, compute_milli):
        return VNPU
    return effective_mode(device, mode)


# --- ids ------------------------------------------------------------------------------

def id_range(phy_id: int) -> range:
    """The vNPU ids of the chip with this physical id (the driver checks
    ``(vdev_id - 100) // 16 == phy_id``)."""
    if phy_id < 0:
        raise ValueError(f"physical id {phy_id} is negative")
    first = VNPU_BASE + phy_id * VNPU_SLOTS
    return range(first, first + VNPU_SLOTS)


def free_id(phy_id: int, taken: Iterable[int]) -> int | None:
    """The lowest id of the chip's range not in ``taken``; None when all 16 are used."""
    used = set(taken)
    return next((i for i in id_range(phy_id) if i not in used), None)


# --- commands -------------------------------------------------------------------------

def remap_argv(smi: str, phy_id: int) -> list[str]:
    return [smi, "info", "-t", "phyid-remap", "-p", str(phy_id)]


def list_argv(smi: str, npu_id: int, chip_id: int) -> list[str]:
    return [smi, "info", "-t", "info-vnpu", "-i", str(npu_id), "-c", str(chip_id)]


def create_argv(smi: str, npu_id: int, chip_id: int, template: str, vnpu_id: int) -> list[str]:
    return [smi, "set", "-t", "create-vnpu", "-i", str(npu_id), "-c", str(chip_id),
            "-f", template, "-v", str(vnpu_id)]


def destroy_argv(smi: str, npu_id: int, chip_id: int, vnpu_id: int) -> list[str]:
    return [smi, "set", "-t", "destroy-vnpu", "-i", str(npu_id), "-c", str(chip_id),
            "-v", str(vnpu_id)]


@dataclass(frozen=True, slots=True)
class ChipIds:
    phy_id: int
    logic_id: int
    npu_id: int
    chip_id: int


def _fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(" ".join(key.split()), value.strip())
    return out


def parse_remap(text: str) -> ChipIds:
    """``npu-smi info -t phyid-remap -p N``; ValueError when a field is missing."""
    f = _fields(text)
    try:
        return ChipIds(int(f["Chip Physical ID"]), int(f["Chip Logic ID"]), int(f["NPU ID"]),
                       int(f["Chip ID"]))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"npu-smi phyid-remap printed no {exc}: {text[:200]!r}") from None


@dataclass(frozen=True, slots=True)
class Listed:
    vnpu_id: int
    template: str
    container: str


def parse_list(text: str) -> list[Listed]:
    """``npu-smi info -t info-vnpu``: the table's rows (``| 100 | NA | 0000 | 0 | vir02 |``)."""
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0].isascii() and cells[0].isdigit():
            out.append(Listed(int(cells[0]), cells[4], cells[2]))
    return out


def succeeded(text: str) -> bool:
    """``Status : OK`` in what an ``npu-smi set`` printed."""
    return _fields(text).get("Status", "").upper() == "OK"


def vnpu_devices(vnpu_ids: Sequence[int]) -> list[str]:
    """``--device`` values: the host's vNPU node at the name the driver looks for inside."""
    return [f"/dev/vdavinci{v}:/dev/davinci{v}" for v in vnpu_ids]
