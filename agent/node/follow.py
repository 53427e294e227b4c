"""The origin following its jobs that run on other nodes: state and output, sans-IO.

For each such job the origin keeps one ``JobSync`` call out to the owner at a time, asking
for the output from what it already has. The owner holds the call open until there is
output or news (a long poll), so the next call goes out as soon as an answer is in. Output
is handed to the runtime as ``JobOutput`` effects, to be written at the offsets they name:
a repeated or late answer writes nothing new, and a lost one is asked again. A terminal
state is taken only from an answer that carries no more output, so everything the job
wrote is on disk here before its end is.

An owner that left the mesh (a restart, an upgrade) keeps running its jobs: they are
followed again when it is back, and lost only if it stays away beyond
``owner_away_limit``. An owner declared dead may only be out of reach (a radio shadow, a
partition): its jobs are followed again if it is back within ``owner_dead_grace``, their
output continuing where it stopped; after that they are requeued (lost if they may not
be). An owner cut off from an origin stops that origin's runs sooner (``orphans``), so the
job does not run twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flexmesh.agent.models import LOST, PLACED, RUNNING, STATES, JobRecord
from flexmesh.agent.node import results
from flexmesh.agent.node.effects import JobOutput, PendingCall
from flexmesh.agent.node.gang import gang_ended
from flexmesh.protocol import wire
from flexmesh.protocol.membership import ALIVE, DEAD, LEFT

if TYPE_CHECKING:
    from flexmesh.agent.node.origin import Origin

SYNC_WAIT_MS = 1000  # how long the owner may hold a JobSync open
SYNC_CHUNK = 256 * 1024  # bytes of output an answer carries at most, per stream
RETRY_MIN, RETRY_MAX = 0.2, 2.0  # seconds between attempts after a failed call
MAX_REASON = 4096  # characters of an owner's reason for a job's state taken at most


@dataclass(slots=True)
class _Away:
    since: float
    limit: float  # seconds until its jobs are given up
    state: str  # LEFT or DEAD


@dataclass(slots=True)
class _Followed:
    node: str
    lease_id: str
    stdout: int = 0  # bytes of output already here
    stderr: int = 0
    inflight: bool = False
    next_at: float = 0.0
    failures: int = 0


class Follow:
    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.node = origin.node
        self.out = origin.out
        self._jobs: dict[str, _Followed] = {}
        self._away: dict[str, _Away] = {}  # owners out of reach

    def following(self) -> dict[str, tuple[str, str]]:
        """Job -> (owner, lease) of each job followed now."""
        return {j: (f.node, f.lease_id) for j, f in self._jobs.items()}

    def waits(self) -> bool:
        return bool(self._away) or any(not f.inflight for f in self._jobs.values())

    def is_away(self, node: str) -> bool:
        return node in self._away

    def start(self, job: JobRecord, now: float, offsets: tuple[int, int] = (0, 0)) -> None:
        """Follow ``job``'s current placement (once: a second start changes nothing)."""
        f = self._jobs.get(job.id)
        if f is not None and f.lease_id == job.lease_id and f.node == job.node:
            return
        self._jobs[job.id] = _Followed(job.node, job.lease_id, *offsets, next_at=now)
        self._ask(job.id, now)

    def tick(self, now: float) -> None:
        for node, away in list(self._away.items()):
            if now - away.since >= away.limit:
                del self._away[node]
                self._give_up_on(node, away, now)
        for job_id, f in list(self._jobs.items()):
            gone = self._gone(f.node)
            if gone and f.node not in self._away:
                self.owner_gone(f.node, gone, now)  # (e.g. not heard of since a restart)
            if not f.inflight and now >= f.next_at and f.node not in self._away:
                self._ask(job_id, now)

    def _current(self, job_id: str) -> tuple[JobRecord, _Followed] | None:
        """The job and what is followed of it, while it is still worth following."""
        f = self._jobs.get(job_id)
        job = self.origin.jobs.get(job_id)
        if f is None:
            return None
        if (job is None or job.state not in (PLACED, RUNNING) or job.lease_id != f.lease_id
                or job.node != f.node):
            del self._jobs[job_id]  # ended, or requeued and placed anew (followed anew)
            return None
        return job, f

    def _ask(self, job_id: str, now: float) -> None:
        cur = self._current(job_id)
        if cur is None:
            return
        f = cur[1]
        f.inflight = True
        self.node.call(f.node, wire.JobSync(job_id, f.stdout, f.stderr, SYNC_WAIT_MS), now,
                       lease_id=f.lease_id)

    def on_sync_reply(self, call: PendingCall, reply: wire.Message | None, error: str,
                      now: float) -> None:
        msg = call.msg
        assert isinstance(msg, wire.JobSync)
        cur = self._current(msg.job_id)
        if cur is None:
            return
        job, f = cur
        if ((call.node, call.lease_id, msg.stdout_offset, msg.stderr_offset)
                != (f.node, f.lease_id, f.stdout, f.stderr)):
            return  # an answer to an earlier ask, or about an earlier placement
        f.inflight = False
        if not isinstance(reply, wire.JobSyncReply):
            f.failures += 1
            f.next_at = now + min(RETRY_MIN * 2 ** f.failures, RETRY_MAX)
            if reply is not None:  # (no answer at all: the owner may be away for a while)
                why = reply.reason if isinstance(reply, wire.Error) else type(reply).__name__
                self.out.log("follow_failed", job=job.id, node=f.node, error=why)
            return
        if (len(reply.stdout) > SYNC_CHUNK or len(reply.stderr) > SYNC_CHUNK
                or reply.state not in STATES or len(reply.reason) > MAX_REASON):
            self.out.count("job_sync_invalid")  # not an answer this origin can take
            self.out.log("follow_failed", job=job.id, node=f.node,
                         error=f"invalid answer (state {reply.state[:40]!r})")
            f.failures += 1
            f.next_at = now + RETRY_MAX
            return
        f.failures = 0
        for stream, data in (("stdout", reply.stdout), ("stderr", reply.stderr)):
            if data:
                offset = f.stdout if stream == "stdout" else f.stderr
                self.out.emit(JobOutput(job.id, stream, offset, data))
        f.stdout += len(reply.stdout)
        f.stderr += len(reply.stderr)
        # A terminal state only once all output is here: the next answer comes at once.
        if not (reply.stdout or reply.stderr) or reply.state in (PLACED, RUNNING):
            results.learned(self.origin, job, f.node, reply)  # (before a requeue)
            self.origin.remote_update(job, reply.state, reply.reason, reply.exit_code, now)
        self._ask(job.id, now)

    def output_failed(self, job_id: str, stream: str, offset: int, now: float) -> None:
        """Output given as ``JobOutput`` at ``offset`` could not be written here (a full
        disk): ask for it again from there, after a pause."""
        f = self._jobs.get(job_id)
        if f is None:
            return
        if stream == "stdout":
            f.stdout = min(f.stdout, offset)
        else:
            f.stderr = min(f.stderr, offset)
        # The ask in flight names the old offsets: its answer is ignored when it comes.
        f.inflight = False
        f.failures += 1
        f.next_at = now + RETRY_MAX
        self.out.count("job_output_unwritten")

    # --- owners that leave, come back or die --------------------------------------------

    def _followed_on(self, node: str) -> list[JobRecord]:
        return [j for j in self.origin.jobs.values()
                if j.node == node and j.state in (PLACED, RUNNING)
                and not self.origin.runs_here(j)]

    def member(self, node: str, state: str, now: float) -> None:
        """A member's new state: an owner of jobs followed here may be gone or back."""
        if state in (DEAD, LEFT):
            self.owner_gone(node, state, now)
        elif state == ALIVE:
            self.owner_back(node, now)

    def _gone(self, node: str) -> str:
        """DEAD or LEFT for a member out of reach (or not known: as dead), else ""."""
        m = self.node.membership.members.get(node)
        if m is None:
            return DEAD
        return m.state if m.state in (DEAD, LEFT) else ""

    def owner_gone(self, node: str, state: str, now: float) -> None:
        """The owner of some of our jobs left the mesh or was declared dead: its jobs may
        go on there, and are followed again when it is back, until a limit."""
        jobs = self._followed_on(node)
        if not jobs:
            return
        config = self.node.config
        limit = config.owner_away_limit if state == LEFT else config.owner_dead_grace
        earlier = self._away.get(node)
        if earlier is not None and earlier.since + earlier.limit <= now + limit:
            return  # already away, with no more time left than this would give
        self._away[node] = _Away(now, limit, state)
        what = "left the mesh" if state == LEFT else "is out of reach (declared dead)"
        for job in jobs:
            then = ("requeued" if state == DEAD and job.requeue and not job.gang
                    else "lost")
            job.reason = (f"owner {node} {what}; the job may go on there, and is followed "
                          f"again if {node} is back within {limit:g} s, else {then}")
            self.node.persist(job)

    def owner_back(self, node: str, now: float) -> None:
        if self._away.pop(node, None) is None:
            return
        for job in self._followed_on(node):
            job.reason = ""
            self.node.persist(job)
            self.origin.retry_cancel(job, now)
            f = self._jobs.get(job.id)
            if f is None:
                self.start(job, now)
            elif not f.inflight:
                f.next_at = now
                self._ask(job.id, now)

    def _give_up_on(self, node: str, away: _Away, now: float) -> None:
        if away.state == LEFT:
            why = f"owner {node} left the mesh and was not back within {away.limit:g} s"
        else:
            why = f"owner {node} was out of reach for {away.limit:g} s"
        for job in self._followed_on(node):
            self.out.log("job_given_up", job=job.id, node=node, reason=why)
            results.owner_lost(job, why)
            if away.state == DEAD and job.requeue and not job.gang:
                self.origin.requeue(job, why, now)
                continue
            job.state, job.reason = LOST, why
            self.node.persist(job)
            gang_ended(self.origin, job, now)
