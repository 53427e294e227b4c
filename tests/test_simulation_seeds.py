"""Many seeds, small meshes, random faults: the invariants hold after every event and the
mesh heals. A failure names the seed that replays it exactly."""

from __future__ import annotations

import random

import pytest

from flexmesh.agent.devices.base import Device
from flexmesh.agent.models import TERMINAL
from flexmesh.agent.simulator import LinkFaults, Simulator
from flexmesh.protocol.membership import PRESETS

SEEDS = range(200)


def gpu(i: int, mib: int = 8192) -> Device:
    return Device(f"gpu{i}", "gpu", "sim-gpu", mib, "sim")


@pytest.mark.parametrize("seed", SEEDS)
def test_random_faults_then_heal(seed: int) -> None:
    rng = random.Random(seed)
    faults = LinkFaults(loss=rng.choice([0.0, 0.02, 0.1]), duplicate=rng.choice([0.0, 0.05]),
                        jitter=rng.choice([0.002, 0.05]))
    sim = Simulator(seed, faults=faults, membership=PRESETS["local"])
    n = rng.randint(3, 8)
    names = [f"n{i}" for i in range(n)]
    for i, name in enumerate(names):
        devices = [gpu(0)] if i % 2 == 0 else []
        sim.add_node(name, devices, join=[names[0]] if i else None)
    sim.run_for(5)
    jobs = 0
    for _ in range(rng.randint(2, 5)):
        origin = rng.choice(sim.up_nodes())
        for _ in range(rng.randint(1, 4)):
            sim.submit(origin, f"s{seed}-j{jobs}", ["sleep", str(rng.randint(1, 5))],
                       rng.choice([100, 250, 500, 1000]), rng.choice([0, 1024, 4096]))
            jobs += 1
        fault = rng.choice(["crash", "partition", "stall", "none"])
        victim = rng.choice(names[1:])
        if fault == "crash" and sim.nodes[victim].up:
            sim.crash(victim)
        elif fault == "partition":
            sim.partition(set(rng.sample(names, rng.randint(1, n - 1))))
        elif fault == "stall":
            sim.stall(victim, rng.uniform(0.5, 3.0))
        sim.run_for(rng.uniform(1, 6))
        if fault == "crash" and not sim.nodes[victim].up:
            sim.restart(victim, [names[0]] if victim != names[0] else [names[1]])
    sim.heal()
    # check() runs after every event: no device is ever over-committed. With loss, a
    # transient suspicion can come and go at any moment: wait for a converged instant.
    start = sim.now
    while not (len(sim.groups()) == 1 and sim.converged(sim.groups()[0])):
        assert sim.now - start < 120, f"seed {seed}: not converged 120 s after healing"
        sim.run_for(1.0)
    # Every accepted job is in exactly one state at its origin, and the live ones end.
    sim.run_for(60)
    for job_id in sim.submitted:
        job = sim.job(job_id)
        assert job is not None, f"seed {seed}: job {job_id} vanished"
        origin_up = sim.nodes[job.origin].up
        assert not origin_up or job.state in TERMINAL or job.state == "queued", (
            f"seed {seed}: job {job_id} stuck {job.state} on {job.node}")
