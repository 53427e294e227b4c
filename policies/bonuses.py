"""The bonuses a placer (``engine``) takes off the scores of a few nodes.

Locality: the submitting node and nodes with a known round-trip time get a bonus of up to
``locality`` score units: the origin the full bonus, a lender with RTT ``r`` ms
``locality * 50 / (50 + r)``, everyone else none. Only those few nodes are scored one by one.

Holding: a node that already holds what the request needs (its working directory's
bundle, its container image: ``saved`` bytes it need not fetch) gets a bonus of
``cache * saved / (saved + 256 MiB)`` score units, bounded by ``cache``. The scores are in
devices of fragmentation, so with the default 0.02 a holder wins only among nodes within
20 milli of the best; it never takes a placement that fragments more than that.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from flexmesh.policies.types import Request

RTT_SCALE_MS = 50.0
CACHE_SCALE_BYTES = 256 * 2**20  # bytes saved that earn half the holding bonus
MAX_HOLDERS = 64  # holders a decision scores one by one at most (most bytes saved first)


def locality_bonuses(weight: float, req: Request,
                     rtt: Mapping[str, float] | None) -> dict[str, float]:
    """``weight`` for the submitting node, less for lenders the further they are."""
    bonuses: dict[str, float] = {}
    if rtt:
        for name, ms in rtt.items():
            bonuses[name] = weight * RTT_SCALE_MS / (RTT_SCALE_MS + max(0.0, ms))
    if req.origin:  # after the RTTs: the origin's own bonus is the full one
        bonuses[req.origin] = weight
    return bonuses


def holding_bonuses(weight: float, saved: Mapping[str, int],
                    bonuses: dict[str, float]) -> dict[str, float]:
    """``bonuses`` plus each holder's (the ``MAX_HOLDERS`` that save the most)."""
    holders = [(n, b) for n, b in saved.items() if b > 0]
    if len(holders) > MAX_HOLDERS:
        holders = heapq.nlargest(MAX_HOLDERS, holders, key=lambda nb: nb[1])
    out = dict(bonuses)
    for name, b in holders:
        out[name] = out.get(name, 0.0) + weight * b / (b + CACHE_SCALE_BYTES)
    return out
