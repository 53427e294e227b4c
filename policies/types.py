"""The vocabulary every placement policy speaks.

A policy is a pure function: it gets one request and a read-only view of the devices that
could take it, and returns either a placement or the reason nothing fits. It reads no
clock, no global randomness and no I/O, so the coordinator, the trace replayer and the
deterministic simulator all call the same code.

Fractions are integers: compute in milli-devices (1000 = one whole device), memory in MiB.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WHOLE = 1000  # milli-devices in one device


@dataclass(frozen=True, slots=True)
class Request:
    """What a job asks for. ``kind`` is ``"gpu"``, ``"npu"`` or ``"any"``.

    ``compute_milli`` and ``memory_mib`` are per device. ``count`` > 1 asks for that many
    devices on one node; with ``compute_milli`` of a whole device (1000) each of them must be
    completely free. ``cpu_milli`` and ``host_memory_mib`` are what the job needs of the
    node itself; they are checked only where the node reports them.
    """

    compute_milli: int
    memory_mib: int
    kind: str = "any"
    origin: str = ""  # the node where the job was submitted
    priority: int = 0
    models: tuple[str, ...] = ()  # allowed device models; empty = any
    count: int = 1  # devices wanted, all on one node
    cpu_milli: int = 0  # node CPU wanted (milli-cores)
    host_memory_mib: int = 0  # node RAM wanted
    preemptible: bool = False  # whether the job may later be preempted

    @property
    def whole(self) -> bool:
        """Whether each device must be taken whole (completely free)."""
        return self.compute_milli >= WHOLE

    @property
    def total_compute_milli(self) -> int:
        return self.compute_milli * self.count


@dataclass(frozen=True, slots=True)
class Candidate:
    """One device as the coordinator sees it: capacity and what is still free to lend.

    ``free_*`` already has leases, foreign local usage and the owner's reserve taken off.
    The ``node_*`` fields describe the node the device is on; ``None`` means not known
    (then nothing is checked against it). ``battery_pct`` is ``None`` on mains power; a
    node whose battery is below ``battery_floor_pct`` lends nothing to other nodes.
    ``rtt_ms`` is the round-trip time between the request's origin and this node, where
    the caller knows it.
    """

    node: str
    device: str
    kind: str
    model: str
    compute_milli: int
    memory_mib: int
    free_compute_milli: int
    free_memory_mib: int
    healthy: bool = True
    attrs: dict[str, int] = field(default_factory=dict, compare=False, hash=False)
    node_cpu_milli: int | None = None
    node_cpu_free_milli: int | None = None
    node_memory_mib: int | None = None
    node_memory_free_mib: int | None = None
    battery_pct: int | None = None
    battery_floor_pct: int = 0
    rtt_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    node: str
    device: str

    @property
    def devices(self) -> tuple[str, ...]:
        return (self.device,)


@dataclass(frozen=True, slots=True)
class MultiPlacement:
    """Several devices on one node, for a request with ``count`` > 1."""

    node: str
    devices: tuple[str, ...]

    @property
    def device(self) -> str:
        """The first device ('' for a request that takes no device, CPU only)."""
        return self.devices[0] if self.devices else ""


@dataclass(frozen=True, slots=True)
class GangPlacement:
    """One placement per member of a gang, in the members' order (all or nothing)."""

    parts: tuple[Placement | MultiPlacement, ...]


@dataclass(frozen=True, slots=True)
class NoFit:
    """Nothing in the view can take the request; ``reason`` is for a person to read."""

    reason: str


PlaceResult = Placement | MultiPlacement | NoFit
GangResult = GangPlacement | NoFit


REASONS = {
    "healthy": "unhealthy",
    "battery": "below battery floor",
    "kind": "no device of that kind",
    "model": "no device of an allowed model",
    "cpu": "too little CPU",
    "memory": "too little memory",
    "capacity": "too little free compute",
    "devices": "no device with enough free",
}


def describe(req: Request) -> str:
    kind = "device" if req.kind == "any" else f"{req.kind}"
    if req.count == 0:
        what = "a CPU-only job"
    elif req.count == 1:
        what = f"{req.compute_milli} milli of one {kind}"
    else:
        what = f"{req.count} {kind}s of {req.compute_milli} milli"
    if req.memory_mib:
        what += f" with {req.memory_mib} MiB device memory"
    if req.models:
        what += f" (models {', '.join(req.models)})"
    return what
