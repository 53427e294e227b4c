"""What a node journals of its jobs, runs and leases, and for how long.

Every record a node writes goes through here: a job (the origin's) through ``persist``, a
run (an owner's) through ``persist_run``. Its state change is checked against
``models.TRANSITIONS`` (counted and logged if the table does not allow it: the simulator
fails on it), and an ended record starts its retention. ``forget_finished`` drops ended
jobs, runs and finished leases past their retention from memory and the journal.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from flexmesh.agent.models import JobRecord, RunRecord, may_become
from flexmesh.agent.node import results
from flexmesh.agent.node.effects import ForgetJob, ForgetLease, ForgetRun, PersistJob, PersistRun
from flexmesh.agent.node.retention import Retention
from flexmesh.protocol.lease import ACTIVE

if TYPE_CHECKING:
    from flexmesh.agent.node.core import Node

JOB, RUN = "job", "run"


class Records:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.out = node.out
        keep, keep_for = node.config.keep_finished, node.config.keep_finished_for
        self.kept_jobs = Retention(keep, keep_for)
        self.kept_runs = Retention(keep, keep_for)
        self.kept_leases = Retention(keep, keep_for)
        # (JOB or RUN, id) -> (state, attempts) as on disk
        self._journaled: dict[tuple[str, str], tuple[str, int]] = {}

    def persist(self, job: JobRecord, now: float) -> None:
        self._written(JOB, job, self.kept_jobs, now)
        self.out.emit(PersistJob(replace(job)))

    def persist_run(self, run: RunRecord, now: float) -> None:
        self._written(RUN, run, self.kept_runs, now)
        self.out.emit(PersistRun(replace(run)))

    def _written(self, kind: str, record: JobRecord | RunRecord, kept: Retention,
                 now: float) -> None:
        before = self._journaled.get((kind, record.id))
        self._journaled[kind, record.id] = (record.state, record.attempts)
        if before is not None and not may_become(*before, record.state, record.attempts):
            self.out.count("job_state_invalid")
            self.out.log("job_state_invalid", job=record.id, record=kind, before=before[0],
                         after=record.state)
        if record.terminal:
            kept.ended(record.id, now)
        else:
            kept.revived(record.id)

    def read_back(self, jobs: list[JobRecord], runs: list[RunRecord], now: float) -> None:
        """The journal's records after a restart; those that ended are kept from now on
        for as long as one that just ended."""
        for kind, records, kept in ((JOB, jobs, self.kept_jobs), (RUN, runs, self.kept_runs)):
            for record in records:
                self._journaled[kind, record.id] = (record.state, record.attempts)
                if record.terminal:
                    kept.ended(record.id, now)

    def forget_finished(self, now: float) -> None:
        """Drop ended jobs, runs and finished leases past their retention, here and on
        disk. A run whose origin has not heard of its end yet (or not fetched its results)
        is kept until its age runs out; a gang's members go together, once all have ended."""
        node = self.node
        for job_id in self.kept_jobs.due(now):
            for gone in node.origin.forget(job_id):
                self.kept_jobs.revived(gone)  # (a sibling: not counted any more)
                if self._journaled.pop((JOB, gone), None) is not None:
                    self.out.emit(ForgetJob(gone))
        for job_id in self.kept_runs.due(
                now, held=lambda j: node.owner.uncollected(j) or results.held(node, j)):
            if node.owner.forget(job_id) and (RUN, job_id) in self._journaled:
                del self._journaled[RUN, job_id]
                self.out.emit(ForgetRun(job_id))
        leases = node.leases.leases
        for held in leases.values():
            if held.state not in ACTIVE:
                self.kept_leases.ended(held.id, now)
        for lease_id in self.kept_leases.due(now):
            lease = leases.get(lease_id)
            if lease is not None and lease.state not in ACTIVE:
                del leases[lease_id]
                self.out.emit(ForgetLease(lease_id))
