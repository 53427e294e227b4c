"""Scores: how good is laying the request on these devices of this node? Lower is better.

Each score is a small pure function ``(request, node class, choice, context) -> float``.
A policy is a weighted sum of scores (see :mod:`flexmesh.policies.engine`). The context
carries what a score needs beyond the node itself (the target workload for fragmentation)
and memo tables, which only make repeated questions cheaper.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from flexmesh.policies.filters import Choice
from flexmesh.policies.fragplan import CapPlan, FragPlan, cap_frag_amount, frag_amount
from flexmesh.policies.nodes import UNKNOWN, NodeClass
from flexmesh.policies.types import Request
from flexmesh.policies.workload import Workload

_TOKENS = itertools.count(1)


class ScoreContext:
    """What scores share for one placer: the workload and memo tables.

    ``token`` changes whenever anything a score depends on changes (workload, supply);
    per-class "before" values are cached on the class under keys derived from it."""

    __slots__ = (
        "_cap",
        "_capplans",
        "_frag",
        "_plans",
        "_prices",
        "_ratios",
        "supply",
        "token",
        "workload",
    )

    def __init__(self, workload: Workload, supply: dict[str, int] | None = None) -> None:
        self.workload = workload
        self.supply: dict[str, int] = dict(supply or {})  # device compute per model
        self._prices: dict[str, float] | None = None
        self.token = next(_TOKENS)
        self._plans: dict[tuple[str, ...], FragPlan] = {}
        self._frag: dict[tuple[tuple[str, ...], int, tuple[int, ...]], float] = {}
        self._capplans: dict[tuple[str, ...], CapPlan] = {}
        self._cap: dict[tuple[tuple[str, ...], int, int, tuple[int, ...]], float] = {}
        self._ratios: tuple[float, float] | None = None

    def set_workload(self, workload: Workload) -> None:
        self.workload = workload
        self._plans.clear()
        self._frag.clear()
        self._capplans.clear()
        self._cap.clear()
        self._ratios = None
        self._prices = None
        self.token = next(_TOKENS)

    def set_supply(self, supply: dict[str, int]) -> None:
        if supply != self.supply:
            self.supply = dict(supply)
            self._prices = None
            self.token = next(_TOKENS)

    def frag_before(self, cls: NodeClass) -> float:
        """The class's expected fragmentation now (cached on the class)."""
        key = -3 * self.token
        v: float | None = cls.cache.get(key)
        if v is None:
            v = cls.cache[key] = self.frag(cls.models_t, cls.cpu_free, cls.free)
        return v

    def stranded_before(self, cls: NodeClass) -> float:
        """The class's stranded compute now (cached on the class)."""
        key = -3 * self.token - 1
        v: float | None = cls.cache.get(key)
        if v is None:
            v = cls.cache[key] = stranded(cls.total_free, cls.cpu_free, cls.mem_free, self)
        return v

    def priced(self) -> bool:
        """Whether any device model carries a price (the workload binds some to models)."""
        self.price("")
        return bool(self._prices)

    def price(self, model: str) -> float:
        """How much of the workload is bound to this device model, relative to how much of
        the mesh it is: the sum, over the model constraints that allow it, of the
        constrained share of the demand over the share of the supply those models are."""
        if self._prices is None:
            total_supply = sum(self.supply.values())
            demand: dict[tuple[str, ...], float] = {}
            total_demand = 0.0
            for sh in self.workload.shapes:
                g = sh.weight * sh.compute_milli * sh.count
                total_demand += g
                if sh.models and g > 0:
                    demand[sh.models] = demand.get(sh.models, 0.0) + g
            prices: dict[str, float] = {}
            if total_supply > 0 and total_demand > 0:
                for models, d in demand.items():
                    sup = sum(self.supply.get(m, 0) for m in set(models))
                    if sup <= 0:
                        continue
                    rho = (d / total_demand) / (sup / total_supply)
                    for m in set(models):
                        prices[m] = prices.get(m, 0.0) + rho
            self._prices = prices
        return self._prices.get(model, 0.0)

    def ratios(self) -> tuple[float, float]:
        """CPU milli and node memory MiB the workload's device requests bring per device
        milli (0 where the workload says nothing)."""
        if self._ratios is None:
            g = c = m = 0.0
            for sh in self.workload.shapes:
                if sh.count > 0 and sh.compute_milli > 0:
                    g += sh.weight * sh.compute_milli * sh.count
                    c += sh.weight * sh.cpu_milli
                    m += sh.weight * sh.host_memory_mib
            self._ratios = (c / g, m / g) if g > 0 else (0.0, 0.0)
        return self._ratios

    def cap_frag(
        self, models: tuple[str, ...], cpu_free: int, mem_free: int, free: tuple[int, ...]
    ) -> float:
        key = (models, cpu_free, mem_free, free)
        v = self._cap.get(key)
        if v is None:
            if len(self._cap) > 500_000:
                self._cap.clear()
            p = self._capplans.get(models)
            if p is None:
                p = self._capplans[models] = CapPlan(self.workload, models)
            v = self._cap[key] = cap_frag_amount(free, cpu_free, mem_free, p)
        return v

    def plan(self, models: tuple[str, ...]) -> FragPlan:
        p = self._plans.get(models)
        if p is None:
            p = self._plans[models] = FragPlan(self.workload, models)
        return p

    def frag(self, models: tuple[str, ...], cpu_free: int, free: tuple[int, ...]) -> float:
        key = (models, cpu_free, free)
        v = self._frag.get(key)
        if v is None:
            if len(self._frag) > 500_000:
                self._frag.clear()
            v = self._frag[key] = frag_amount(free, cpu_free, self.plan(models))
        return v


Score = Callable[[Request, NodeClass, Choice, ScoreContext], float]


def _models(cls: NodeClass) -> tuple[str, ...]:
    return cls.models_t


def after_free(req: Request, cls: NodeClass, choice: Choice) -> tuple[int, ...]:
    """The node's free compute per device after the placement, sorted largest first."""
    free = list(cls.free)
    c = req.compute_milli
    for i in choice:
        free[i] -= min(c, cls.devs[i][2])
    free.sort(reverse=True)
    return tuple(free)


def after_cpu(req: Request, cls: NodeClass) -> int:
    return UNKNOWN if cls.cpu_free == UNKNOWN else cls.cpu_free - req.cpu_milli


def taken(req: Request, cls: NodeClass, choice: Choice) -> int:
    c = req.compute_milli
    return sum(min(c, cls.devs[i][2]) for i in choice)


# -- the scores -----------------------------------------------------------------------------


def fgd(req: Request, cls: NodeClass, choice: Choice, ctx: ScoreContext) -> float:
    """Fragmentation gradient: how much the node's expected fragmentation grows (in
    devices) if the request lands here. FGD places where it grows least."""
    after = ctx.frag(cls.models_t, after_cpu(req, cls), after_free(req, cls, choice))
    return (after - ctx.frag_before(cls)) / 1000.0


def after_mem(req: Request, cls: NodeClass) -> int:
    return UNKNOWN if cls.mem_free == UNKNOWN else cls.mem_free - req.host_memory_mib


def cfgd(req: Request, cls: NodeClass, choice: Choice, ctx: ScoreContext) -> float:
    """Capacity-aware fragmentation gradient: like ``fgd``, but a shape's share of the
    idle compute counts as usable only as far as the node's CPU and memory let copies of
    the shape run on it (see :func:`cap_frag_amount`)."""
    models = _models(cls)
    before = ctx.cap_frag(models, cls.cpu_free, cls.mem_free, cls.free)
    after = ctx.cap_frag(
        models, after_cpu(req, cls), after_mem(req, cls), after_free(req, cls, choice)
    )
    return (after - before) / 1000.0


def stranded(total_free: int, cpu_free: int, mem_free: int, ctx: ScoreContext) -> float:
    """Idle device compute the node's CPU or memory cannot feed at the workload's usual
    ratio (milli)."""
    rc, rm = ctx.ratios()
    s = 0.0
    if rc > 0 and cpu_free != UNKNOWN:
        s = max(s, total_free - cpu_free / rc)
    if rm > 0 and mem_free != UNKNOWN:
        s = max(s, total_free - mem_free / rm)
    return s


def strand(req: Request, cls: NodeClass, choice: Choice, ctx: ScoreContext) -> float:
    """Growth of the device compute stranded for want of CPU or memory (devices)."""
    before = ctx.stranded_before(cls)
    after = stranded(
        cls.total_free - taken(req, cls, choice), after_cpu(req, cls), after_mem(req, cls), ctx
    )
    return (after - before) / 1000.0


def scarcity(req: Request, cls: NodeClass, choice: Choice, ctx: ScoreContext) -> float:
    """Device compute taken from models the workload's model-bound requests depend on,
    weighed by how oversubscribed those models are (see :meth:`ScoreContext.price`)."""
    if not choice or not ctx.priced():
        return 0.0
    c = req.compute_milli
    return sum(min(c, cls.devs[i][2]) * ctx.price(cls.devs[i][5]) for i in choice) / 1000.0


def device_leftover(req: Request, cls: NodeClass, choice: Choice, ctx: ScoreContext) -> float:
    """Share of the chosen devices left free afterwards (compute and memory alike)."""
    if not choice:
        return 0.0
    s = 0.0
    for i in choice:
        fc, fm, cc, cm, _, _ = cls.devs[i]
        take = min(req.compute_milli, cc)
        s += (fc - take) / max(cc, 1)
        if cm > 0:
            s += (fm - (fm if req.compute_milli >= cc else req.memory_mib)) / cm
    return s / len(choice)


def node_leftover(req: Request, cls: NodeClass, choice: Choice, ctx: ScoreContext) -> float:
    """Share of the node left free afterwards: device compute, and CPU where known."""
    gpu = (cls.total_free - taken(req, cls, choice)) / cls.total_cap if cls.total_cap else 0.0
    if cls.cpu_free == UNKNOWN or cls.cpu_cap <= 0:
        return gpu
    cpu = (cls.cpu_free - req.cpu_milli) / cls.cpu_cap
    return 0.5 * gpu + 0.5 * cpu


def best_fit(req: Request, cls: NodeClass, choice: Choice, ctx: ScoreContext) -> float:
    """Best fit: the node, then the device, left with the least free afterwards."""
    return node_leftover(req, cls, choice, ctx) + 0.01 * device_leftover(req, cls, choice, ctx)


def spread(req: Request, cls: NodeClass, choice: Choice, ctx: ScoreContext) -> float:
    """Worst fit: the emptiest node, then its emptiest device (load spreading)."""
    return -node_leftover(req, cls, choice, ctx) - 0.01 * device_leftover(req, cls, choice, ctx)


def packing(req: Request, cls: NodeClass, choice: Choice, ctx: ScoreContext) -> float:
    """GPU packing (as in the FGD paper's baseline): share an already used device first
    (the fullest), then whole free devices of a node already in use, then a fresh node."""
    n = len(cls.devs)
    if not choice:
        return 0.0
    if cls.n_whole == n:  # an untouched node: smaller nodes first
        return 2.0 + n / 64.0
    fresh = sum(1 for i in choice if cls.devs[i][0] >= cls.devs[i][2])
    if fresh:
        return 1.0 + fresh / 64.0
    ratio = sum(cls.devs[i][0] / max(cls.devs[i][2], 1) for i in choice) / len(choice)
    return ratio * 0.5


def frag_after(req: Request, cls: NodeClass, choice: Choice, ctx: ScoreContext) -> float:
    """The node's expected fragmentation after the placement (devices), not its change."""
    return ctx.frag(_models(cls), after_cpu(req, cls), after_free(req, cls, choice)) / 1000.0


def idle_after(req: Request, cls: NodeClass, choice: Choice, ctx: ScoreContext) -> float:
    """Idle compute left on the node afterwards (devices): prefer fuller nodes."""
    return (cls.total_free - taken(req, cls, choice)) / 1000.0


SCORES: dict[str, Score] = {
    "fgd": fgd,
    "cfgd": cfgd,
    "strand": strand,
    "scarcity": scarcity,
    "best-fit": best_fit,
    "spread": spread,
    "packing": packing,
    "device-leftover": device_leftover,
    "node-leftover": node_leftover,
    "frag-after": frag_after,
    "idle-after": idle_after,
}
