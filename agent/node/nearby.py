"""The nodes nearest a request's origin, by network coordinates (``protocol.vivaldi``).

Each node's membership keeps the coordinate every peer's last ack carried, and its own;
so the coordinator estimates the round trip between any origin and any owner, not only
from itself. The placer weighs the ``NEAREST`` nearest nodes to the origin by that
estimate (its locality score); everyone else gets no bonus, so a placement scores a few
nodes one by one, not the whole mesh. The answer is recomputed once the coordinates may
have moved: after as many new round-trip samples as the mesh has members.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexmesh.protocol.membership import ALIVE

if TYPE_CHECKING:
    from flexmesh.protocol.membership import Membership

NEAREST = 8


class Nearby:
    def __init__(self, membership: Membership) -> None:
        self.membership = membership
        self._cache: dict[str, tuple[int, dict[str, float] | None]] = {}

    def __call__(self, origin: str) -> dict[str, float] | None:
        """Node -> estimated round trip from ``origin`` in ms, for its nearest nodes;
        None while ``origin`` has no coordinate here."""
        ms = self.membership
        version = ms.counters.get("rtt_samples", 0) // max(len(ms.members), 1)
        hit = self._cache.get(origin)
        if hit is not None and hit[0] == version:
            return hit[1]
        if len(self._cache) > 4 * NEAREST:
            self._cache.clear()
        estimates = []
        if origin == ms.name or origin in ms.coords:
            for name, m in ms.members.items():
                rtt = ms.rtt(origin, name) if m.state == ALIVE and name != origin else None
                if rtt is not None:
                    estimates.append((rtt, name))
        estimates.sort()
        out = {name: rtt * 1000 for rtt, name in estimates[:NEAREST]} or None
        self._cache[origin] = (version, out)
        return out
