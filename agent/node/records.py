"""What a node journals of its jobs and leases, and for how long.

Every job record a node writes goes through ``persist``: its role is set from which of
the node's roles keep it, its state change is checked against ``models.TRANSITIONS``
(counted and logged if the table does not allow it: the simulator fails on it), and an
ended job starts its retention. ``forget_finished`` drops ended jobs and finished leases
past their retention from memory and the journal.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from flexmesh.agent.models import JobRecord, may_become
from flexmesh.agent.node.effects import ForgetJob, ForgetLease, PersistJob
from flexmesh.agent.node.retention import Retention
from flexmesh.protocol.lease import ACTIVE

if TYPE_CHECKING:
    from flexmesh.agent.node.core import Node


class Records:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.out = node.out
        keep, keep_for = node.config.keep_finished, node.config.keep_finished_for
        self.kept_jobs = Retention(keep, keep_for)
        self.kept_leases = Retention(keep, keep_for)
        self._journaled: dict[str, tuple[str, int]] = {}  # job -> (state, attempts) on disk

    def persist(self, job: JobRecord, now: float) -> None:
        mine = self.node.origin.jobs.get(job.id) is job
        runs = self.node.owner.runs.get(job.id) is job
        job.role = "both" if mine and runs else "owner" if runs else "origin"
        self._check_transition(job)
        if job.terminal:
            self.kept_jobs.ended(job.id, now)
        else:
            self.kept_jobs.revived(job.id)
        self.out.emit(PersistJob(replace(job)))

    def _check_transition(self, job: JobRecord) -> None:
        before = self._journaled.get(job.id)
        self._journaled[job.id] = (job.state, job.attempts)
        if before is not None and not may_become(*before, job.state, job.attempts):
            self.out.count("job_state_invalid")
            self.out.log("job_state_invalid", job=job.id, before=before[0], after=job.state)

    def _forgotten(self, job_id: str) -> None:
        if self._journaled.pop(job_id, None) is not None:
            self.out.emit(ForgetJob(job_id))

    def read_back(self, jobs: list[JobRecord], now: float) -> None:
        """The journal's jobs after a restart; those that ended are kept from now on for
        as long as a job that just ended."""
        for job in jobs:
            self._journaled[job.id] = (job.state, job.attempts)
            if job.terminal:
                self.kept_jobs.ended(job.id, now)

    def forget_finished(self, now: float) -> None:
        """Drop ended jobs and finished leases past their retention, here and on disk. A
        run whose origin has not heard of its end yet is kept until its age runs out; a
        gang's members go together, once all have ended."""
        node = self.node
        for job_id in self.kept_jobs.due(now, held=node.owner.uncollected):
            for gone in node.origin.forget(job_id):
                self.kept_jobs.revived(gone)  # (a sibling: not counted any more)
                node.owner.forget(gone)
                if gone not in node.owner.runs:
                    self._forgotten(gone)
            node.owner.forget(job_id)
            if job_id not in node.origin.jobs and job_id not in node.owner.runs:
                self._forgotten(job_id)
        leases = node.leases.leases
        for held in leases.values():
            if held.state not in ACTIVE:
                self.kept_leases.ended(held.id, now)
        for lease_id in self.kept_leases.due(now):
            lease = leases.get(lease_id)
            if lease is not None and lease.state not in ACTIVE:
                del leases[lease_id]
                self.out.emit(ForgetLease(lease_id))
