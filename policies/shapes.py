"""A request shape's scored classes, kept as a heap by ``engine.Placer``; the best entry,
or one of those tied with it, drawn past excluded nodes."""

from __future__ import annotations

import heapq
import random

from flexmesh.policies.filters import Choice
from flexmesh.policies.nodes import NodeClass

TIE_EPS = 1e-9  # scores closer than this are a tie


# a scored class in a shape's heap: (score, class seq, class, device choice); of equal
# scores the older class comes first
Entry = tuple[float, int, NodeClass, Choice]


class ShapeState:
    """A request shape's scored classes: a heap of entries, live and dead."""

    __slots__ = ("cursor", "heap", "relevant")

    def __init__(self) -> None:
        self.heap: list[Entry] = []
        self.cursor = 0
        self.relevant: dict[tuple[tuple[str, str], ...], bool] = {}

    def compact(self) -> None:
        """Drop the entries of classes no node is in any more."""
        self.heap = [e for e in self.heap if e[2].members]
        heapq.heapify(self.heap)


def draw_tied_with_top(st: ShapeState, rng: random.Random) -> Entry:
    """One of the live entries tied with the top, each of their nodes equally likely.
    The tied entries form a subtree at the root: walk it in place rather than pop."""
    heap = st.heap
    limit = heap[0][0] + TIE_EPS
    tied: list[tuple[Entry, int]] = []
    total = 0
    dead = 0
    stack = [0]
    size = len(heap)
    while stack:
        i = stack.pop()
        e = heap[i]
        if e[0] > limit:
            continue
        n = len(e[2].members)
        if n:
            tied.append((e, n))
            total += n
        else:
            dead += 1
        j = 2 * i + 1
        if j < size:
            stack.append(j)
            if j + 1 < size:
                stack.append(j + 1)
    if dead > 32 and dead > len(tied):  # walks through the dead cost: compact
        st.compact()
    drawn = _draw(tied, rng.random() * total)
    return drawn if drawn is not None else tied[-1][0]


def best_not_excluded(
    heap: list[Entry], exclude: frozenset[str], rng: random.Random | None
) -> Entry | None:
    """The best entry with a node not excluded; with an rng, drawn from those tied with
    it, each of their nodes not excluded equally likely."""
    cands = tied_not_excluded(heap, exclude, first_only=rng is None)
    if not cands:
        return None
    if rng is not None and len(cands) > 1:
        drawn = _draw(cands, rng.random() * sum(n for _, n in cands))
        if drawn is not None:
            return drawn
    return cands[0][0]


def tied_not_excluded(
    heap: list[Entry], exclude: frozenset[str], first_only: bool
) -> list[tuple[Entry, int]]:
    """The live entries tied with the best one that has a node not excluded, each with its
    count of such nodes (only that best one with ``first_only``). They are found by popping
    and then pushed back; the dead entries on the way stay off."""
    popped: list[Entry] = []
    cands: list[tuple[Entry, int]] = []
    top: float | None = None
    while heap:
        e = heap[0]
        if not e[2].members:
            heapq.heappop(heap)
            continue
        if top is not None and e[0] > top + TIE_EPS:
            break
        heapq.heappop(heap)
        popped.append(e)
        n = len(e[2].members) - sum(1 for m in e[2].members if m in exclude)
        if n <= 0:
            continue
        if top is None:
            top = e[0]
        cands.append((e, n))
        if first_only:
            break
    for e in popped:
        heapq.heappush(heap, e)
    return cands


def _draw(weighted: list[tuple[Entry, int]], x: float) -> Entry | None:
    """The entry that ``x``, uniform below the total weight, falls on (each as likely as
    its weight); None if rounding took ``x`` up to the total."""
    for e, n in weighted:
        x -= n
        if x < 0:
            return e
    return None
