"""Requests that name one dimension get the other in proportion to the device they land on.

Nothing is leased at zero: a job that asks only for compute (``--gpu 0.25``) holds the same
share of the device's memory (a quarter of a 16 GiB device: 4 GiB), and one that asks only
for memory (``--memory 20GiB``) the same share of its compute (on an 80 GiB device: 250
milli). On a mesh of mixed models the share is worked out per model: ``sized`` gives one
concrete request per model that could hold it, smallest device first, and the caller
places the first that fits. ``fill`` is the same rule for one device, so an owner can
apply it to a request that reaches it with a zero (from an older coordinator).

A request is in proportion when ``memory_mib`` is 0 (memory follows compute) or
``compute_milli`` is 0 with some memory (compute follows memory).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

from flexmesh.policies.types import WHOLE, Candidate, Request

Size = tuple[str, str, int, int]  # (kind, model, compute capacity, memory capacity)


def proportional(req: Request) -> bool:
    return req.memory_mib == 0 or req.compute_milli == 0


def fill(compute_milli: int, memory_mib: int, compute_cap: int,
         memory_cap: int) -> tuple[int, int] | None:
    """(compute, memory) with a zero filled in proportion to a device of these capacities;
    None when the memory asked for is more than the device has."""
    if memory_mib == 0:
        share = min(compute_milli, compute_cap)
        return compute_milli, -(-share * memory_cap // max(compute_cap, 1))
    if compute_milli == 0:
        if memory_mib > memory_cap:
            return None
        compute = -(-memory_mib * compute_cap // max(memory_cap, 1))
        return max(1, min(compute, WHOLE)), memory_mib
    return compute_milli, memory_mib


def sized(req: Request, sizes: Iterable[Size]) -> list[Request]:
    """``req`` made concrete for each size of device that could take it (its kind and
    models), smallest memory first; ``[req]`` when it names both dimensions."""
    if not proportional(req):
        return [req]
    out: list[tuple[int, str, Request]] = []
    for kind, model, compute_cap, memory_cap in set(sizes):
        if req.kind not in ("any", kind) or (req.models and model not in req.models):
            continue
        filled = fill(req.compute_milli, req.memory_mib, compute_cap, memory_cap)
        if filled is not None:
            out.append((memory_cap, model, replace(req, compute_milli=filled[0],
                                                   memory_mib=filled[1], models=(model,))))
    out.sort(key=lambda t: (t[0], t[1]))
    return [r for _, _, r in out]


class Sizes:
    """The sizes of device in a changing view, kept up to date node by node."""

    def __init__(self) -> None:
        self._count: Counter[Size] = Counter()
        self._by_node: dict[str, frozenset[Size]] = {}

    def set(self, node: str, cands: Sequence[Candidate]) -> None:
        """``node`` now has these devices (none: it left the view)."""
        now = frozenset((c.kind, c.model, c.compute_milli, c.memory_mib) for c in cands)
        before = self._by_node.pop(node, frozenset())
        if now:
            self._by_node[node] = now
        if now == before:
            return
        self._count.subtract(before)
        self._count.update(now)
        for size in before - now:
            if self._count[size] <= 0:
                del self._count[size]

    def __iter__(self) -> Iterator[Size]:
        return iter(self._count)

    def sized(self, req: Request) -> list[Request]:
        return sized(req, self._count)

    def gang(self, asked: Sequence[Request]) -> list[dict[int, Request]]:
        """For a gang: per size of device, each member in proportion made concrete for it
        (by the member's ``id``), where every such member fits that size; members that name
        both dimensions stay as they are (``[{}]`` when none is in proportion)."""
        wanted = sum(1 for r in asked if proportional(r))
        if not wanted:
            return [{}]
        per_model: dict[str, dict[int, Request]] = {}
        for r in asked:
            for concrete in self.sized(r):
                per_model.setdefault(concrete.models[0], {})[id(r)] = concrete
        return [m for m in per_model.values() if len(m) == wanted]
