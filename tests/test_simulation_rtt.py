"""Round trips the mesh can use: Vivaldi coordinates carried on probe acks, run by the
real node code over a simulated latency matrix of three sites.

The coordinates converge (the estimate between any two nodes, made by a third, is close to
the real round trip), and the coordinator, which sees every node's coordinate, places a
job submitted at one site on a device at that site when there is room.
"""

from __future__ import annotations

import statistics

from flexmesh.agent.devices.base import Device
from flexmesh.agent.simulator import LinkFaults, Simulator
from flexmesh.protocol.membership import PRESETS

SITES = {"a": 0, "b": 1, "c": 2}
ONE_WAY = {(0, 0): 0.001, (1, 1): 0.001, (2, 2): 0.001, (0, 1): 0.020, (0, 2): 0.045,
           (1, 2): 0.030}  # seconds, one way


def one_way(x: str, y: str) -> float:
    i, j = sorted((SITES[x[0]], SITES[y[0]]))
    return ONE_WAY[i, j]


def gpu(name: str) -> Device:
    return Device(f"{name}-gpu", "gpu", "sim-gpu", 16384, "sim")


def mesh(seed: int) -> Simulator:
    """Three sites of three GPU nodes and a desk each; the coordinator sits at site a."""
    sim = Simulator(seed, faults=LinkFaults(one_way=one_way, jitter=0.0005),
                    membership=PRESETS["wan"])
    sim.add_node("a0", [gpu("a0")], priority=-1)
    for site in "abc":
        for i in range(3):
            name = f"{site}{i}"
            if name != "a0":
                sim.add_node(name, [gpu(name)], join=["a0"])
        sim.add_node(f"{site}-desk", [], join=["a0"])
    sim.run_for(400)
    return sim


def test_coordinates_converge_and_predict_round_trips_between_others() -> None:
    sim = mesh(1)
    coordinator = sim.nodes["a0"].node.membership
    names = [n for n in sim.nodes if n != "a0"]
    errors = []
    for x in names:
        for y in names:
            if x < y:
                est = coordinator.rtt(x, y)
                assert est is not None, (x, y)
                real = 2 * one_way(x, y)
                errors.append(abs(est - real) / real)
    assert statistics.median(errors) < 0.2, sorted(errors)
    assert sim.nodes["c-desk"].node.membership.counters.get("rtt_samples", 0) > 50


def test_a_job_lands_at_its_submitters_site_when_there_is_room() -> None:
    sim = mesh(2)
    for i in range(3):
        sim.submit("c-desk", f"j{i}", ["sleep", "120"], 1000, 0)
    sim.submit("b-desk", "jb", ["sleep", "120"], 1000, 0)
    sim.run_for(30)
    placed = {j: sim.job(j) for j in ("j0", "j1", "j2", "jb")}
    assert all(job is not None and job.state == "running" for job in placed.values()), placed
    assert {placed[f"j{i}"].node[0] for i in range(3)} == {"c"}  # type: ignore[union-attr]
    assert placed["jb"].node[0] == "b"  # type: ignore[union-attr]
    sim.submit("c-desk", "overflow", ["sleep", "60"], 1000, 0)  # site c is full now
    sim.run_for(20)
    job = sim.job("overflow")
    # (the next nearest site)
    assert job is not None and job.state == "running" and job.node[0] == "b", job
