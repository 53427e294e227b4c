"""The origin role: the jobs submitted on this node, from acceptance to their end.

The origin submits a queued job to the coordinator (again whenever the coordinator
changes and every ``submit_refresh``), places it on its own devices when no coordinator
answers, accepts the coordinator's placement, asks the owner to start it (again until the
lease would lapse), requeues it when its run was refused or preempted, and tells the owner
of a cancel until it is heard. A job that runs elsewhere is followed by ``follow``.

``jobs`` holds the user's view of every job submitted here. Where a job runs, its owner
keeps a ``RunRecord``: this node's own owner tells of a run here at once (through
``remote_update``, as ``follow`` does for a run elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flexmesh.agent.models import (
    CANCELLED,
    FAILED,
    LOST,
    PLACED,
    PREEMPTED,
    QUEUED,
    RUNNING,
    JobRecord,
)
from flexmesh.agent.node import cancels
from flexmesh.agent.node.coordinator import device_candidates
from flexmesh.agent.node.effects import ArchiveOutput, PendingCall
from flexmesh.agent.node.follow import Follow
from flexmesh.agent.node.gang import fail_queued, gang_ended, gang_env, gang_members, gang_ready
from flexmesh.policies import NoFit, Request
from flexmesh.policies.proportional import sized
from flexmesh.protocol import wire
from flexmesh.protocol.lease import Refusal

if TYPE_CHECKING:
    from flexmesh.agent.node.core import Node

CANCEL_RETRY = 2.0  # seconds between attempts to tell an owner of a cancel


@dataclass(slots=True)
class _Waiting:
    """A job that is not running yet: when to submit again, until when to ask to start."""

    next_submit: float = 0.0
    coordinator_silent_since: float | None = None
    start_deadline: float = 0.0
    start_inflight: bool = False


class Origin:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.out = node.out
        self.config = node.config
        self.jobs: dict[str, JobRecord] = {}
        self.follow: Follow = Follow(self)
        self._waiting: dict[str, _Waiting] = {}
        self._cancel_retry: dict[str, float] = {}  # job -> when to tell its owner again

    def forget(self, job_id: str) -> list[str]:
        """An ended job past its retention: the ids forgotten (a gang's members go
        together, and only once every one has ended)."""
        job = self.jobs.get(job_id)
        if job is None or not job.terminal:
            return []
        members = gang_members(self, job) if job.gang else [job]
        if not all(m.terminal for m in members):
            return []
        for m in members:
            del self.jobs[m.id]
            self._waiting.pop(m.id, None)
            self._cancel_retry.pop(m.id, None)
        return [m.id for m in members]

    def waits(self) -> bool:
        """Whether a job here waits on a timer (a submit, a start, a cancel, a follow-up)."""
        return bool(self._waiting or self._cancel_retry or self.follow.waits())

    def runs_here(self, job: JobRecord) -> bool:
        """Whether the job's current placement has started a run on this node."""
        run = self.node.owner.runs.get(job.id)
        return run is not None and bool(job.lease_id) and run.lease_id == job.lease_id

    # --- inputs -------------------------------------------------------------------------

    def submit(self, job: JobRecord, now: float) -> None:
        self.jobs[job.id] = job
        self._waiting[job.id] = _Waiting(next_submit=now)
        self._tick_waiting(now)

    def tick(self, now: float) -> None:
        self._tick_waiting(now)
        for job_id, when in list(self._cancel_retry.items()):
            job = self.jobs.get(job_id)
            if job is None or job.state not in (PLACED, RUNNING):
                del self._cancel_retry[job_id]
            elif when <= now and not self.follow.is_away(job.node):
                self._send_cancel(job, now)
        self.follow.tick(now)

    def coordinator_changed(self, now: float) -> None:
        for w in self._waiting.values():
            w.next_submit = now

    # --- restart ------------------------------------------------------------------------

    def adopt(self, jobs: list[JobRecord]) -> None:
        for job in jobs:
            self.jobs[job.id] = job

    def recover(self, now: float, output: Callable[[str], tuple[int, int]]) -> None:
        """Submit queued jobs again, follow those placed elsewhere, and end the siblings of
        a gang member that ended (or was found gone) while this node was down."""
        for job in list(self.jobs.values()):
            if job.state == QUEUED:
                self._waiting[job.id] = _Waiting(next_submit=now)
            elif job.state in (PLACED, RUNNING) and not self.runs_here(job):
                self.follow.start(job, now, output(job.id))
                if job.state == PLACED:  # starting is idempotent: ask again
                    self._waiting[job.id] = _Waiting(start_deadline=now + self.config.lease_ttl)
                if job.cancel_requested:
                    self._cancel_retry[job.id] = now
        for job in list(self.jobs.values()):
            if job.gang and job.terminal:
                gang_ended(self, job, now)
        cancels.resume(self, now)

    # --- submitting ---------------------------------------------------------------------

    def _tick_waiting(self, now: float) -> None:
        for job_id, w in list(self._waiting.items()):
            job = self.jobs.get(job_id)
            if job is not None and job.state == PLACED and not self.runs_here(job):
                self._maybe_retry_start(job, w, now)
            elif job is None or job.state != QUEUED:
                del self._waiting[job_id]
            elif now >= w.next_submit:
                self._send_submit(job, w, now)

    def _send_submit(self, job: JobRecord, w: _Waiting, now: float) -> None:
        w.next_submit = now + self.config.submit_refresh
        coordinator = self.node.belief.coordinator
        silent = w.coordinator_silent_since
        fallback = coordinator is None or (
            silent is not None and now - silent >= self.config.local_fallback_after)
        if fallback and not job.gang and self._place_locally(job, now):
            return  # (a gang needs nodes of its own: it waits for a coordinator)
        if coordinator is None:
            return
        msg = wire.Submit(job.id, self.node.name, job.compute_milli, job.memory_mib, job.kind,
                          job.priority, job.attempts, job.count, job.preemptible, job.gang,
                          job.gang_size, job.rank, job.wait_for_capacity, bool(job.image),
                          job.bundle, job.bundle_size, job.image)
        self.node.call(coordinator, msg, now)

    def on_submit_reply(self, call: PendingCall, reply: wire.Message | None, error: str,
                        now: float) -> None:
        assert isinstance(call.msg, wire.Submit)
        job_id = call.msg.job_id
        w = self._waiting.get(job_id)
        job = self.jobs.get(job_id)
        if w is None or job is None:
            return
        if isinstance(reply, wire.Placed):
            self.handle_placed(reply, now)
        elif isinstance(reply, wire.Unplaceable):
            self.unplaceable(reply, now)
        elif isinstance(reply, wire.Ok):
            w.coordinator_silent_since = None
            if reply.detail and not job.reason.startswith("requeued:"):
                job.reason = reply.detail  # why it waits, as the coordinator sees it
        else:
            if w.coordinator_silent_since is None:
                w.coordinator_silent_since = now
            w.next_submit = min(w.next_submit, now + 1.0)
            self.out.log("submit_failed", job=job_id, error=error or str(reply))

    def _place_locally(self, job: JobRecord, now: float) -> bool:
        """No coordinator answers: place on this node's own devices if the job fits."""
        me, f = self.node.membership.me, self.node.facts_of(self.node.membership.me)
        cands = device_candidates(me, f) if f.runtimes or not job.image else []  # (no runtime)
        asked = Request(job.compute_milli, job.memory_mib, job.kind, self.node.name,
                        job.priority, count=job.count)
        sizes = [(c.kind, c.model, c.compute_milli, c.memory_mib) for c in cands]
        for req in sized(asked, sizes):  # (one in proportion: per size of device here)
            result = self.node.scheduler.policy(req, cands)
            if not isinstance(result, NoFit) and result.devices:
                break
        else:
            return False
        lease = self.node.owner.lease(job.id, tuple(result.devices), req.compute_milli,
                                      req.memory_mib, self.node.leases.max_term, self.node.name,
                                      self.node.name, job.priority, job.preemptible, now,
                                      container=bool(job.image))
        if isinstance(lease, Refusal):
            return False
        self.out.log("placed_locally", job=job.id, device=",".join(lease.devices))
        self._accept_placed(wire.Placed(job.id, self.node.name, lease.device, lease.id,
                                        lease.token, lease.term, list(lease.more)), now)
        return True

    def unplaceable(self, msg: wire.Unplaceable, now: float) -> wire.Message:
        """The coordinator found that no device of the mesh could ever hold the job."""
        job = self.jobs.get(msg.job_id)
        if job is None or job.state != QUEUED or job.attempts != msg.attempt:
            return wire.Error(f"job {msg.job_id} is not queued here in attempt {msg.attempt}")
        fail_queued(self, job, msg.reason, now)
        return wire.Ok("failed")

    # --- placed and started -------------------------------------------------------------

    def handle_placed(self, msg: wire.Placed, now: float) -> wire.Message:
        job = self.jobs.get(msg.job_id)
        if job is None:
            return wire.Error(f"unknown job {msg.job_id}")
        if job.state == PLACED and job.lease_id == msg.lease_id:
            return wire.Ok("already placed")
        if job.state != QUEUED:
            return wire.Error(f"job {msg.job_id} is {job.state}")
        if 1 + len(msg.more) != job.count:
            # A coordinator of an older version placed fewer devices than asked for.
            job.reason = (f"waiting: placed on {1 + len(msg.more)} device(s) by "
                          f"{self.node.belief.coordinator}, {job.count} asked")
            return wire.Error(f"job {msg.job_id} asks for {job.count} device(s)")
        self._accept_placed(msg, now)
        return wire.Ok("placed")

    def _accept_placed(self, msg: wire.Placed, now: float) -> None:
        job = self.jobs[msg.job_id]
        job.state, job.node, job.devices = PLACED, msg.node, (msg.device, *msg.more)
        job.lease_id, job.token, job.term = msg.lease_id, msg.token, msg.term
        job.reason, job.updated_at = "", now
        self.node.persist(job)
        self.out.log("job_placed", job=job.id, node=msg.node, device=",".join(job.devices))
        w = self._waiting.setdefault(job.id, _Waiting())
        w.start_deadline = now + self.config.lease_ttl
        if not job.gang:
            self._send_start(job, now)
        elif gang_ready(self, job):
            for m in gang_members(self, job):  # the last is placed: every member starts
                if m.state == PLACED:
                    self._send_start(m, now)

    def _send_start(self, job: JobRecord, now: float) -> None:
        # The user's variables, none of flexmesh's own names (the owner sets those; the
        # gang's are set here)
        env = {k: v for k, v in job.env.items() if not k.startswith("FLEXMESH_")}
        if job.gang:
            env.update(gang_env(self, job))
        msg = wire.StartJob(job.id, job.lease_id, job.token, self.node.name, job.command, env,
                            job.compute_milli, job.memory_mib, job.bundle, job.bundle_size,
                            job.image, job.image_network)
        w = self._waiting.get(job.id)
        if w is not None:
            w.start_inflight = True
        self.node.call(job.node, msg, now)

    def on_start_reply(self, call: PendingCall, reply: wire.Message | None, error: str,
                       now: float) -> None:
        assert isinstance(call.msg, wire.StartJob)
        job = self.jobs.get(call.msg.job_id)
        w = self._waiting.get(call.msg.job_id)
        if w is not None:
            w.start_inflight = False
        if job is None or job.state != PLACED or job.lease_id != call.msg.lease_id:
            return
        if isinstance(reply, wire.Ok):
            self._waiting.pop(job.id, None)
            if not self.runs_here(job):
                self.follow.start(job, now)
        elif isinstance(reply, wire.Error):
            why = f"owner {job.node} refused to start: {reply.reason}"
            if job.gang:  # its siblings may run already: the gang ends (see gang_ended)
                self.end(job, FAILED, why, now)
            else:
                self.requeue(job, why, now)
        # No reply at all: _tick_waiting retries until the lease would have expired.

    def _maybe_retry_start(self, job: JobRecord, w: _Waiting, now: float) -> None:
        if w.start_inflight:
            return
        gang_waits = bool(job.gang) and not gang_ready(self, job)
        if now >= w.start_deadline:
            why = f"owner {job.node} did not answer before the lease expired"
            if job.gang and not gang_waits and not job.cancel_requested:
                # a start was sent: it may run there, unheard; told to stop, once
                self.node.call(job.node, wire.Cancel(job.id, why), now)
                self.end(job, LOST, why, now)
            else:
                self.requeue(job, why, now)
        elif not job.cancel_requested and not gang_waits:
            # (cancelled: let the reservation lapse; a gang member whose siblings are not
            # all placed yet: starts with them)
            self._send_start(job, now)

    # --- endings ------------------------------------------------------------------------

    def end(self, job: JobRecord, state: str, reason: str, now: float) -> None:
        """A job ends here without (more) word from its owner."""
        job.state, job.reason, job.updated_at = state, reason, now
        self._waiting.pop(job.id, None)
        self.node.persist(job)
        self.out.log("job_end", job=job.id, state=state, reason=reason)
        gang_ended(self, job, now)

    def requeue(self, job: JobRecord, reason: str, now: float) -> None:
        if job.cancel_requested:  # it ended there before the cancel arrived: done
            job.state, job.updated_at = CANCELLED, now
            job.reason = job.reason or "cancelled by user"
            self.node.persist(job)
            self._waiting.pop(job.id, None)
            gang_ended(self, job, now)
            return
        self.out.log("job_requeued", job=job.id, reason=reason)
        if job.attempts or job.state in (RUNNING, PLACED):
            self.out.emit(ArchiveOutput(job.id))
        job.state, job.node, job.devices, job.lease_id, job.token = QUEUED, "", (), "", 0
        job.exit_code = None
        job.attempts += 1
        job.reason, job.updated_at = f"requeued: {reason}", now
        self.node.persist(job)
        self._waiting[job.id] = _Waiting(next_submit=now)

    # --- cancel -------------------------------------------------------------------------

    def cancel(self, job_id: str, now: float, reason: str) -> str:
        job = self.jobs.get(job_id)
        if job is None:
            return "unknown"
        if job.terminal:
            return job.state
        if job.state == QUEUED:
            coordinator = self.node.belief.coordinator
            if coordinator:
                self.node.call(coordinator, wire.Withdraw(job_id), now)
            self.end(job, CANCELLED, reason, now)
            return CANCELLED
        if job.gang and job.state == PLACED and not gang_ready(self, job):
            # placed, but never started (its gang is not all placed): nothing runs; the
            # lease its owner reserved is given back
            self.node.call(job.node, wire.Release(job.id, job.lease_id, job.token), now)
            self.end(job, CANCELLED, reason, now)
            return CANCELLED
        if self.runs_here(job):
            cancels.remember(self, job, reason)  # (a restart before it ends stops it again)
            self.node.owner.stop_job(job.id, reason, CANCELLED, now)
            return "cancelling"
        # Told to the owner until it answers: a cancel is never lost to a failed call or
        # an owner that is away for a while.
        job.cancel_requested = True
        job.reason = reason
        self.node.persist(job)
        self._send_cancel(job, now)
        return "cancelling"

    def _send_cancel(self, job: JobRecord, now: float) -> None:
        self._cancel_retry.pop(job.id, None)
        self.node.call(job.node, wire.Cancel(job.id, job.reason or "cancelled by user"), now)

    def on_cancel_reply(self, call: PendingCall, reply: wire.Message | None, error: str,
                        now: float) -> None:
        job = self.jobs.get(call.msg.job_id) if isinstance(call.msg, wire.Cancel) else None
        if job is None or job.terminal or not job.cancel_requested or job.node != call.node:
            return
        if isinstance(reply, wire.Error) and job.state == RUNNING:
            # The owner answered and runs no such job (it lost it): nothing to stop.
            self.end(job, CANCELLED, f"{job.reason or 'cancelled by user'} "
                                     f"({call.node}: {reply.reason})", now)
        elif not isinstance(reply, wire.Ok):
            self.out.log("cancel_retry", job=job.id, node=call.node,
                         error=reply.reason if isinstance(reply, wire.Error) else error)
            self._cancel_retry[job.id] = now + CANCEL_RETRY

    def retry_cancel(self, job: JobRecord, now: float) -> None:
        if job.cancel_requested:
            self._cancel_retry[job.id] = now

    def remote_update(self, job: JobRecord, state: str, reason: str, exit_code: int | None,
                      now: float) -> None:
        """What the owner reported about a job it runs for this origin."""
        if job.terminal or state == job.state or state in (QUEUED, ""):
            return
        if job.state not in (PLACED, RUNNING):
            return  # a late report about a placement this job has left (requeued since)
        if state == PREEMPTED and job.requeue and not job.gang:
            self.requeue(job, f"preempted on {job.node}/{','.join(job.devices)}: {reason}",
                         now)
            return
        job.state, job.reason, job.exit_code, job.updated_at = state, reason, exit_code, now
        self.node.persist(job)
        gang_ended(self, job, now)
