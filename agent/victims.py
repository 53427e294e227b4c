"""The jobs to stop for a queued request that fits nowhere (the scheduler's; sans-IO)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flexmesh.policies import PolicySpec, Preemption, Request, RunningJob, choose_victims
from flexmesh.policies.engine import Placer
from flexmesh.policies.preempt import may_preempt


@dataclass(frozen=True, slots=True)
class PreemptOrder:
    """Stop ``victims`` (jobs on ``node``) so that queued job ``job_id`` fits there."""

    job_id: str
    node: str
    victims: tuple[str, ...]
    priority: int


def preempt_for(spec: PolicySpec | None, running: Sequence[RunningJob], req: Request,
                job_id: str, placer: Placer,
                doomed: Mapping[str, float]) -> PreemptOrder | None:
    """The cheapest set of preemptible lower-priority jobs (none already told to stop)
    whose room would take ``req``; None where there is none (or no ``spec`` to choose by)."""
    if spec is None:
        return None
    chosen = [j for j in running if j.id not in doomed and may_preempt(req, j)]
    if not chosen:
        return None
    result = choose_victims(req, placer.cluster, chosen, spec, placer=placer)
    if not isinstance(result, Preemption) or not result.victims:
        return None
    return PreemptOrder(job_id, result.placement.node, result.victims, req.priority)
