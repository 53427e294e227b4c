"""One seeded run of random faults over a small mesh, for the suite and the bench.

``run_seed(seed)`` builds 3 to 8 nodes, submits jobs (fractions, whole devices,
priorities, preemptible ones) from random nodes, and between rounds of jobs crashes,
restarts, partitions, stalls or gracefully restarts a node, raises an owner's own load
(reclaim), fills a node's disk for a while (the output it follows cannot be written),
and loses, delays and reorders packets and calls. The simulator checks its
invariants after every event (see ``simcheck``); after the faults heal, the mesh must
converge, every job end or wait in the queue, and every job that succeeded on another
node must have its whole output at its origin, exactly once. A failure raises with the
seed, which replays it exactly.
"""

from __future__ import annotations

import random
from typing import Any

from flexmesh.agent.devices.base import Device
from flexmesh.agent.simcheck import InvariantError
from flexmesh.agent.simnet import LinkFaults
from flexmesh.agent.simulator import Simulator
from flexmesh.protocol.membership import PRESETS

FAULTS = ("crash", "partition", "stall", "leave", "load", "disk", "none")


def _gpu(i: int, mib: int = 8192) -> Device:
    return Device(f"gpu{i}", "gpu", "sim-gpu", mib, "sim")


def _faults(rng: random.Random) -> LinkFaults:
    return LinkFaults(loss=rng.choice([0.0, 0.02, 0.1]), duplicate=rng.choice([0.0, 0.05]),
                      jitter=rng.choice([0.002, 0.05]), call_loss=rng.choice([0.0, 0.0, 0.1]),
                      call_jitter=rng.choice([0.0, 0.2]))


def _submit_round(sim: Simulator, rng: random.Random, seed: int, first: int) -> int:
    origin = rng.choice(sim.up_nodes())
    n = rng.randint(1, 4)
    for j in range(first, first + n):
        priority = rng.choice([0, 0, 5])
        sim.submit(origin, f"s{seed}-j{j}", ["sleep", str(rng.randint(1, 5))],
                   rng.choice([100, 250, 500, 1000]), rng.choice([0, 1024, 4096]),
                   priority=priority, preemptible=priority == 0 and rng.random() < 0.5)
    return first + n


def _fault(sim: Simulator, rng: random.Random, names: list[str]) -> tuple[str, str]:
    fault, victim = rng.choice(FAULTS), rng.choice(names[1:])
    if fault == "crash" and sim.nodes[victim].up:
        sim.crash(victim)
    elif fault == "leave" and sim.nodes[victim].up:
        sim.leave(victim)
    elif fault == "partition":
        sim.partition(set(rng.sample(names, rng.randint(1, len(names) - 1))))
    elif fault == "stall":
        sim.stall(victim, rng.uniform(0.5, 3.0))
    elif fault == "disk":
        sim.disk_full(rng.choice(names), rng.uniform(0.5, 5.0))
    elif fault == "load" and sim.nodes[victim].devices and sim.nodes[victim].up:
        sim.load(victim, "gpu0", rng.choice([0, 500, 1000]), rng.choice([0, 4096]))
    return fault, victim


def _converge(sim: Simulator, seed: int) -> None:
    # With loss, a transient suspicion can come and go at any moment: wait for a
    # converged instant.
    start = sim.now
    while not (len(sim.groups()) == 1 and sim.converged(sim.groups()[0])):
        if sim.now - start > 120:
            raise InvariantError(f"seed {seed}: not converged 120 s after healing")
        sim.run_for(1.0)


def _settled(sim: Simulator, job_id: str) -> bool:
    job = sim.job(job_id)
    return job is None or job.terminal or job.state == "queued" or not sim.nodes[job.origin].up


def _check_jobs(sim: Simulator, seed: int) -> dict[str, int]:
    ends: dict[str, int] = {}
    for job_id in sim.submitted:
        job = sim.job(job_id)
        if job is None:
            raise InvariantError(f"seed {seed}: job {job_id} vanished")
        if sim.nodes[job.origin].up and not (job.terminal or job.state == "queued"):
            raise InvariantError(f"seed {seed}: job {job_id} stuck {job.state} on {job.node}")
        ends[job.state] = ends.get(job.state, 0) + 1
        if job.state == "failed":  # every command here exits 0: a run was cut short
            raise InvariantError(f"seed {seed}: {job_id} failed: {job.reason}")
        if job.state == "succeeded" and job.node != job.origin:
            for stream in ("stdout", "stderr"):
                got, wrote = sim.output(job_id, stream)
                if got != wrote:
                    raise InvariantError(f"seed {seed}: {job_id} {stream}: {len(got)} bytes "
                                         f"at its origin, {len(wrote)} written")
    return ends


def run_seed(seed: int) -> dict[str, Any]:
    """One run; returns what happened (for the bench's figures)."""
    rng = random.Random(seed)
    sim = Simulator(seed, faults=_faults(rng), membership=PRESETS["local"])
    names = [f"n{i}" for i in range(rng.randint(3, 8))]
    for i, name in enumerate(names):
        sim.add_node(name, [_gpu(0)] if i % 2 == 0 else [], join=[names[0]] if i else None)
    sim.run_for(5)
    jobs, faults = 0, []
    for _ in range(rng.randint(2, 5)):
        jobs = _submit_round(sim, rng, seed, jobs)
        fault, victim = _fault(sim, rng, names)
        faults.append(fault)
        sim.run_for(rng.uniform(1, 6))
        if fault in ("crash", "leave") and not sim.nodes[victim].up:
            sim.restart(victim, [names[0]] if victim != names[0] else [names[1]])
    sim.heal()
    for name in names:
        if sim.nodes[name].load:
            sim.load(name, "gpu0", 0, 0)
    _converge(sim, seed)
    # Calls are still lost after the heal: give every job time to end (a follow-up lost
    # costs a call timeout) before calling one stuck.
    start = sim.now
    while sim.now - start < 300 and not all(_settled(sim, j) for j in sim.submitted):
        sim.run_for(5)
    return {"seed": seed, "nodes": len(names), "jobs": jobs, "faults": faults,
            "ends": _check_jobs(sim, seed), "packets": sim.stats["packets"]}
