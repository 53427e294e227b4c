"""Gang placement: several requests placed together, all or nothing.

Members are placed biggest first (the hardest to fit go while there is most room), each on
the books as it goes so the next member sees what the previous ones took; if any member
cannot be placed, everything taken so far is given back and the gang gets a ``NoFit``
naming the member. ``distinct_nodes`` puts every member on a different node (one rank per
node); otherwise members may share a node when it has room.
"""

from __future__ import annotations

from collections.abc import Sequence

from flexmesh.policies.engine import Placer
from flexmesh.policies.types import (
    GangPlacement,
    GangResult,
    MultiPlacement,
    NoFit,
    Placement,
    Request,
    describe,
)


def place_gang(
    placer: Placer,
    members: Sequence[Request],
    *,
    distinct_nodes: bool = False,
    commit: bool = True,
    exclude: frozenset[str] = frozenset(),
) -> GangResult:
    """Place every member or none, on no node in ``exclude``. With ``commit=False`` the
    cluster is left unchanged (the answer says where the gang would go)."""
    if not members:
        return NoFit("an empty gang")
    order = sorted(
        range(len(members)),
        key=lambda i: (-members[i].total_compute_milli, -members[i].cpu_milli, i),
    )
    done: dict[int, Placement | MultiPlacement] = {}
    used: set[str] = set()
    for i in order:
        req = members[i]
        res = placer.decide(req, exclude=exclude | used if distinct_nodes else exclude)
        if isinstance(res, NoFit):
            for j, got in done.items():
                placer.release(members[j], got)
            where = " on a node of its own" if distinct_nodes else ""
            return NoFit(
                f"gang member {i} ({describe(req)}) cannot be placed{where}; "
                f"nothing of the gang of {len(members)} was placed"
            )
        try:
            placer.commit(req, res)
        except ValueError as exc:  # the index contradicts itself: give back, place nothing
            for j, got in done.items():
                placer.release(members[j], got)
            return NoFit(f"gang member {i} ({describe(req)}) cannot be booked: {exc}")
        done[i] = res
        used.add(res.node)
    if not commit:
        for j, got in done.items():
            placer.release(members[j], got)
    return GangPlacement(tuple(done[i] for i in range(len(members))))
