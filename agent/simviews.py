"""Part of ``Simulator``: what the world looks like now, for tests and chaos runs (which
nodes are up, the connected groups under the cuts, whether a group converged, which
submitted jobs ended)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexmesh.agent.models import TERMINAL, JobRecord

if TYPE_CHECKING:
    from flexmesh.agent.simulator import _SimNode


class SimViews:
    nodes: dict[str, _SimNode]
    submitted: set[str]

    if TYPE_CHECKING:  # provided by ``Simulator``, which this is mixed into
        def reachable(self, a: str, b: str) -> bool: ...

    def job(self, job_id: str) -> JobRecord | None:
        """The origin's record of a job."""
        for sim in self.nodes.values():
            job = sim.node.origin.jobs.get(job_id)
            if job is not None:
                return job
        return None

    def up_nodes(self) -> list[str]:
        return [n for n, s in self.nodes.items() if s.up]

    def groups(self) -> list[set[str]]:
        """Connected groups of up nodes under the current cuts."""
        left = set(self.up_nodes())
        out = []
        while left:
            start = left.pop()
            group, todo = {start}, [start]
            while todo:
                a = todo.pop()
                for b in list(left):
                    if self.reachable(a, b):
                        left.discard(b)
                        group.add(b)
                        todo.append(b)
            out.append(group)
        return out

    def converged(self, group: set[str]) -> bool:
        """Every node in ``group`` sees exactly the group alive, nobody suspect, and agrees
        on one coordinator, which has heard every member answer a probe (so it may place
        on all of them)."""
        beliefs = set()
        for n in group:
            node = self.nodes[n].node
            members = node.membership.members.values()
            alive = {m.name for m in members if m.state == "alive"}
            if alive != group or any(m.state == "suspect" for m in members):
                return False
            beliefs.add(node.belief)
        if len(beliefs) != 1 or not all(b.coordinator and b.term for b in beliefs):
            return False
        coordinator = self.nodes[next(iter(beliefs)).coordinator or ""].node
        return all(coordinator.membership.members[n].confirmed for n in group)

    def terminal_jobs(self) -> dict[str, str]:
        out = {}
        for job_id in self.submitted:
            job = self.job(job_id)
            if job is not None and job.state in TERMINAL:
                out[job_id] = job.state
        return out
