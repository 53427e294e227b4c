"""An owner's runs whose origin has stopped following them.

An origin follows each job it placed elsewhere with ``JobSync`` calls, one after the
other. An owner that hears none for a run in ``orphan_limit`` seconds is cut off from that
origin (a partition, a radio shadow, an origin that died), and the origin, if it is alive,
requeues the job elsewhere once its ``owner_dead_grace`` runs out. So the owner stops the
run first: it ends ``preempted`` with the reason, and an origin that is back in between
hears so and requeues the job itself. Either way the job does not run twice at once. The
clock is the origin's word, not membership: a node cut off from everyone declares others
dead much later than they declare it (its suspicions get no confirmations). An origin that
left the mesh (a restart, an upgrade) follows its jobs again when back: it is waited for
as long as an origin waits for an owner that left (``owner_away_limit``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexmesh.agent.models import PREEMPTED
from flexmesh.protocol.membership import LEFT

if TYPE_CHECKING:
    from flexmesh.agent.node.owner import Owner


class Orphans:
    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self._heard: dict[str, float] = {}  # run for another origin -> its origin's last word

    def heard(self, job_id: str, origin: str, now: float) -> None:
        """The origin of a run here asked after it (or started it)."""
        if origin != self.owner.node.name:
            self._heard[job_id] = now

    def waits(self) -> bool:
        return bool(self._heard)

    def tick(self, now: float) -> None:
        node, stopping = self.owner.node, self.owner.stopping()
        for job_id, when in list(self._heard.items()):
            run = self.owner.runs.get(job_id)
            if run is None or run.terminal:
                del self._heard[job_id]
                continue
            origin = node.membership.members.get(run.origin)
            left = origin is not None and origin.state == LEFT
            limit = node.config.owner_away_limit if left else node.config.orphan_limit
            if now - when < limit or job_id in stopping:
                continue
            del self._heard[job_id]
            self.owner.out.count("orphans_stopped")
            self.owner.stop_job(job_id, f"stopped by {node.name}: its origin {run.origin} "
                                        f"did not ask after it for {limit:g} s", PREEMPTED, now)
