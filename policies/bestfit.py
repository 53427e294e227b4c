"""Best-fit: the device whose free capacity is left smallest after the placement.

Tight packing keeps whole devices free for requests that need them. Ties go to the
submitting node (no data crosses the network), then to the lexicographically smallest
``(node, device)`` so the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable

from flexmesh.policies.types import Candidate, NoFit, PlaceResult, Placement, Request


def fits(request: Request, cand: Candidate) -> bool:
    if not cand.healthy:
        return False
    if request.kind != "any" and cand.kind != request.kind:
        return False
    if request.models and cand.model not in request.models:
        return False
    if (
        cand.battery_pct is not None
        and cand.battery_pct < cand.battery_floor_pct
        and cand.node != request.origin
    ):
        return False  # below its battery floor a node lends nothing
    if cand.node_cpu_free_milli is not None and cand.node_cpu_free_milli < request.cpu_milli:
        return False
    if (
        cand.node_memory_free_mib is not None
        and cand.node_memory_free_mib < request.host_memory_mib
    ):
        return False
    if request.whole and (
        cand.free_compute_milli < cand.compute_milli or cand.free_memory_mib < cand.memory_mib
    ):
        return False  # a whole device must be unused
    return (
        cand.free_compute_milli >= request.compute_milli
        and cand.free_memory_mib >= request.memory_mib
    )


def leftover_score(request: Request, cand: Candidate) -> float:
    """Share of the device left free after placing, compute and memory weighed alike."""
    left_c = (cand.free_compute_milli - request.compute_milli) / max(cand.compute_milli, 1)
    left_m = (cand.free_memory_mib - request.memory_mib) / max(cand.memory_mib, 1)
    return left_c + left_m


def best_fit(request: Request, candidates: Iterable[Candidate]) -> PlaceResult:
    if request.count != 1:
        # several devices on one node (or none): the index-based engine lays those out
        from flexmesh.policies import get_policy

        return get_policy("best-fit")(request, candidates)
    best: tuple[float, bool, str, str] | None = None
    seen = 0
    for cand in candidates:
        seen += 1
        if not fits(request, cand):
            continue
        key = (leftover_score(request, cand), cand.node != request.origin, cand.node, cand.device)
        if best is None or key < best:
            best = key
    if best is None:
        return NoFit(explain_nofit(request, seen))
    return Placement(node=best[2], device=best[3])


def explain_nofit(request: Request, seen: int) -> str:
    if seen == 0:
        return "no devices in the mesh"
    kind = "device" if request.kind == "any" else f"{request.kind} device"
    return (
        f"no {kind} has {request.compute_milli} milli compute and "
        f"{request.memory_mib} MiB memory free ({seen} devices considered)"
    )
