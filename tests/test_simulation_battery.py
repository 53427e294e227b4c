"""Battery in the deterministic simulator: the real node code, an owner whose battery falls
below its lend floor hands back what it lent, and the job finishes elsewhere."""

from __future__ import annotations

import pytest

from flexmesh.agent.devices.base import Device
from flexmesh.agent.node.power import PowerPolicy
from flexmesh.agent.simulator import LinkFaults, Simulator
from flexmesh.protocol.membership import PRESETS


def gpu(i: int) -> Device:
    return Device(f"gpu{i}", "gpu", "sim-gpu", 16384, "sim")


def mesh(seed: int, faults: LinkFaults | None = None) -> Simulator:
    """a: one GPU, on battery; z: no device, submits. Converged, a at 80%."""
    sim = Simulator(seed, faults=faults, membership=PRESETS["lan"])
    sim.add_node("a", [gpu(0)])
    sim.add_node("z", [], join=["a"], priority=10)
    sim.battery("a", 80)
    sim.run_for(10)
    assert sim.converged({"a", "z"})
    return sim


def starts(sim: Simulator, job_id: str) -> list[str]:
    return [node for node, job, _ in sim.runs if job == job_id]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_below_the_floor_the_borrowed_job_is_requeued_and_finishes_elsewhere(
        seed: int) -> None:
    sim = mesh(seed, LinkFaults(loss=0.02))
    sim.submit("z", "borrowed", ["sleep", "30"], 500, 4096)
    sim.submit("a", "own", ["sleep", "40"], 250, 2048)
    sim.run_for(5)
    assert sim.job("borrowed").state == "running" and sim.job("borrowed").node == "a"
    assert sim.job("own").state == "running" and sim.job("own").node == "a"

    sim.battery("a", 15)  # below the default floor (20%)
    sim.run_for(5)
    job = sim.job("borrowed")
    assert job is not None and job.state == "queued", (job.state, job.reason)
    assert "battery 15% below lend floor 20% (lends again at 25%)" in job.reason
    assert sim.job("own").state == "running"  # its own job runs on
    facts = sim.nodes["z"].node.facts_of(sim.nodes["z"].node.membership.members["a"])
    assert facts.battery is not None and (facts.battery.level, facts.battery.floor) == (15, 25)
    assert not facts.battery.lending

    sim.add_node("b", [gpu(0)], join=["a"])
    sim.run_for(60)
    assert sim.job("borrowed").state == "succeeded" and sim.job("borrowed").node == "b"
    assert starts(sim, "borrowed") == ["a", "b"]
    assert sim.job("own").state == "succeeded" and starts(sim, "own") == ["a"]
    counters = sim.nodes["a"].node.counters
    assert counters["lending_stopped"] == 1 and counters["battery_handbacks"] == 1


def test_no_new_work_from_others_until_the_level_clears_the_hysteresis() -> None:
    sim = mesh(7)
    sim.battery("a", 19)
    sim.run_for(3)
    sim.submit("z", "j1", ["sleep", "1"], 250, 1024)
    sim.run_for(10)
    assert sim.job("j1").state == "queued" and starts(sim, "j1") == []
    # The coordinator reads the gossiped battery and does not even ask a.
    assert sim.nodes["a"].node.counters.get("leases_refused_battery", 0) == 0
    sim.submit("a", "mine", ["sleep", "1"], 250, 1024)  # its own job still places here
    sim.run_for(10)
    assert sim.job("mine").state == "succeeded" and starts(sim, "mine") == ["a"]

    sim.battery("a", 22)  # above the floor, not above floor + hysteresis: still not lending
    sim.run_for(10)
    assert sim.job("j1").state == "queued"
    sim.battery("a", 25)
    sim.run_for(10)
    assert sim.job("j1").state == "succeeded" and starts(sim, "j1") == ["a"]
    assert sim.nodes["a"].node.counters["lending_resumed"] == 1


def test_on_the_charger_a_node_lends_down_to_its_charging_floor() -> None:
    sim = mesh(3)
    policy = PowerPolicy(lend_floor=30, charging_lend_floor=5)
    sim.battery("a", 12, charging=True, policy=policy)
    sim.submit("z", "j1", ["sleep", "2"], 250, 1024)
    sim.run_for(10)
    assert sim.job("j1").state == "succeeded" and starts(sim, "j1") == ["a"]
    sim.submit("z", "j2", ["sleep", "30"], 250, 1024)
    sim.run_for(5)
    assert sim.job("j2").state == "running"
    sim.battery("a", 12, charging=False)  # unplugged: 12% is below the 30% floor
    sim.run_for(5)
    job = sim.job("j2")
    assert job.state == "queued" and "battery 12% below lend floor 30%" in job.reason


def test_a_restart_below_the_floor_hands_back_the_borrowed_runs_it_adopts() -> None:
    sim = mesh(5)
    sim.submit("z", "j1", ["sleep", "40"], 250, 1024)
    sim.run_for(5)
    assert sim.job("j1").state == "running" and starts(sim, "j1") == ["a"]
    sim.leave("a")  # its processes go on, for the restart to adopt
    sim.battery("a", 10)  # read while it was down
    sim.run_for(2)
    sim.restart("a", ["z"])
    sim.add_node("b", [gpu(0)], join=["z"])
    sim.run_for(60)
    job = sim.job("j1")
    assert job.state == "succeeded" and starts(sim, "j1") == ["a", "b"], (job.state, job.reason)
    assert sim.nodes["a"].node.counters["battery_handbacks"] == 1
    sim.submit("z", "j2", ["sleep", "1"], 250, 1024)
    sim.run_for(10)
    assert starts(sim, "j2") == ["b"]  # still below the floor after the restart
