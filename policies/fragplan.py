"""Fragmentation amounts (FGD, and the CPU- and memory-aware variant): how much of a
node's free device capacity the target workload could not use, precomputed per node model
into a plan. Pure functions over plain numbers; ``scores`` builds on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flexmesh.policies.nodes import UNKNOWN
from flexmesh.policies.workload import Shape, Workload

# (per-device milli threshold, [(cpu_milli, count, weight), ...]) for one node model
FragGroup = tuple[int, tuple[tuple[int, int, float], ...]]
Item = TypeVar("Item", bound=tuple[Any, ...])
Groups = tuple[tuple[int, tuple[Item, ...]], ...]


def _grouped(workload: Workload, node_models: tuple[str, ...],
             item: Callable[[Shape], Item]) -> tuple[float, Groups[Item]]:
    """(the weight of shapes a node of ``node_models`` cannot serve at all, the others'
    ``item``s grouped by per-device threshold, largest first)."""
    blind = 0.0
    groups: dict[int, list[Item]] = {}
    for s in workload.shapes:
        if (s.count <= 0 or s.compute_milli <= 0
                or (s.models and not any(m in s.models for m in node_models))):
            blind += s.weight
        else:
            groups.setdefault(s.compute_milli, []).append(item(s))
    return blind, tuple((milli, tuple(items))
                        for milli, items in sorted(groups.items(), reverse=True))


class FragPlan:
    """The target workload pre-sorted for one node model: shapes it cannot serve at all
    (no device, or a model it does not have) weigh on all idle compute; the rest are
    grouped by per-device threshold so each threshold scans the devices once."""

    __slots__ = ("blind", "groups")

    def __init__(self, workload: Workload, node_models: tuple[str, ...]) -> None:
        self.blind, groups = _grouped(workload, node_models,
                                      lambda s: (s.cpu_milli, s.count, s.weight))
        self.groups: tuple[FragGroup, ...] = groups


def frag_amount(free: tuple[int, ...], cpu_free: int, plan: FragPlan) -> float:
    """Expected fragmentation of a node (milli): for each shape, the idle compute it could
    not use, weighted. ``free`` is sorted largest first."""
    total = sum(free)
    if total == 0:
        return 0.0
    f = total * plan.blind
    for milli, items in plan.groups:
        cnt = 0
        big = 0
        for x in free:
            if x < milli:
                break
            cnt += 1
            big += x
        small = total - big
        for cpu, num, w in items:
            if cnt < num or (cpu_free != UNKNOWN and cpu_free < cpu):
                f += w * total
            else:
                f += w * small
    return f


# (per-device milli, [(cpu_milli, count, weight, host_memory_mib), ...])
CapGroup = tuple[int, tuple[tuple[int, int, float, float], ...]]


class CapPlan:
    """Like :class:`FragPlan`, keeping each shape's node memory for capacity counting."""

    __slots__ = ("blind", "groups")

    def __init__(self, workload: Workload, node_models: tuple[str, ...]) -> None:
        self.blind, groups = _grouped(
            workload, node_models,
            lambda s: (s.cpu_milli, s.count, s.weight, s.host_memory_mib))
        self.groups: tuple[CapGroup, ...] = groups


def cap_frag_amount(free: tuple[int, ...], cpu_free: int, mem_free: int, plan: CapPlan) -> float:
    """Expected fragmentation counting how many copies of each shape still fit: idle
    compute that copies of a shape cannot reach -- because the devices are too full, or
    because the node's CPU or memory runs out first -- is fragment for that shape."""
    total = sum(free)
    if total == 0:
        return 0.0
    f = total * plan.blind
    for milli, items in plan.groups:
        cnt = 0
        big = 0
        copies = 0
        for x in free:
            if x < milli:
                break
            cnt += 1
            big += x
            copies += x // milli
        for cpu, num, w, mem in items:
            if cnt < num:
                f += w * total
                continue
            g = cnt // num if milli >= 1000 else copies
            k = g
            if cpu > 0 and cpu_free != UNKNOWN:
                k = min(k, cpu_free // cpu)
            if mem > 0 and mem_free != UNKNOWN:
                k = min(k, int(mem_free // mem))
            if k <= 0:
                f += w * total
            else:
                f += w * (total - big * k / g)
    return f
