"""An incremental index of the mesh's nodes, grouped into classes of identical state.

Most nodes of a big mesh look alike to a placement policy: every empty node of one model
is interchangeable, and so is every node whose devices, CPU and memory are left in the same
state. A :class:`NodeClass` is one such state, interned: nodes move from class to class as
their state changes (``allocate``, ``release``, ``upsert``), in O(devices of the node).
Policies score classes, not nodes, and a class keeps the scores it has computed, so a
decision costs one cached lookup per live class however long the backlog is.

Everything here is plain data and pure bookkeeping: no clock, no randomness, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from flexmesh.policies.nodes import UNKNOWN, DeviceSpec, NodeClass, NodeRec, NodeSpec
from flexmesh.policies.types import Candidate


class Cluster:
    """The index: nodes by name, classes by state, and classes by bucket: the (kind, model)
    pairs of their devices and their free level (see :class:`NodeClass`)."""

    def __init__(self, nodes: Iterable[NodeSpec] = ()) -> None:
        self.nodes: dict[str, NodeRec] = {}
        self.classes: dict[tuple[Any, ...], NodeClass] = {}
        self.buckets: dict[tuple[tuple[tuple[str, str], ...], int], dict[int, NodeClass]] = {}
        self.bucket_version = 0  # bumped when a bucket appears or goes
        self.nodes_version = 0  # bumped when a node is added, changed or removed
        # device compute per model, over every node (the scarcity score's supply), and a
        # version bumped only when it changes: books and health changes leave it alone
        self.supply: dict[str, int] = {}
        self.supply_version = 0
        # every class in order of creation (placers catch up on it); its first entry is
        # number `created_base`; the oldest half is dropped when it grows long
        self.created: list[NodeClass] = []
        self.created_base = 0
        self._seq = 0
        for spec in nodes:
            self.upsert(spec)

    # -- building -------------------------------------------------------------------------

    @classmethod
    def from_candidates(cls, candidates: Iterable[Candidate]) -> Cluster:
        """Group per-device candidates into nodes (node facts from each node's first row)."""
        cluster = cls()
        for name, cands in group_candidates(candidates).items():
            cluster.upsert(node_spec(name, cands))
        return cluster

    def upsert(self, spec: NodeSpec) -> None:
        """Add a node, or replace what is known of it (its books included)."""
        old = self.nodes.get(spec.name)
        if old is not None:
            self._leave(old)
        rec = NodeRec(spec)
        self.nodes[spec.name] = rec
        self.nodes_version += 1
        self._count_supply(old, rec)
        self._reclass(rec)

    def refresh(
        self,
        name: str,
        cands: Sequence[Candidate],
        taken: Mapping[str, tuple[int, int]] | None = None,
    ) -> bool:
        """Set a known node's books from its per-device candidates, less what ``taken``
        holds back per device id (compute, memory), in place: what :func:`node_spec` and
        :meth:`upsert` would do, but a node whose state did not change stays in its class
        (which keeps its cached scores). False, and nothing changed, when the node is
        unknown or the candidates do not list its devices as it has them."""
        rec = self.nodes.get(name)
        if rec is None or not rec.same_devices(cands):
            return False
        changed = False
        for d, c in zip(rec.devs, cands, strict=True):
            fc = max(0, min(c.free_compute_milli, c.compute_milli))
            fm = max(0, min(c.free_memory_mib, c.memory_mib))
            held = taken.get(d.id) if taken else None
            if held is not None:
                fc = max(0, fc - held[0])
                fm = max(0, fm - held[1])
            if d.free_c != fc or d.free_m != fm:
                d.free_c = fc
                d.free_m = fm
                changed = True
        before = rec.facts()
        rec.set_facts(*_node_facts(cands))
        if changed or rec.facts() != before:
            self.nodes_version += 1
            self._reclass(rec)
        return True

    def remove(self, name: str) -> None:
        rec = self.nodes.pop(name, None)
        if rec is not None:
            self.nodes_version += 1
            self._count_supply(rec, None)
            self._leave(rec)

    def _count_supply(self, old: NodeRec | None, new: NodeRec | None) -> None:
        delta: dict[str, int] = {}
        for rec, sign in ((old, -1), (new, 1)):
            for d in rec.devs if rec is not None else ():
                delta[d.model] = delta.get(d.model, 0) + sign * d.cap_c
        changed = False
        for model, n in delta.items():
            if n:
                changed = True
                left = self.supply.get(model, 0) + n
                if left:
                    self.supply[model] = left
                else:
                    del self.supply[model]
        if changed:
            self.supply_version += 1

    def set_health(self, name: str, healthy: bool) -> None:
        rec = self.nodes[name]
        if rec.healthy != healthy:
            rec.healthy = healthy
            self._reclass(rec)

    def set_battery(self, name: str, pct: int | None, floor_pct: int | None = None) -> None:
        rec = self.nodes[name]
        rec.battery_pct = pct
        if floor_pct is not None:
            rec.battery_floor = floor_pct
        self._reclass(rec)

    def set_free(
        self,
        name: str,
        device: str,
        free_compute_milli: int,
        free_memory_mib: int | None = None,
    ) -> None:
        """Overwrite one device's free capacity (e.g. from a gossiped update)."""
        rec = self.nodes[name]
        d = rec.devs[rec.dev_index[device]]
        d.free_c = max(0, min(free_compute_milli, d.cap_c))
        if free_memory_mib is not None:
            d.free_m = max(0, min(free_memory_mib, d.cap_m))
        self._reclass(rec)

    # -- bookkeeping ----------------------------------------------------------------------

    def allocate(
        self,
        name: str,
        devices: Sequence[str],
        compute_milli: int,
        memory_mib: int,
        cpu_milli: int = 0,
        host_memory_mib: int = 0,
    ) -> None:
        """Take a placement off the node's books; refuses (ValueError) to over-commit."""
        rec = self.nodes[name]
        idx = [rec.dev_index[d] for d in devices]
        if len(set(idx)) != len(idx):
            raise ValueError("a placement names the same device twice")
        for i in idx:
            d = rec.devs[i]
            if d.free_c < compute_milli or d.free_m < memory_mib:
                raise ValueError(f"device {d.id} on {name} has too little free")
        if rec.cpu_free != UNKNOWN and rec.cpu_free < cpu_milli:
            raise ValueError(f"node {name} has too little CPU free")
        if rec.mem_free != UNKNOWN and rec.mem_free < host_memory_mib:
            raise ValueError(f"node {name} has too little memory free")
        for i in idx:
            d = rec.devs[i]
            d.free_c -= compute_milli
            d.free_m -= memory_mib
        if rec.cpu_free != UNKNOWN:
            rec.cpu_free -= cpu_milli
        if rec.mem_free != UNKNOWN:
            rec.mem_free -= host_memory_mib
        self._reclass(rec)

    def release(
        self,
        name: str,
        devices: Sequence[str],
        compute_milli: int,
        memory_mib: int,
        cpu_milli: int = 0,
        host_memory_mib: int = 0,
    ) -> None:
        """Give a placement back (capped at capacity, so a double release cannot inflate)."""
        rec = self.nodes.get(name)
        if rec is None:
            return
        for dev in devices:
            i = rec.dev_index.get(dev)
            if i is None:
                continue
            d = rec.devs[i]
            d.free_c = min(d.cap_c, d.free_c + compute_milli)
            d.free_m = min(d.cap_m, d.free_m + memory_mib)
        if rec.cpu_free != UNKNOWN:
            rec.cpu_free = min(rec.cpu_cap, rec.cpu_free + cpu_milli)
        if rec.mem_free != UNKNOWN:
            rec.mem_free = min(rec.mem_cap, rec.mem_free + host_memory_mib)
        self._reclass(rec)

    def _leave(self, rec: NodeRec) -> None:
        cls = rec.cls
        if cls is None:
            return
        del cls.members[rec.name]
        rec.cls = None
        if not cls.members:
            del self.classes[cls.key]
            bucket = self.buckets[cls.bucket]
            del bucket[cls.seq]
            if not bucket:
                del self.buckets[cls.bucket]
                self.bucket_version += 1

    def _reclass(self, rec: NodeRec) -> None:
        key, order = rec.state_key()
        if rec.cls is not None and rec.cls.key == key:
            rec.order = order
            return
        self._leave(rec)
        cls = self.classes.get(key)
        if cls is None:
            self._seq += 1
            cls = NodeClass(key, self._seq)
            self.classes[key] = cls
            bucket = self.buckets.get(cls.bucket)
            if bucket is None:
                bucket = self.buckets[cls.bucket] = {}
                self.bucket_version += 1
            bucket[cls.seq] = cls
            self.created.append(cls)
            if len(self.created) > max(4096, 4 * len(self.classes)):
                drop = len(self.created) // 2
                del self.created[:drop]
                self.created_base += drop
        cls.members[rec.name] = rec
        rec.cls = cls
        rec.order = order

    # -- reading --------------------------------------------------------------------------

    def device_ids(self, name: str, positions: Sequence[int]) -> tuple[str, ...]:
        """The node's device ids at the given positions of its class's device list."""
        rec = self.nodes[name]
        return tuple(rec.devs[rec.order[p]].id for p in positions)

    def iter_classes(self) -> Iterator[NodeClass]:
        for bucket in self.buckets.values():
            yield from bucket.values()

    def candidates(self) -> list[Candidate]:
        """The index as per-device candidates (the shape ``get_policy`` callables take)."""
        out: list[Candidate] = []
        for rec in self.nodes.values():
            for d in rec.devs:
                out.append(
                    Candidate(
                        node=rec.name,
                        device=d.id,
                        kind=d.kind,
                        model=d.model,
                        compute_milli=d.cap_c,
                        memory_mib=d.cap_m,
                        free_compute_milli=d.free_c,
                        free_memory_mib=d.free_m,
                        healthy=rec.healthy,
                        node_cpu_milli=None if rec.cpu_cap == UNKNOWN else rec.cpu_cap,
                        node_cpu_free_milli=None if rec.cpu_free == UNKNOWN else rec.cpu_free,
                        node_memory_mib=None if rec.mem_cap == UNKNOWN else rec.mem_cap,
                        node_memory_free_mib=None if rec.mem_free == UNKNOWN else rec.mem_free,
                        battery_pct=rec.battery_pct,
                        battery_floor_pct=rec.battery_floor,
                    )
                )
        return out

    @property
    def gpu_capacity_milli(self) -> int:
        return sum(d.cap_c for rec in self.nodes.values() for d in rec.devs)

    @property
    def gpu_free_milli(self) -> int:
        return sum(d.free_c for rec in self.nodes.values() for d in rec.devs)


def group_candidates(candidates: Iterable[Candidate]) -> dict[str, list[Candidate]]:
    """Per-device candidates by node, in the order the nodes first appear."""
    grouped: dict[str, list[Candidate]] = {}
    for c in candidates:
        grouped.setdefault(c.node, []).append(c)
    return grouped


def node_spec(name: str, cands: Sequence[Candidate]) -> NodeSpec:
    """One node's spec from its per-device candidates (node facts from the first row)."""
    devices = tuple(
        DeviceSpec(
            id=c.device,
            kind=c.kind,
            model=c.model,
            compute_milli=c.compute_milli,
            memory_mib=c.memory_mib,
            free_compute_milli=max(0, min(c.free_compute_milli, c.compute_milli)),
            free_memory_mib=max(0, min(c.free_memory_mib, c.memory_mib)),
        )
        for c in cands
    )
    cpu, cpu_free, mem, mem_free, healthy, battery, floor = _node_facts(cands)
    return NodeSpec(name, devices, cpu, mem, cpu_free, mem_free, healthy, battery, floor)


def _node_facts(
    cands: Sequence[Candidate],
) -> tuple[int | None, int | None, int | None, int | None, bool, int | None, int]:
    """A node's own figures from its candidates (the first row; healthy if all are), in
    the order :meth:`NodeRec.set_facts` takes them. A capacity nobody reported is taken
    to be what is free."""
    first = cands[0]
    cpu = first.node_cpu_milli
    mem = first.node_memory_mib
    return (
        cpu if cpu is not None else first.node_cpu_free_milli,
        first.node_cpu_free_milli,
        mem if mem is not None else first.node_memory_free_mib,
        first.node_memory_free_mib,
        all(c.healthy for c in cands),
        first.battery_pct,
        first.battery_floor_pct,
    )
