"""Radio shadows: an owner cut off from the mesh while it runs a borrowed job.

The rules (README, "Jobs that outlive a radio shadow"): an origin follows a job whose
owner was declared dead for ``owner_dead_grace``, then requeues it; an owner stops the runs
of an origin it declared dead after ``orphan_limit``, shorter than that grace. So a shadow
shorter than the grace costs nothing (the job runs on, its output continues where it
stopped, it runs once), and a longer one costs a rerun elsewhere but never two runs at
once (``check_start`` fails the simulation on one) and exactly one result.
"""

from __future__ import annotations

import pytest

from flexmesh.agent.devices.base import Device
from flexmesh.agent.node.config import DEAD_GRACE
from flexmesh.agent.simulator import LinkFaults, Simulator
from flexmesh.protocol.membership import PRESETS


def gpu(i: int) -> Device:
    return Device(f"gpu{i}", "gpu", "sim-gpu", 16384, "sim")


def fleet(seed: int, loss: float = 0.0, **options: float) -> Simulator:
    """Drones on the edge profile, with its grace and orphan limit unless ``options``
    say otherwise."""
    grace, orphan = DEAD_GRACE["edge"]
    options = {"owner_dead_grace": grace, "orphan_limit": orphan, **options}
    sim = Simulator(seed, faults=LinkFaults(loss=loss), membership=PRESETS["edge"], **options)
    sim.add_node("base", [])
    sim.add_node("drone1", [gpu(0)], join=["base"])
    sim.add_node("drone2", [gpu(1)], join=["base"])
    sim.add_node("desk", [], join=["base"])
    sim.run_for(60)
    return sim


def running_on(sim: Simulator, job_id: str, limit: float = 60) -> str:
    start = sim.now
    while (job := sim.job(job_id)) is None or job.state != "running":
        assert sim.now - start < limit, f"seed {sim.seed}: {job_id} not running: {job}"
        sim.run_for(1.0)
    return job.node


def run_to_end(sim: Simulator, job_id: str, limit: float = 900) -> str:
    start = sim.now
    while (job := sim.job(job_id)) is not None and not job.terminal:
        assert sim.now - start < limit, f"seed {sim.seed}: {job_id} still {job.state}"
        sim.run_for(1.0)
    assert job is not None
    return job.state


def starts(sim: Simulator, job_id: str) -> list[str]:
    return [node for node, job, _env in sim.runs if job == job_id]


@pytest.mark.parametrize("seed", range(4))
def test_a_shadow_shorter_than_the_grace_costs_nothing(seed: int) -> None:
    sim = fleet(seed, loss=0.1)
    sim.submit("desk", "survey", ["sleep", "200"], 500, 1024)
    owner = running_on(sim, "survey")
    sim.run_for(20)
    before = len(sim.output("survey")[0])
    assert before > 0
    sim.isolate(owner)  # behind a hill for a minute: declared dead, and declaring all dead
    sim.run_for(60)
    job = sim.job("survey")
    assert job is not None and job.state == "running" and "out of reach" in job.reason, job
    sim.heal()
    assert run_to_end(sim, "survey") == "succeeded"
    assert starts(sim, "survey") == [owner]  # never run anywhere else
    got, wrote = sim.output("survey")
    assert got == wrote and len(got) > before  # continued where it stopped, whole


@pytest.mark.parametrize("seed", range(6))
def test_a_shadow_longer_than_the_grace_runs_the_job_once_at_a_time(seed: int) -> None:
    sim = fleet(seed, loss=0.05, owner_dead_grace=40.0, orphan_limit=20.0)
    sim.submit("desk", "survey", ["sleep", "150"], 500, 1024)
    owner = running_on(sim, "survey")
    sim.isolate(owner)
    sim.run_for(120)  # the owner stopped it, then the origin placed it elsewhere
    cut_off = sim.nodes[owner].node.owner.runs["survey"]
    assert cut_off.state == "preempted" and "did not ask after it" in cut_off.reason, cut_off
    assert sim.nodes[owner].node.counters.get("orphans_stopped") == 1
    sim.heal()
    assert run_to_end(sim, "survey") == "succeeded"
    job = sim.job("survey")
    assert job is not None and job.node != owner and job.attempts == 1, job
    assert starts(sim, "survey") == [owner, job.node]
    got, wrote = sim.output("survey")
    assert got == wrote  # the result and output are the second run's, once


def test_an_origin_back_before_the_grace_hears_its_job_was_stopped_and_requeues_it() -> None:
    """The owner stopped the run (its origin out of reach past the orphan limit); the
    origin comes back before its own grace ran out: it fetches the output so far, hears
    ``preempted`` and requeues the job, which then finishes."""
    sim = fleet(3, owner_dead_grace=120.0, orphan_limit=20.0)
    sim.submit("desk", "survey", ["sleep", "150"], 500, 1024)
    owner = running_on(sim, "survey")
    sim.isolate(owner)
    sim.run_for(70)
    assert sim.nodes[owner].node.owner.runs["survey"].state == "preempted"
    sim.heal()
    assert run_to_end(sim, "survey") == "succeeded"
    job = sim.job("survey")
    assert job is not None and job.attempts == 1
    assert len(starts(sim, "survey")) == 2
