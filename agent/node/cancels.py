"""A cancel of a job that runs on the node it was submitted on, kept across a restart.

Such a cancel needs no call: the owner stops the run at once. But the stop takes up to
``stop_grace`` (a job that ignores SIGTERM, all of it), and an agent killed in between
adopts the run back after its restart. So the cancel is journaled with the job
(``cancel_requested``, as for a job that runs elsewhere), and a run adopted back whose job
was cancelled is stopped again, rather than run on to be reported succeeded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexmesh.agent.models import CANCELLED, JobRecord

if TYPE_CHECKING:
    from flexmesh.agent.node.origin import Origin

DEFAULT_REASON = "cancelled by user"


def remember(origin: Origin, job: JobRecord, reason: str) -> None:
    """Journal that the user cancelled ``job``, which runs here, before it is stopped."""
    job.cancel_requested = True
    job.reason = reason
    origin.node.persist(job)


def resume(origin: Origin, now: float) -> None:
    """After a restart: stop again the runs here whose job was cancelled (their process was
    adopted back; one that was not has ended ``lost`` and needs no stop)."""
    for job in list(origin.jobs.values()):
        if job.cancel_requested and not job.terminal and origin.runs_here(job):
            origin.node.owner.stop_job(job.id, job.reason or DEFAULT_REASON, CANCELLED, now)
