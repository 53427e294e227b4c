"""The owner role: this node's devices, the leases on them and the jobs it runs.

An owner is the authority over its own devices: it grants a lease only if the fraction is
free on its own books (``protocol.lease``), starts a job only for a current lease's holder,
takes fractions back when its own workload grows (reclaim) or a coordinator asks for room
(preemption), and tells a job's origin what became of it (``JobSync``). Every node is one.

``runs`` holds the runs of jobs on this node's devices, whoever submitted them. A job
submitted here hears of its run at once (``_tell_origin``); other origins follow theirs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from flexmesh.agent.devices import vnpu
from flexmesh.agent.devices.base import Device
from flexmesh.agent.models import (
    CANCELLED,
    FAILED,
    LOST,
    PLACED,
    PREEMPTED,
    RUNNING,
    SUCCEEDED,
    RunRecord,
    job_id_problem,
)
from flexmesh.agent.node.effects import PersistLease, RunJob, StopJob
from flexmesh.agent.node.orphans import Orphans
from flexmesh.agent.node.results import carried
from flexmesh.protocol import facts, wire
from flexmesh.protocol.election import TERM_STEP, plausible_term
from flexmesh.protocol.lease import ACTIVE, RESERVED, Lease, Refusal

if TYPE_CHECKING:
    from flexmesh.agent.node.core import Node

MAX_OFFSET = 2**62  # an output offset beyond any file (and within what a seek takes)


class Owner:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.out = node.out
        self.leases = node.leases
        self.devices: dict[str, Device] = {}
        self.runs: dict[str, RunRecord] = {}
        self._stopping: dict[str, StopJob] = {}
        # Processes started (RunJob given) and not yet seen to exit, by job -> lease: one
        # job never has two, even when a run stopped while starting is placed here again.
        self._live: dict[str, str] = {}
        # Ended runs whose origin has been told of their end (a complete JobSync answer):
        # only these may be forgotten before their age runs out.
        self._collected: set[str] = set()
        self.orphans = Orphans(self)

    # --- devices ------------------------------------------------------------------------

    def set_devices(self, devices: list[Device], lendable: dict[str, tuple[int, int]],
                    now: float) -> None:
        known = set(self.devices)
        self.devices = {d.id: d for d in devices}
        for d in devices:
            lend_c, lend_m = lendable.get(d.id, (d.compute_milli, d.memory_mib))
            if not d.healthy:
                # Lend nothing more, but do not take back what runs: a failing reading is
                # not a reason to kill jobs (a device that is gone is, below).
                lend_c, lend_m = self.leases.used(d.id)
            self.leases.set_device(d.id, d.compute_milli, d.memory_mib, lend_c, lend_m)
        for gone in known - set(self.devices):
            for lease in self.leases.remove_device(gone):
                self.out.emit(PersistLease(lease))
                self.stop_job(lease.job_id, f"device {gone} is gone", LOST, now)
        for d in devices:
            self._reclaim(d.id, now)

    def device_facts(self, enforcement: str) -> tuple[facts.DeviceFact, ...]:
        out = []
        for d in self.devices.values():
            used_c, used_m = self.leases.used(d.id)
            free_c, free_m = self.leases.free(d.id)
            out.append(facts.DeviceFact(d.id, d.kind, d.model, d.memory_mib, d.compute_milli,
                                        used_c, used_m, free_c, free_m, d.backend, d.healthy,
                                        vnpu.device_enforcement(d, enforcement,
                                                                bool(self.node.runtimes))))
        return tuple(out)

    def preemptible_facts(self) -> tuple[facts.PreemptibleFact, ...]:
        """Jobs a higher-priority request may preempt here, cheapest first (lowest
        priority, then least device share, then newest)."""
        pre = sorted((x for x in self.leases.active()
                      if x.preemptible and x.job_id not in self._stopping),
                     key=lambda x: (x.priority, x.compute_milli * len(x.devices), -x.token),
                     )[:facts.MAX_PREEMPTIBLE]
        return tuple(facts.PreemptibleFact(x.job_id, x.devices, x.compute_milli, x.memory_mib,
                                           x.priority) for x in pre)

    def _reclaim(self, device: str, now: float) -> None:
        """The owner's own use grew into what was lent: take fractions back. Victims are
        the lowest-priority, then newest, jobs on the device, until what stays leased fits
        what the owner can lend now. Reserved leases whose job has not started go first."""
        lend_c, lend_m = self.leases.lendable(device)
        used_c, used_m = self.leases.used(device, excluding=set(self._stopping))
        if used_c <= lend_c and used_m <= lend_m:
            return
        active = [x for x in self.leases.active() if x.holds(device)
                  and x.job_id not in self._stopping]
        active.sort(key=lambda x: (x.state != RESERVED, x.priority, -x.created))
        for lease in active:
            if used_c <= lend_c and used_m <= lend_m:
                break
            used_c -= lease.compute_milli
            used_m -= lease.memory_mib
            self.out.count("reclaims")
            self.take_back(lease, f"reclaimed by {self.node.name}: its own workload needs "
                                   f"{device}", now)

    def take_back(self, lease: Lease, reason: str, now: float) -> None:
        """End a lease before its job is done; a running job is preempted."""
        if lease.job_id in self.runs:
            self.stop_job(lease.job_id, reason, PREEMPTED, now)
        else:  # reserved, its job not started here: nothing runs on it yet
            self.leases.release(lease.id)
            self.out.emit(PersistLease(lease))
            self.out.log("lease_reclaimed", lease=lease.id, job=lease.job_id)
            self.node.publish_facts()

    # --- leases -------------------------------------------------------------------------

    def lease(self, job_id: str, devices: tuple[str, ...], compute_milli: int,
              memory_mib: int, term: int, coordinator: str, origin: str, priority: int,
              preemptible: bool, now: float, container: bool = False) -> Lease | Refusal:
        """Reserve a fraction of ``devices`` on this node's books (journaled and gossiped
        when granted). A zero compute or memory (a request in proportion, from an older
        coordinator) is filled in from the device: nothing is leased at zero. An NPU
        fraction in a ``container`` is leased as its vNPU template (``devices.vnpu``)."""
        device = self.devices.get(devices[0])
        if device is not None:
            compute_milli, memory_mib = vnpu.leased(device, compute_milli, memory_mib, container)
        result = self.leases.request(
            job_id=job_id, device=devices[0], compute_milli=compute_milli,
            memory_mib=memory_mib, term=term, coordinator=coordinator, origin=origin, now=now,
            ttl=self.node.config.lease_ttl, more=devices[1:], priority=priority,
            preemptible=preemptible,
        )
        if isinstance(result, Refusal):
            self.out.count("leases_refused")
            return result
        self.node.saw_term(result.term)
        self.out.emit(PersistLease(result))
        self.node.publish_facts()
        return result

    def handle_lease_request(self, msg: wire.LeaseRequest, now: float) -> wire.Message:
        problem = job_id_problem(msg.job_id)
        if problem is not None:
            return wire.LeaseReply(False, "", 0, self.node.membership.me.facts_version, problem)
        problem = self._implausible_term(msg.term) or self.node.power.refusal(msg.origin)
        if problem is not None:
            return wire.LeaseReply(False, "", 0, self.node.membership.me.facts_version, problem)
        result = self.lease(msg.job_id, (msg.device, *msg.more), msg.compute_milli,
                            msg.memory_mib, msg.term, msg.coordinator, msg.origin,
                            msg.priority, msg.preemptible, now, msg.container)
        version = self.node.membership.me.facts_version
        if isinstance(result, Refusal):
            return wire.LeaseReply(False, "", 0, version, result.reason)
        return wire.LeaseReply(True, result.id, result.token, version, "", list(result.devices))

    def _implausible_term(self, term: int) -> str | None:
        """Why a coordinator's ``term`` is not believed here, or None."""
        seen = max(self.node.max_term, self.leases.max_term)
        if plausible_term(term, seen):
            return None
        self.out.count("implausible_term")
        return (f"coordinator term {term} jumps more than {TERM_STEP} past the highest this "
                f"owner has seen ({seen})")

    def handle_release(self, msg: wire.Release, now: float) -> wire.Message:
        lease = self.leases.leases.get(msg.lease_id)
        if (lease is None or lease.job_id != msg.job_id or lease.token != msg.token
                or lease.state != RESERVED):
            return wire.Ok("nothing to give back")  # started, expired, or not ours
        released = self.leases.release(lease.id)
        if released is not None:
            self.out.emit(PersistLease(released))
            self.node.publish_facts()
        self.out.log("lease_released", job=msg.job_id, lease=msg.lease_id)
        return wire.Ok("released")

    def handle_preempt(self, msg: wire.Preempt, now: float) -> wire.Message:
        """A coordinator stops preemptible jobs here for a higher-priority one."""
        if msg.term < self.leases.max_term:
            return wire.Error(f"stale coordinator term {msg.term} (this owner has seen "
                              f"{self.leases.max_term})")
        problem = self._implausible_term(msg.term)
        if problem is not None:
            return wire.Error(problem)
        held = {x.job_id: x for x in self.leases.active()}
        stopped, refused = [], []
        for job_id in msg.job_ids:
            lease = held.get(job_id)
            if lease is None or not lease.preemptible or lease.priority >= msg.priority:
                # gone already, never preemptible, or not below the request: left alone
                refused.append(job_id)
                continue
            stopped.append(job_id)
            if job_id not in self._stopping:  # (else already on its way out)
                self.out.count("preempted")
                self.take_back(lease, msg.reason, now)
        self.out.log("preempted", jobs=stopped, refused=refused, coordinator=msg.coordinator)
        if not stopped:
            return wire.Error(f"no preemptible job among {', '.join(msg.job_ids)}")
        return wire.Ok(f"stopping {len(stopped)}")

    # --- runs ---------------------------------------------------------------------------

    def handle_start(self, msg: wire.StartJob, now: float) -> wire.Message:
        run = self.runs.get(msg.job_id)
        if run is not None and run.lease_id == msg.lease_id:
            return wire.Ok(run.state)  # already started: starting is idempotent
        problem = job_id_problem(msg.job_id)
        if problem is not None:
            return wire.Error(problem)
        if self._live.get(msg.job_id, msg.lease_id) != msg.lease_id:
            return wire.Error(f"an earlier run of job {msg.job_id} has not ended here yet")
        result = self.leases.start(msg.lease_id, msg.job_id, msg.token)
        if isinstance(result, Refusal):
            return wire.Error(result.reason)
        held = [self.devices.get(d) for d in result.devices]
        gone = [d for d, dev in zip(result.devices, held, strict=True) if dev is None]
        if gone:
            self.leases.release(result.id)
            return wire.Error(f"device {','.join(gone)} is gone")
        run = self._run_record(msg, result, now)
        self.out.emit(PersistLease(result))
        self.node.persist_run(run)
        self.out.emit(RunJob(replace(run), tuple(d for d in held if d is not None)))
        self._live[run.id] = result.id
        self.orphans.heard(run.id, run.origin, now)
        self.out.log("job_start", job=run.id, device=",".join(result.devices), origin=run.origin)
        return wire.Ok("starting")

    def _run_record(self, msg: wire.StartJob, lease: Lease, now: float) -> RunRecord:
        """A new run: with its lease's share, and its submitter if submitted here."""
        earlier = self.runs.get(msg.job_id)  # an earlier run here (preempted): counted on
        mine = self.node.origin.jobs.get(msg.job_id) if msg.origin == self.node.name else None
        run = RunRecord(id=msg.job_id, origin=msg.origin, command=list(msg.command),
                        compute_milli=lease.compute_milli, memory_mib=lease.memory_mib,
                        env=dict(msg.env), devices=lease.devices, lease_id=lease.id,
                        token=lease.token, term=lease.term, created_at=now, updated_at=now,
                        uid=mine.uid if mine is not None else None,
                        attempts=(earlier.attempts if earlier is not None else 0) + 1,
                        bundle=msg.bundle, bundle_size=msg.bundle_size, image=msg.image,
                        image_network=msg.image_network, earlier_results=carried(earlier))
        self.runs[run.id] = run
        return run

    def handle_cancel(self, msg: wire.Cancel, now: float) -> wire.Message:
        job = self.runs.get(msg.job_id)
        if job is None:
            return wire.Error(f"no job {msg.job_id} runs here")
        if job.terminal:
            return wire.Ok(job.state)
        self.stop_job(job.id, msg.reason, CANCELLED, now)
        return wire.Ok("stopping")

    def stop_job(self, job_id: str, reason: str, state: str, now: float) -> None:
        """Stop a job's process; it ends in ``state`` with ``reason``."""
        job = self.runs.get(job_id)
        if job is None or job.terminal or job_id in self._stopping:
            return
        self.out.log("job_stop", job=job_id, state=state, reason=reason)
        if job.state == PLACED and job.pid is None:
            # Not started yet: nothing to signal. If its RunJob has not even left the
            # outbox, no process will exist at all.
            if self.out.withdraw_run(job.id, job.lease_id):
                self._live.pop(job.id, None)
            self._end_run(job, None, reason, now, state)
            return
        stop = StopJob(job_id, reason, state, job.lease_id)
        self._stopping[job_id] = stop
        self.out.emit(stop)

    def job_started(self, job_id: str, pid: int, pid_start: int | None, now: float,
                    lease_id: str | None) -> None:
        run = self.runs.get(job_id)
        if (run is None or run.state != PLACED
                or (lease_id is not None and run.lease_id != lease_id)):
            # Stopped (cancelled, preempted, reclaimed) while its process was being started,
            # maybe requeued since: its lease is given back, so the process must not run on.
            self.out.log("stale_start", job=job_id, pid=pid)
            self.out.emit(StopJob(job_id, "stopped before it had started",
                                  run.state if run is not None and run.terminal else CANCELLED,
                                  lease_id or ""))
            return
        run.state, run.pid, run.pid_start, run.updated_at = RUNNING, pid, pid_start, now
        self.node.persist_run(run)
        self._tell_origin(run, now)

    def job_exited(self, job_id: str, exit_code: int | None, reason: str, now: float,
                   state: str | None) -> None:
        self._live.pop(job_id, None)
        run = self.runs.get(job_id)
        if run is None or run.state not in (PLACED, RUNNING):
            return  # not a run of ours (any more): e.g. stopped while starting, requeued
        stop = self._stopping.pop(job_id, None)
        if stop is not None:
            state, reason = stop.state, stop.reason
        elif state is None:
            state = SUCCEEDED if exit_code == 0 else FAILED
        self._end_run(run, exit_code, reason, now, state)

    def _end_run(self, run: RunRecord, exit_code: int | None, reason: str, now: float,
                 state: str) -> None:
        self._stopping.pop(run.id, None)
        run.state, run.exit_code, run.reason, run.updated_at = state, exit_code, reason, now
        lease = self.leases.release(run.lease_id)
        if lease is not None:
            self.out.emit(PersistLease(lease))
        self.out.log("job_end", job=run.id, state=state, reason=reason)
        self.node.publish_facts()
        self.node.persist_run(run)
        self._tell_origin(run, now)

    def _tell_origin(self, run: RunRecord, now: float) -> None:
        """A job submitted here hears of its run at once; others follow it (``JobSync``)."""
        job = self.node.origin.jobs.get(run.id) if run.origin == self.node.name else None
        if job is not None and job.lease_id == run.lease_id:
            self.node.origin.remote_update(job, run.state, run.reason, run.exit_code, now)

    def sync_reply(self, msg: wire.JobSync, stdout: bytes, stderr: bytes, chunk: int,
                   now: float) -> wire.Message:
        """Answer an origin that follows a job run here: its state and the output from
        the offsets it asked for (read by the caller, at most ``chunk`` bytes a stream).
        A job this node neither runs nor holds a lease for (never started here, or
        forgotten) is lost as far as this node can tell."""
        if not (0 <= msg.stdout_offset < MAX_OFFSET and 0 <= msg.stderr_offset < MAX_OFFSET):
            return wire.Error(f"output offsets must lie in [0, {MAX_OFFSET})")
        job = self.runs.get(msg.job_id)
        if job is None and any(x.job_id == msg.job_id for x in self.leases.active()):
            return wire.JobSyncReply(PLACED, "", None, b"", b"", False)  # not started yet
        if job is None:
            return wire.JobSyncReply(LOST, f"{self.node.name} has no record of job "
                                     f"{msg.job_id}", None, b"", b"", True)
        self.orphans.heard(job.id, job.origin, now)
        complete = job.terminal and len(stdout) < chunk and len(stderr) < chunk
        if complete:
            self._collected.add(job.id)
        return wire.JobSyncReply(job.state, job.reason, job.exit_code, stdout, stderr, complete)

    def uncollected(self, job_id: str) -> bool:
        """Whether ``job_id`` is a run that ended here and whose origin, another node,
        has not heard so yet: kept until its age runs out, whatever the count."""
        run = self.runs.get(job_id)
        return (run is not None and run.terminal and job_id not in self._collected
                and run.origin != self.node.name)

    def forget(self, job_id: str) -> bool:
        """An ended run past its retention; True if it was forgotten."""
        run = self.runs.get(job_id)
        if run is None or not run.terminal:
            return False
        del self.runs[job_id]
        self._stopping.pop(job_id, None)
        self._collected.discard(job_id)
        return True

    # --- restart ------------------------------------------------------------------------

    def restore(self, leases: list[Lease]) -> None:
        for lease in leases:
            if lease.state in ACTIVE:
                self.leases.restore(lease)

    def recover_run(self, run: RunRecord, adopted: bool | None, now: float) -> None:
        """A run read from the journal: ended, re-adopted, lost with the agent, or (never
        started: its workdir was still coming, say) handed back to be placed again."""
        self.runs[run.id] = run
        if run.state in (PLACED, RUNNING) and adopted:
            self._live[run.id] = run.lease_id
            self.orphans.heard(run.id, run.origin, now)
        elif run.state in (PLACED, RUNNING):
            state, why = ((PREEMPTED, "not started before the agent restarted")
                          if run.state == PLACED and adopted is None and run.pid is None
                          else (LOST, "process vanished while the agent was down"))
            self.out.log("job_lost" if state == LOST else "job_requeued", job=run.id, reason=why)
            self._end_run(run, None, why, now, state)

    def stopping(self) -> set[str]:
        return set(self._stopping)

    def expire(self, now: float) -> bool:
        """Reserved leases whose job never started are taken back; True if any was."""
        expired = self.leases.expire(now)
        for lease in expired:
            self.out.log("lease_expired", lease=lease.id, job=lease.job_id)
            self.out.emit(PersistLease(lease))
        return bool(expired)
