"""What every device backend reports, and the interface the agent drives it through.

Backends do blocking work (NVML calls, running npu-smi), so the runtime calls them from a
worker thread, never from the event loop. A backend that fails mid-call reports the
device as unhealthy instead of raising into the agent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Device:
    """One GPU, MIG instance, NPU or vNPU on this node.

    ``id`` is stable across restarts and unique on the node (a GPU or MIG UUID for NVML,
    ``npu<N>`` or the vNPU id for Ascend, ``<kind><index>`` for sim devices).
    ``visible_env`` is what a job on this device gets in its environment to see it
    (``CUDA_VISIBLE_DEVICES=<uuid>``, ``ASCEND_RT_VISIBLE_DEVICES=<n>``; empty for sim).
    """

    id: str
    kind: str  # "gpu" | "npu"
    model: str
    memory_mib: int
    backend: str  # "sim" | "nvml" | "ascend" | "jetson"
    compute_milli: int = 1000
    healthy: bool = True
    visible_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """One reading of a device's use by processes that are *not* flexmesh jobs.

    ``foreign_memory_mib`` and ``foreign_compute_milli`` feed the lendable computation:
    lendable = capacity - leased - foreign - reserve.
    """

    id: str
    healthy: bool
    foreign_memory_mib: int = 0
    foreign_compute_milli: int = 0
    utilization_pct: int = 0
    detail: str = ""  # why a device is unhealthy, for a person
    # Optional readings; backends fill what they can measure.
    memory_used_mib: int = 0  # everything in use on the device, jobs included
    temperature_c: int | None = None
    power_mw: int | None = None
    # Device memory held by each flexmesh job process seen on this device (pid -> MiB),
    # for the memory watchdog. Empty where the backend cannot see processes.
    job_memory_mib: dict[int, int] = field(default_factory=dict)
    # SM (compute) utilization of each flexmesh job process, in percent, where measured.
    job_util_pct: dict[int, int] = field(default_factory=dict)
    lost: bool = False  # the device has fallen off the bus: end its leases


class Backend(Protocol):
    name: str

    def discover(self) -> list[Device]:
        """Enumerate devices. Blocking; called from a worker thread."""
        ...

    def sample(self, job_pids: frozenset[int]) -> list[DeviceSample]:
        """Read current usage; ``job_pids`` are flexmesh job processes (not foreign)."""
        ...

    def close(self) -> None: ...
