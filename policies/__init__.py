"""Pure placement policies: (request, view of candidate devices) -> placement or reason."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flexmesh.policies.bestfit import best_fit
from flexmesh.policies.types import Candidate, NoFit, PlaceResult, Placement, Request

Policy = Callable[[Request, Iterable[Candidate]], PlaceResult]

POLICIES: dict[str, Policy] = {"best-fit": best_fit}
DEFAULT_POLICY = "best-fit"


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown placement policy {name!r} (known: {known})") from None


__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "Candidate",
    "NoFit",
    "PlaceResult",
    "Placement",
    "Policy",
    "Request",
    "best_fit",
    "get_policy",
]
