"""Preemption: which running jobs to stop so a higher-priority request fits.

Only jobs that were submitted as preemptible and whose priority is strictly lower than the
request's are ever candidates; a job that was not preemptible is never chosen. Among the
nodes where stopping some candidates makes room, the answer is the set that loses the least
work (``RunningJob.work_lost``, e.g. device-seconds since its last checkpoint), then the
fewest jobs, then the lowest priorities, then the best placement score. The search is exact
for up to ``EXACT_LIMIT`` candidates on a node and greedy with a pruning pass above that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

from flexmesh.policies.cluster import Cluster
from flexmesh.policies.engine import Placer
from flexmesh.policies.nodes import UNKNOWN, DeviceSpec, NodeRec, NodeSpec
from flexmesh.policies.spec import PolicySpec
from flexmesh.policies.types import MultiPlacement, NoFit, Placement, Request, describe
from flexmesh.policies.workload import Workload

EXACT_LIMIT = 10


@dataclass(frozen=True, slots=True)
class RunningJob:
    """A job holding devices: what it holds, and what stopping it would cost."""

    id: str
    node: str
    devices: tuple[str, ...]
    compute_milli: int  # per device
    memory_mib: int = 0  # per device
    cpu_milli: int = 0
    host_memory_mib: int = 0
    priority: int = 0
    preemptible: bool = False
    work_lost: float = 0.0


@dataclass(frozen=True, slots=True)
class Preemption:
    """Stop ``victims`` (job ids), then place the request at ``placement``."""

    placement: Placement | MultiPlacement
    victims: tuple[str, ...]
    work_lost: float


def may_preempt(req: Request, job: RunningJob) -> bool:
    return job.preemptible and job.priority < req.priority


def _node_spec(rec: NodeRec) -> NodeSpec:
    return NodeSpec(
        name=rec.name,
        devices=tuple(
            DeviceSpec(d.id, d.kind, d.model, d.cap_c, d.cap_m, d.free_c, d.free_m)
            for d in rec.devs
        ),
        cpu_milli=None if rec.cpu_cap == UNKNOWN else rec.cpu_cap,
        memory_mib=None if rec.mem_cap == UNKNOWN else rec.mem_cap,
        cpu_free_milli=None if rec.cpu_free == UNKNOWN else rec.cpu_free,
        memory_free_mib=None if rec.mem_free == UNKNOWN else rec.mem_free,
        healthy=rec.healthy,
        battery_pct=rec.battery_pct,
        battery_floor_pct=rec.battery_floor,
    )


# placement score and where the request would go
_Fit = tuple[float, Placement | MultiPlacement]
# what makes one preemption cheaper than another, in order: work lost, jobs stopped, the sum
# of their priorities, the placement score
_Cost = tuple[float, int, int, float]


@dataclass(frozen=True, slots=True)
class _Node:
    """A copy of one node on which stopping some of its jobs is tried (the cluster is not
    touched)."""

    spec: NodeSpec
    req: Request
    policy: PolicySpec
    workload: Workload | None

    def fit(self, victims: Sequence[RunningJob]) -> _Fit | None:
        """Placement (and its score) of the request on the node once the victims are gone."""
        spec, req = self.spec, self.req
        one = Cluster([spec])
        for v in victims:
            one.release(
                v.node, v.devices, v.compute_milli, v.memory_mib, v.cpu_milli, v.host_memory_mib
            )
        placer = Placer(one, self.policy, workload=self.workload)
        cls = one.nodes[spec.name].cls
        assert cls is not None
        r = placer.evaluate(req, cls, exempt_battery=spec.name == req.origin)
        if r is None:
            return None
        res = placer.decide(req)
        if isinstance(res, NoFit):  # pragma: no cover - evaluate said it fits
            return None
        return r[0], res


class _Cheapest:
    """The cheapest preemption found so far (see ``_Cost``)."""

    __slots__ = ("best", "cost")

    def __init__(self) -> None:
        self.cost: _Cost | None = None
        self.best: Preemption | None = None

    def loses_more(self, lost: float) -> bool:
        """Whether stopping jobs that lose this much work can never beat the best."""
        return self.cost is not None and lost > self.cost[0]

    def consider(self, victims: Sequence[RunningJob], fit: _Fit) -> None:
        lost = sum(v.work_lost for v in victims)
        cost = (lost, len(victims), sum(v.priority for v in victims), fit[0])
        if self.cost is None or cost < self.cost:
            self.cost = cost
            self.best = Preemption(fit[1], tuple(v.id for v in victims), lost)


def choose_victims(
    req: Request,
    cluster: Cluster,
    running: Iterable[RunningJob],
    policy: PolicySpec,
    workload: Workload | None = None,
    placer: Placer | None = None,
) -> Preemption | NoFit:
    """The cheapest set of preemptible lower-priority jobs whose stopping lets ``req`` fit
    (an empty set if it fits already). The cluster is not changed. Pass the coordinator's
    own ``placer`` (over the same cluster) to reuse its cached scores for the first check."""
    by_node = _candidates_by_node(req, cluster, running)
    if placer is None or placer.cluster is not cluster:
        placer = Placer(cluster, policy, workload=workload)
    direct = placer.decide(req)
    if not isinstance(direct, NoFit):
        return Preemption(direct, (), 0.0)
    cheapest = _Cheapest()
    for name in sorted(by_node):
        node = _Node(_node_spec(cluster.nodes[name]), req, policy, workload)
        _search_node(node, by_node[name], cheapest)
    if cheapest.best is None:
        return NoFit(
            f"no set of preemptible jobs below priority {req.priority} frees room for "
            f"{describe(req)}"
        )
    return cheapest.best


def _candidates_by_node(
    req: Request, cluster: Cluster, running: Iterable[RunningJob]
) -> dict[str, list[RunningJob]]:
    """The jobs the request may preempt, by node, cheapest first (ties: lower priority,
    then id, so that the answer does not depend on the order ``running`` came in)."""
    by_node: dict[str, list[RunningJob]] = {}
    for job in running:
        if may_preempt(req, job) and job.node in cluster.nodes:
            by_node.setdefault(job.node, []).append(job)
    for jobs in by_node.values():
        jobs.sort(key=lambda j: (j.work_lost, j.priority, j.id))
    return by_node


def _search_node(node: _Node, cands: list[RunningJob], cheapest: _Cheapest) -> None:
    """Offer ``cheapest`` the best sets of candidates to stop on this node."""
    if node.fit(cands) is None:
        return  # even stopping every candidate here is not enough
    if len(cands) <= EXACT_LIMIT:
        _search_exact(node, cands, cheapest)
        return
    chosen = _search_greedy(node, cands)
    fit = node.fit(chosen)
    if fit is not None:
        cheapest.consider(chosen, fit)


def _search_exact(node: _Node, cands: list[RunningJob], cheapest: _Cheapest) -> None:
    """Every set, fewest jobs first; a set that loses more work than the best found so far
    (on any node) is not worth trying."""
    for k in range(1, len(cands) + 1):
        for combo in combinations(cands, k):
            if cheapest.loses_more(sum(v.work_lost for v in combo)):
                continue
            fit = node.fit(combo)
            if fit is not None:
                cheapest.consider(combo, fit)


def _search_greedy(node: _Node, cands: list[RunningJob]) -> list[RunningJob]:
    """Too many candidates for every set: take the cheapest until the request fits, then
    put back (dearest first) each one it still fits without."""
    chosen: list[RunningJob] = []
    for v in cands:
        chosen.append(v)
        if node.fit(chosen) is not None:
            break
    for v in sorted(chosen, key=lambda j: -j.work_lost):
        rest = [c for c in chosen if c is not v]
        if node.fit(rest) is not None:
            chosen = rest
    return chosen
