"""The nodes and classes ``cluster`` indexes: what a node is (``NodeSpec``), its state on
the index's books (``NodeRec``), and a class of nodes in one identical state
(``NodeClass``). Plain data and pure bookkeeping: no clock, no randomness, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flexmesh.policies.types import WHOLE, Candidate

UNKNOWN = -1  # a node CPU or memory figure nobody reported

# One device inside a class: (free_compute, free_memory, cap_compute, cap_memory, kind, model)
DevState = tuple[int, int, int, int, str, str]


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    id: str
    kind: str = "gpu"
    model: str = ""
    compute_milli: int = WHOLE
    memory_mib: int = 0
    free_compute_milli: int | None = None  # None: all of it
    free_memory_mib: int | None = None


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A node as the index is told about it (from gossip, a config, or a trace)."""

    name: str
    devices: tuple[DeviceSpec, ...]
    cpu_milli: int | None = None
    memory_mib: int | None = None
    cpu_free_milli: int | None = None  # None: all of it
    memory_free_mib: int | None = None
    healthy: bool = True
    battery_pct: int | None = None  # None: mains power
    battery_floor_pct: int = 0


class NodeClass:
    """One distinct node state and the nodes currently in it."""

    __slots__ = (
        "battery_ok",
        "bucket",
        "cache",
        "cpu_cap",
        "cpu_free",
        "devs",
        "free",
        "healthy",
        "key",
        "km",
        "level",
        "mem_cap",
        "mem_free",
        "members",
        "model",
        "models_t",
        "n_whole",
        "seq",
        "total_cap",
        "total_free",
    )

    def __init__(self, key: tuple[Any, ...], seq: int) -> None:
        healthy, battery_ok, cpu_cap, cpu_free, mem_cap, mem_free, devs = key
        self.key = key
        self.seq = seq
        self.healthy: bool = healthy
        self.battery_ok: bool = battery_ok
        self.cpu_cap: int = cpu_cap
        self.cpu_free: int = cpu_free
        self.mem_cap: int = mem_cap
        self.mem_free: int = mem_free
        self.devs: tuple[DevState, ...] = devs
        self.free: tuple[int, ...] = tuple(d[0] for d in devs)
        total_free = total_cap = n_whole = 0
        km: set[tuple[str, str]] = set()
        for fc, fm, cc, cm, kind, model in devs:
            total_free += fc
            total_cap += cc
            if fc >= cc and fm >= cm:
                n_whole += 1
            km.add((kind, model))
        self.total_free = total_free
        self.total_cap = total_cap
        self.n_whole = n_whole
        # the (kind, model) pairs of its devices, and how much is free: 2 = a whole device,
        # 1 = only fractions, 0 = nothing; classes are indexed by both
        self.km: tuple[tuple[str, str], ...] = tuple(sorted(km))
        self.model: str = "|".join(m for _, m in self.km)
        self.models_t: tuple[str, ...] = tuple(m for _, m in self.km)
        self.level = 2 if self.n_whole else (1 if self.total_free else 0)
        self.bucket: tuple[tuple[tuple[str, str], ...], int] = (self.km, self.level)
        self.members: dict[str, NodeRec] = {}
        self.cache: dict[Any, Any] = {}

    def __repr__(self) -> str:
        return (
            f"NodeClass(#{self.seq}, free={self.free}, cpu={self.cpu_free}, n={len(self.members)})"
        )


class DevRec:
    __slots__ = ("cap_c", "cap_m", "free_c", "free_m", "id", "kind", "model")

    def __init__(self, spec: DeviceSpec) -> None:
        self.id = spec.id
        self.kind = spec.kind
        self.model = spec.model
        self.cap_c = spec.compute_milli
        self.cap_m = spec.memory_mib
        self.free_c = (
            spec.compute_milli if spec.free_compute_milli is None else spec.free_compute_milli
        )
        self.free_m = spec.memory_mib if spec.free_memory_mib is None else spec.free_memory_mib


class NodeRec:
    """One node's mutable books inside the index."""

    __slots__ = (
        "battery_floor",
        "battery_pct",
        "cls",
        "cpu_cap",
        "cpu_free",
        "dev_index",
        "devs",
        "healthy",
        "mem_cap",
        "mem_free",
        "name",
        "order",
    )

    def __init__(self, spec: NodeSpec) -> None:
        self.name = spec.name
        self.devs = [DevRec(d) for d in spec.devices]
        self.dev_index = {d.id: i for i, d in enumerate(self.devs)}
        if len(self.dev_index) != len(self.devs):
            raise ValueError(f"node {spec.name!r} lists a device id twice")
        self.set_facts(spec.cpu_milli, spec.cpu_free_milli, spec.memory_mib,
                       spec.memory_free_mib, spec.healthy, spec.battery_pct,
                       spec.battery_floor_pct)
        self.cls: NodeClass | None = None
        self.order: tuple[int, ...] = ()

    def set_facts(self, cpu_milli: int | None, cpu_free_milli: int | None,
                  memory_mib: int | None, memory_free_mib: int | None, healthy: bool,
                  battery_pct: int | None, battery_floor_pct: int) -> None:
        """The node's own figures, as a :class:`NodeSpec` gives them (None: unknown, or for
        a free figure, all of it)."""
        self.cpu_cap = UNKNOWN if cpu_milli is None else cpu_milli
        self.cpu_free = self.cpu_cap if cpu_free_milli is None else cpu_free_milli
        self.mem_cap = UNKNOWN if memory_mib is None else memory_mib
        self.mem_free = self.mem_cap if memory_free_mib is None else memory_free_mib
        self.healthy = healthy
        self.battery_pct = battery_pct
        self.battery_floor = battery_floor_pct

    def facts(self) -> tuple[Any, ...]:
        return (self.cpu_cap, self.cpu_free, self.mem_cap, self.mem_free, self.healthy,
                self.battery_pct, self.battery_floor)

    def same_devices(self, cands: Sequence[Candidate]) -> bool:
        """Whether ``cands`` list this node's devices as it has them: the same ids in the
        same order, each of the same kind, model and capacity."""
        devs = self.devs
        if len(devs) != len(cands):
            return False
        for d, c in zip(devs, cands, strict=True):
            if (d.id != c.device or d.cap_c != c.compute_milli or d.cap_m != c.memory_mib
                    or d.kind != c.kind or d.model != c.model):
                return False
        return True

    @property
    def battery_ok(self) -> bool:
        return self.battery_pct is None or self.battery_pct >= self.battery_floor

    def state_key(self) -> tuple[tuple[Any, ...], tuple[int, ...]]:
        # most free first (ties in a fixed order: the class needs it, the node's ids too)
        rows = sorted(
            [
                ((d.free_c, d.free_m, d.cap_c, d.cap_m, d.kind, d.model), d.id, i)
                for i, d in enumerate(self.devs)
            ],
            reverse=True,
        )
        devs = tuple(r[0] for r in rows)
        order = tuple(r[2] for r in rows)
        key = (
            self.healthy,
            self.battery_ok,
            self.cpu_cap,
            self.cpu_free,
            self.mem_cap,
            self.mem_free,
            devs,
        )
        return key, order
