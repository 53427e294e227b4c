"""The invariants the simulator checks after every step (and where a step makes them).

- No device is leased beyond its capacity on its owner's books.
- Every job that runs holds an active lease; every process that starts holds one with the
  job's current fencing token, and no job ever has two live processes.
- What a reply promises is journaled before it is sent: a granted lease, a started run, an
  accepted placement are on the answering node's disk when the answer leaves.
- Every accepted job is in exactly one state on its origin, in memory as on disk, and
  every state change a node journals is one ``models.TRANSITIONS`` allows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexmesh.agent.models import STATES, JobRecord, RunRecord
from flexmesh.protocol import wire
from flexmesh.protocol.lease import ACTIVE

if TYPE_CHECKING:
    from flexmesh.agent.node import RunJob
    from flexmesh.agent.simnet import SimNetwork
    from flexmesh.agent.simulator import Simulator, _SimNode


class InvariantError(AssertionError):
    pass


def check_world(sim: Simulator) -> None:
    for name, node in sim.nodes.items():
        if node.node.counters.get("job_state_invalid"):
            _fail(sim, f"a job on {name} made a state change the table does not allow")
        if node.up:
            _check_capacity(sim, name, node)
            _check_runs(sim, name, node)
    for job_id in sim.submitted:
        _check_origin(sim, job_id)


def _fail(sim: SimNetwork, what: str) -> None:
    raise InvariantError(f"seed {sim.seed}: {what} at t={sim.now:.3f}")


def _check_capacity(sim: Simulator, name: str, node: _SimNode) -> None:
    for d in node.devices:
        c = m = 0
        for lease in node.node.leases.leases.values():
            if lease.holds(d.id) and lease.state in ACTIVE:
                c += lease.compute_milli
                m += lease.memory_mib
        if c > d.compute_milli or m > d.memory_mib:
            _fail(sim, f"{name}/{d.id} leased {c} milli {m} MiB beyond "
                       f"{d.compute_milli}/{d.memory_mib}")


def _check_runs(sim: Simulator, name: str, node: _SimNode) -> None:
    for run in node.node.owner.runs.values():
        disk = node.disk_runs.get(run.id)
        if disk is None or (disk.state, disk.lease_id) != (run.state, run.lease_id):
            _fail(sim, f"the run of {run.id} on {name} is {run.state} but "
                       f"{disk.state if disk else 'absent'} in its journal")
        if run.state != "running":
            continue
        held = node.node.leases.leases.get(run.lease_id)
        if held is None or held.state not in ACTIVE:
            _fail(sim, f"job {run.id} runs on {name} without an active lease")


def _check_origin(sim: Simulator, job_id: str) -> None:
    origins = [n for n, s in sim.nodes.items() if s.up and job_id in s.node.origin.jobs]
    if len(origins) > 1:
        _fail(sim, f"job {job_id} is kept by {len(origins)} origins")
    for name in origins:
        node = sim.nodes[name]
        job = node.node.origin.jobs[job_id]
        disk = node.disk_jobs.get(job_id)
        if job.state not in STATES:
            _fail(sim, f"job {job_id} is in no known state ({job.state!r})")
        if disk is None or disk.state != job.state:
            _fail(sim, f"job {job_id} is {job.state} on {name} but "
                       f"{disk.state if disk else 'absent'} in its journal")


def check_start(sim: Simulator, name: str, eff: RunJob) -> None:
    """A process is about to start: it holds a current lease, and no other runs."""
    node = sim.nodes[name]
    lease = node.node.leases.leases.get(eff.job.lease_id)
    if lease is None or lease.state not in ACTIVE or lease.token != eff.job.token:
        _fail(sim, f"job {eff.job.id} starts on {name} without a current lease")
    live = [n for n, s in sim.nodes.items() if eff.job.id in s.processes]
    if live:
        _fail(sim, f"job {eff.job.id} starts on {name} while it runs on {', '.join(live)}")


def _on_disk(sim: SimNetwork, name: str, msg: wire.Message) -> JobRecord | RunRecord | None:
    """What ``name`` journaled of the job a request names: its run for a start, else
    the job."""
    node, job_id = sim.nodes[name], getattr(msg, "job_id", "")
    if isinstance(msg, wire.StartJob):
        return node.disk_runs.get(job_id)
    return node.disk_jobs.get(job_id)


def job_attempts(sim: SimNetwork, name: str, msg: wire.Message) -> int:
    """Attempts of the job (or run) a request names, as ``name`` has it on disk (-1:
    none)."""
    record = _on_disk(sim, name, msg)
    return record.attempts if record is not None else -1


def check_promise(sim: SimNetwork, name: str, msg: wire.Message, reply: wire.Message,
                  attempts: int) -> None:
    """``name`` answered ``msg`` with ``reply``: what the answer promises is on its disk
    (for a job, or the job has moved on within the same step: a new attempt, or its end)."""
    node = sim.nodes[name]
    if isinstance(reply, wire.LeaseReply) and reply.granted:
        lease = node.disk_leases.get(reply.lease_id)
        if lease is None or lease.token != reply.token:
            _fail(sim, f"{name} granted lease {reply.lease_id} before journaling it")
        return
    if not (isinstance(msg, wire.StartJob | wire.Placed) and isinstance(reply, wire.Ok)):
        return
    job = _on_disk(sim, name, msg)
    moved_on = job is not None and (job.attempts > attempts or job.terminal)
    if not moved_on and (job is None or job.lease_id != msg.lease_id):
        what = "started" if isinstance(msg, wire.StartJob) else "accepted the placement of"
        _fail(sim, f"{name} {what} {msg.job_id} before journaling it")
