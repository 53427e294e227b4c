"""The vocabulary every placement policy speaks.

A policy is a pure function: it gets one request and a read-only view of the devices that
could take it, and returns either a placement or the reason nothing fits. It reads no
clock, no global randomness and no I/O, so the coordinator, the trace replayer and the
deterministic simulator all call the same code.

Fractions are integers: compute in milli-devices (1000 = one whole device), memory in MiB.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Request:
    """What a job asks for. ``kind`` is ``"gpu"``, ``"npu"`` or ``"any"``."""

    compute_milli: int
    memory_mib: int
    kind: str = "any"
    origin: str = ""  # the node where the job was submitted
    priority: int = 0
    models: tuple[str, ...] = ()  # allowed device models; empty = any


@dataclass(frozen=True, slots=True)
class Candidate:
    """One device as the coordinator sees it: capacity and what is still free to lend.

    ``free_*`` already has leases, foreign local usage and the owner's reserve taken off.
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


@dataclass(frozen=True, slots=True)
class Placement:
    node: str
    device: str


@dataclass(frozen=True, slots=True)
class NoFit:
    """Nothing in the view can take the request; ``reason`` is for a person to read."""

    reason: str


PlaceResult = Placement | NoFit
