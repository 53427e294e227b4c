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

from flexmesh.policies.cluster import UNKNOWN, Cluster, DeviceSpec, NodeRec, NodeSpec
from flexmesh.policies.engine import Placer, PolicySpec, describe
from flexmesh.policies.types import MultiPlacement, NoFit, Placement, Request
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


def _try(
    spec: NodeSpec,
    victims: Sequence[RunningJob],
    req: Request,
    policy: PolicySpec,
    workload: Workload | None,
) -> tuple[float, Placement | MultiPlacement] | None:
    """Placement (and its score) of the request on the node once the victims are gone."""
    one = Cluster([spec])
    for v in victims:
        one.release(
            v.node, v.devices, v.compute_milli, v.memory_mib, v.cpu_milli, v.host_memory_mib
        )
    placer = Placer(one, policy, workload=workload)
    cls = one.nodes[spec.name].cls
    assert cls is not None
    r = placer.evaluate(req, cls, exempt_battery=spec.name == req.origin)
    if r is None:
        return None
    res = placer.decide(req)
    if isinstance(res, NoFit):  # pragma: no cover - evaluate said it fits
        return None
    return r[0], res


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
    by_node: dict[str, list[RunningJob]] = {}
    for job in running:
        if may_preempt(req, job) and job.node in cluster.nodes:
            by_node.setdefault(job.node, []).append(job)

    best: tuple[tuple[float, int, int, float], Preemption] | None = None

    def consider(
        victims: Sequence[RunningJob], fit: tuple[float, Placement | MultiPlacement]
    ) -> None:
        nonlocal best
        lost = sum(v.work_lost for v in victims)
        key = (lost, len(victims), sum(v.priority for v in victims), fit[0])
        if best is None or key < best[0]:
            ids = tuple(v.id for v in victims)
            best = (key, Preemption(fit[1], ids, lost))

    # nodes where it fits with nobody stopped
    if placer is None or placer.cluster is not cluster:
        placer = Placer(cluster, policy, workload=workload)
    direct = placer.decide(req)
    if not isinstance(direct, NoFit):
        return Preemption(direct, (), 0.0)

    for name in sorted(by_node):
        cands = sorted(by_node[name], key=lambda j: (j.work_lost, j.priority, j.id))
        spec = _node_spec(cluster.nodes[name])
        if _try(spec, cands, req, policy, workload) is None:
            continue  # even stopping every candidate here is not enough
        if len(cands) <= EXACT_LIMIT:
            for k in range(1, len(cands) + 1):
                for combo in combinations(cands, k):
                    lost = sum(v.work_lost for v in combo)
                    if best is not None and lost > best[0][0]:
                        continue
                    fit = _try(spec, combo, req, policy, workload)
                    if fit is not None:
                        consider(combo, fit)
        else:
            chosen: list[RunningJob] = []
            for v in cands:  # cheapest first until it fits
                chosen.append(v)
                if _try(spec, chosen, req, policy, workload) is not None:
                    break
            for v in sorted(chosen, key=lambda j: -j.work_lost):  # drop what was not needed
                rest = [c for c in chosen if c is not v]
                if _try(spec, rest, req, policy, workload) is not None:
                    chosen = rest
            fit = _try(spec, chosen, req, policy, workload)
            if fit is not None:
                consider(chosen, fit)
    if best is None:
        return NoFit(
            f"no set of preemptible jobs below priority {req.priority} frees room for "
            f"{describe(req)}"
        )
    return best[1]
