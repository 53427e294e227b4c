"""Grants the coordinator knows of before the owners' gossip shows them.

An owner's answer to a lease ask arrives before its next facts do. Until a node's facts
version reaches the one the grant was made at, its candidates are read less what was
granted there (a *shadow*), so the next request is not proposed onto the same room.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from flexmesh.policies import Candidate


@dataclass(frozen=True, slots=True)
class Shadow:
    node: str
    device: str
    compute_milli: int
    memory_mib: int
    facts_version: int  # the owner's facts version that first includes this grant


class Shadows(list[Shadow]):
    def prune(self, facts_versions: dict[str, int]) -> None:
        """Forget the grants that the owners' facts now show."""
        self[:] = [s for s in self if facts_versions.get(s.node, -1) < s.facts_version]

    def apply_by_node(self, view: dict[str, list[Candidate]]) -> dict[str, list[Candidate]]:
        """``apply`` for a view by node; nodes without shadows keep their lists."""
        if not self:
            return view
        out = dict(view)
        for node in {s.node for s in self}:
            if node in out:
                out[node] = self.apply(out[node])
        return out

    def apply(self, candidates: list[Candidate]) -> list[Candidate]:
        if not self:
            return candidates
        by_key: dict[tuple[str, str], tuple[int, int]] = {}
        for s in self:
            c, m = by_key.get((s.node, s.device), (0, 0))
            by_key[(s.node, s.device)] = (c + s.compute_milli, m + s.memory_mib)
        out = []
        for cand in candidates:
            used = by_key.get((cand.node, cand.device))
            out.append(cand if used is None else minus(cand, *used))
        return out


def minus(c: Candidate, compute: int, memory: int) -> Candidate:
    return replace(c, free_compute_milli=max(c.free_compute_milli - compute, 0),
                   free_memory_mib=max(c.free_memory_mib - memory, 0))


class Holds:
    """What the coordinator has booked per node and device (compute, memory) while the
    owners are asked."""

    def __init__(self) -> None:
        self.by_node: dict[str, dict[str, tuple[int, int]]] = {}

    def add(self, node: str, devices: Iterable[str], compute: int, memory: int) -> None:
        held = self.by_node.setdefault(node, {})
        for dev in devices:
            c, m = held.get(dev, (0, 0))
            held[dev] = (c + compute, m + memory)

    def remove(self, node: str, devices: Iterable[str], compute: int, memory: int) -> None:
        held = self.by_node.get(node)
        if held is None:
            return
        for dev in devices:
            c, m = held.pop(dev, (0, 0))
            c, m = c - compute, m - memory
            if c > 0 or m > 0:
                held[dev] = (max(c, 0), max(m, 0))
        if not held:
            del self.by_node[node]

    def clear(self) -> None:
        self.by_node.clear()
