"""The origin's view of a gang: its members (one job per rank, submitted together), when
they may start (all placed), what each is told of the others, and how they end (together:
a member that does not succeed takes its siblings with it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexmesh.agent.models import FAILED, PLACED, QUEUED, RUNNING, SUCCEEDED, JobRecord, member_id

if TYPE_CHECKING:
    from flexmesh.agent.node.origin import Origin


def gang_members(origin: Origin, job: JobRecord) -> list[JobRecord]:
    """Every member of ``job``'s gang known here, by rank."""
    found = (origin.jobs.get(member_id(job.gang, r)) for r in range(job.gang_size))
    return [j for j in found if j is not None and j.gang == job.gang]


def gang_ready(origin: Origin, job: JobRecord) -> bool:
    """Whether every member of the gang has its placement (and none has ended): then, and
    only then, the members are started."""
    members = gang_members(origin, job)
    return len(members) == job.gang_size and all(m.state in (PLACED, RUNNING)
                                                 for m in members)


def gang_env(origin: Origin, job: JobRecord) -> dict[str, str]:
    """What a gang member's process is told of its gang: where each rank runs."""
    members = gang_members(origin, job)
    addrs = []
    for m in members:
        member = origin.node.membership.members.get(m.node)
        host = member.addr.rsplit(":", 1)[0] if member is not None else ""
        addrs.append(host.strip("[]"))
    return {
        "FLEXMESH_GANG": job.gang,
        "FLEXMESH_GANG_RANK": str(job.rank),
        "FLEXMESH_GANG_SIZE": str(job.gang_size),
        "FLEXMESH_GANG_NODES": ",".join(m.node for m in members),
        "FLEXMESH_GANG_ADDRS": ",".join(addrs),
    }


def gang_ended(origin: Origin, job: JobRecord, now: float) -> None:
    """A gang member ended: if it did not succeed, its siblings are cancelled (a gang runs
    all together or not at all)."""
    if not job.gang or job.state == SUCCEEDED or not job.terminal:
        return
    for m in gang_members(origin, job):
        if m.id != job.id and not m.terminal:
            origin.out.log("gang_stop", job=m.id, because=job.id)
            origin.cancel(m.id, now, f"gang member {job.id} {job.state}: {job.reason}")


def fail_queued(origin: Origin, job: JobRecord, reason: str, now: float) -> None:
    """``job`` can never be placed: it fails, and so does every member of its gang still
    queued, each with that reason (none is merely cancelled for a sibling's failure)."""
    members = [m for m in gang_members(origin, job) if m.state == QUEUED] if job.gang else [job]
    for m in members:
        m.state = FAILED  # all first: ``gang_ended`` then finds no sibling left to cancel
    for m in members:
        origin.end(m, FAILED, reason, now)
