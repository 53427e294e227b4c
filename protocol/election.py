"""The coordinator as a pure function of the membership view, with terms.

Theory of operation
-------------------
Every node computes the same answer from the same view: the coordinator is the eligible
member with the lowest ``(priority, name)`` among those *alive*. Hysteresis: the current
coordinator keeps the role while it is merely *suspect*, so one lost probe does not move
the queue; it is replaced once it is *dead* or *left*.

Terms make coordinators comparable. A node that finds itself coordinator *claims* a term
one above the highest it has seen anywhere (claims and the high-water marks every node
gossips in its facts), and claims again above any other claim it sees while it holds the
role. Owners fence lease requests by term, so after a partition heals the stale side's
requests are refused and only the higher term places work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

_LIVE = ("alive", "suspect")
# How far past the highest term a node has seen another may claim or report: terms rise
# by one per election, so a bigger jump is a forgery or a bug, and taken it would raise
# every term in the mesh for good.
TERM_STEP = 1024


def plausible_term(term: int, seen: int) -> bool:
    """Whether ``term`` may follow ``seen`` (a node that has seen none takes any)."""
    return seen == 0 or term <= seen + TERM_STEP


@dataclass(frozen=True, slots=True)
class Voter:
    name: str
    state: str  # membership state
    priority: int = 0
    eligible: bool = True
    claim: int = 0  # the term this member claims as coordinator, 0 if none
    max_term: int = 0  # highest term this member has seen


@dataclass(frozen=True, slots=True)
class Belief:
    """Who a node believes the coordinator is, and that coordinator's term (0: unknown)."""

    coordinator: str | None
    term: int


def choose_coordinator(voters: Iterable[Voter], current: str | None) -> str | None:
    best: Voter | None = None
    keep: Voter | None = None
    for v in voters:
        if not v.eligible:
            continue
        if v.name == current and v.state in _LIVE:
            keep = v
        if v.state == "alive" and (best is None or (v.priority, v.name) < (best.priority,
                                                                          best.name)):
            best = v
    if keep is not None and (best is None or (keep.priority, keep.name) <= (best.priority,
                                                                          best.name)):
        return keep.name
    if keep is not None and keep.state == "suspect":
        return keep.name  # hysteresis: a suspect coordinator is not replaced yet
    return best.name if best is not None else None


def highest_term(voters: Iterable[Voter]) -> int:
    return max((max(v.claim, v.max_term) for v in voters), default=0)


def decide(voters: list[Voter], me: str, current: Belief, my_claim: int) -> tuple[Belief, int]:
    """The new belief and this node's claim (0 when it is not the coordinator)."""
    coordinator = choose_coordinator(voters, current.coordinator)
    if coordinator is None:
        return Belief(None, 0), 0
    if coordinator == me:
        top = highest_term(voters)
        rival = any(
            v.name != me and v.state in _LIVE and v.claim >= my_claim for v in voters
            if v.claim
        )
        if my_claim == 0 or top > my_claim or rival:
            my_claim = max(top, my_claim) + 1
        return Belief(me, my_claim), my_claim
    term = next((v.claim for v in voters if v.name == coordinator), 0)
    return Belief(coordinator, term), 0
