"""Pure placement policies: (request, view of candidate devices) -> placement or reason.

Two ways in:

* ``get_policy(name)(request, candidates)`` -- stateless, one decision over a list of
  per-device :class:`Candidate` rows (the index is built for the call).
* ``make_placer(cluster, name)`` -- a :class:`Placer` over an incremental
  :class:`Cluster` index, for a coordinator or a trace replay making many decisions:
  it scores classes of identical nodes and caches their scores, and learns the recent mix
  of request shapes that fragmentation is measured against.

Policies are named (``POLICIES``) or composed from scores with weights:
``"fgd+packing:0.05"``; see :mod:`flexmesh.policies.engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from flexmesh.policies.bestfit import best_fit
from flexmesh.policies.cluster import Cluster
from flexmesh.policies.engine import Placer
from flexmesh.policies.gang import place_gang
from flexmesh.policies.nodes import DeviceSpec, NodeClass, NodeSpec
from flexmesh.policies.preempt import Preemption, RunningJob, choose_victims
from flexmesh.policies.scores import SCORES
from flexmesh.policies.spec import CACHE_BONUS, PolicySpec, parse_spec
from flexmesh.policies.types import (
    Candidate,
    GangPlacement,
    GangResult,
    MultiPlacement,
    NoFit,
    PlaceResult,
    Placement,
    Request,
)
from flexmesh.policies.workload import PRIOR, Shape, Workload, WorkloadWindow, shape_key

Policy = Callable[[Request, Iterable[Candidate]], PlaceResult]

# name -> weighted scores (lower is better; see flexmesh.policies.scores):
#   best-fit  the node, then the device, left with the least free
#   spread    the emptiest node (worst fit)
#   packing   the FGD paper's GPU packing: used devices, then used nodes, then fresh ones
#   fgd       Fragmentation Gradient Descent (Weng et al., ATC '23): where the node's
#             expected fragmentation against the target workload grows least
#   fgd-plus  fgd, plus device compute stranded for want of CPU or memory at the
#             workload's usual ratio, plus the pressure on device models that model-bound
#             requests depend on, plus (as a tie-breaker) the idle compute left on the node,
#             so untouched nodes stay whole for big jobs. Beats fgd on every openb trace
#             (scripts/bench_placement).
SPECS: dict[str, PolicySpec] = {
    "best-fit": PolicySpec("best-fit", (("best-fit", 1.0),), locality=0.1, cache=CACHE_BONUS),
    "spread": PolicySpec("spread", (("spread", 1.0),), locality=0.1, cache=CACHE_BONUS),
    "packing": PolicySpec("packing", (("packing", 1.0),), locality=0.1, cache=CACHE_BONUS),
    "fgd": PolicySpec("fgd", (("fgd", 1.0),), locality=0.1, cache=CACHE_BONUS),
    "fgd-plus": PolicySpec(
        "fgd-plus",
        (("fgd", 1.0), ("strand", 1.0), ("scarcity", 2.0), ("idle-after", 0.01)),
        locality=0.1,
        cache=CACHE_BONUS,
    ),
}
DEFAULT_POLICY = "fgd-plus"


def get_spec(name: str, weights: Mapping[str, float] | None = None) -> PolicySpec:
    """The policy called ``name`` (or composed as ``"score:w+score:w"``), weights applied."""
    try:
        return parse_spec(name, SPECS, weights)
    except ValueError as e:
        if name in SPECS or "+" in name or ":" in name:
            raise
        known = ", ".join(sorted(SPECS))
        raise ValueError(f"unknown placement policy {name!r} (known: {known})") from e


def make_placer(
    cluster: Cluster,
    name: str = DEFAULT_POLICY,
    weights: Mapping[str, float] | None = None,
    workload: Workload | None = None,
) -> Placer:
    return Placer(cluster, get_spec(name, weights), workload=workload)


def _stateless(spec: PolicySpec) -> Policy:
    def policy(request: Request, candidates: Iterable[Candidate]) -> PlaceResult:
        cands = list(candidates)
        cluster = Cluster.from_candidates(cands)
        rtt = {c.node: c.rtt_ms for c in cands if c.rtt_ms is not None}
        # no history in a single call: the prior mix, with this request's shape in it
        own = Shape(request.cpu_milli, *shape_key(request)[1:], weight=0.25)
        wl = Workload((*PRIOR.shapes, own), version=-2)
        placer = Placer(cluster, spec, workload=wl)
        return placer.decide(request, rtt or None, explain=True)

    policy.__name__ = spec.name.replace("-", "_")
    policy.__qualname__ = policy.__name__
    return policy


POLICIES: dict[str, Policy] = {name: _stateless(spec) for name, spec in SPECS.items()}


def get_policy(name: str, weights: Mapping[str, float] | None = None) -> Policy:
    if name in POLICIES and not weights:
        return POLICIES[name]
    return _stateless(get_spec(name, weights))


__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "SCORES",
    "SPECS",
    "Candidate",
    "Cluster",
    "DeviceSpec",
    "GangPlacement",
    "GangResult",
    "MultiPlacement",
    "NoFit",
    "NodeClass",
    "NodeSpec",
    "PlaceResult",
    "Placement",
    "Placer",
    "Policy",
    "PolicySpec",
    "Preemption",
    "Request",
    "RunningJob",
    "Workload",
    "WorkloadWindow",
    "best_fit",
    "choose_victims",
    "get_policy",
    "get_spec",
    "make_placer",
    "place_gang",
]
