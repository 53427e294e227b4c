"""The target workload: the mix of request shapes a fragmentation score is measured against.

FGD (Weng et al., ATC '23) calls a node's idle GPU capacity *fragmented* for a request
shape when that shape cannot use it. The expected fragmentation weighs the shapes by how
often they come: the most frequent shapes that together cover 95% of the requests, their
weights renormalised. A :class:`Workload` is that list; a :class:`WorkloadWindow` keeps
it up to date from the recent requests (a bounded window, refreshed every ``refresh``
requests so that scores cached against one version stay valid until the next).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

from flexmesh.policies.types import WHOLE, Request

ShapeKey = tuple[int, int, int, tuple[str, ...]]  # cpu_milli, per-device milli, count, models


@dataclass(frozen=True, slots=True)
class Shape:
    cpu_milli: int
    compute_milli: int  # per device; 0 when the shape needs no device
    count: int  # devices; 0 for a CPU-only shape
    models: tuple[str, ...]
    weight: float
    host_memory_mib: float = 0.0  # mean node memory of the shape's requests (not in the key)


def shape_key(req: Request) -> ShapeKey:
    if req.count <= 0 or req.compute_milli <= 0:
        return (req.cpu_milli, 0, 0, ())
    return (req.cpu_milli, min(req.compute_milli, WHOLE), req.count, tuple(sorted(req.models)))


@dataclass(frozen=True, slots=True)
class Workload:
    shapes: tuple[Shape, ...]
    version: int = 0

    @classmethod
    def from_counts(
        cls,
        counts: Counter[ShapeKey],
        coverage: float = 0.95,
        version: int = 0,
        memory: dict[ShapeKey, float] | None = None,
    ) -> Workload:
        total = sum(counts.values())
        if total <= 0:
            return cls((), version)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        kept: list[tuple[ShapeKey, int]] = []
        cum = 0
        for key, n in ranked:
            kept.append((key, n))
            cum += n
            if cum >= coverage * total:
                break
        mem = memory or {}
        shapes = tuple(
            Shape(
                cpu_milli=k[0],
                compute_milli=k[1],
                count=k[2],
                models=k[3],
                weight=n / cum,
                host_memory_mib=mem.get(k, 0.0),
            )
            for k, n in kept
        )
        return cls(shapes, version)

    @classmethod
    def from_requests(cls, requests: Iterable[Request], coverage: float = 0.95) -> Workload:
        counts: Counter[ShapeKey] = Counter()
        mem: dict[ShapeKey, float] = {}
        for r in requests:
            k = shape_key(r)
            counts[k] += 1
            mem[k] = mem.get(k, 0.0) + r.host_memory_mib
        return cls.from_counts(counts, coverage, memory={k: m / counts[k] for k, m in mem.items()})


# A prior for when nothing has been seen yet: common GPU-sharing shapes.
PRIOR = Workload(
    (
        Shape(0, WHOLE, 1, (), 0.35),
        Shape(0, 500, 1, (), 0.15),
        Shape(0, 250, 1, (), 0.15),
        Shape(0, 750, 1, (), 0.05),
        Shape(0, 100, 1, (), 0.05),
        Shape(0, WHOLE, 2, (), 0.1),
        Shape(0, WHOLE, 4, (), 0.1),
        Shape(0, WHOLE, 8, (), 0.05),
    ),
    version=-1,
)


def distance(a: Workload, b: Workload) -> float:
    """Total variation distance between two mixes (0: the same, 1: nothing in common)."""
    wa: dict[ShapeKey, float] = {}
    for s in a.shapes:
        wa[(s.cpu_milli, s.compute_milli, s.count, s.models)] = s.weight
    wb: dict[ShapeKey, float] = {}
    for s in b.shapes:
        wb[(s.cpu_milli, s.compute_milli, s.count, s.models)] = s.weight
    return 0.5 * sum(abs(wa.get(k, 0.0) - wb.get(k, 0.0)) for k in wa.keys() | wb.keys())


class WorkloadWindow:
    """The recent mix of request shapes, as a :class:`Workload` that changes in steps."""

    def __init__(
        self,
        size: int = 2000,
        refresh: int = 200,
        coverage: float = 0.95,
        tolerance: float = 0.05,
    ) -> None:
        if size <= 0 or refresh <= 0:
            raise ValueError("window size and refresh must be positive")
        self.size = size
        self.refresh = refresh
        self.coverage = coverage
        self.tolerance = tolerance
        self._recent: deque[ShapeKey] = deque()
        self._counts: Counter[ShapeKey] = Counter()
        self._since = 0
        self._version = 0
        self._current: Workload = PRIOR

    def observe(self, req: Request) -> None:
        key = shape_key(req)
        self._recent.append(key)
        self._counts[key] += 1
        if len(self._recent) > self.size:
            old = self._recent.popleft()
            self._counts[old] -= 1
            if self._counts[old] <= 0:
                del self._counts[old]
        self._since += 1
        # while the window is still short every request refreshes, then every `refresh`;
        # a new version only when the mix really moved (scores cached against the old
        # version are thrown away with it)
        if self._since >= self.refresh or len(self._recent) < self.refresh:
            self._since = 0
            new = Workload.from_counts(self._counts, self.coverage, self._version + 1)
            if self._current is PRIOR or distance(self._current, new) > self.tolerance:
                self._version += 1
                self._current = new

    @property
    def workload(self) -> Workload:
        return self._current
