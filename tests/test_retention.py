"""Nothing grows without bound: a week of steady job traffic, simulated, leaves every
node with as many records (jobs, runs, leases, pending calls, journal rows) on its last
day as on its second."""

from __future__ import annotations

from flexmesh.agent.devices.base import Device
from flexmesh.agent.node.retention import Retention
from flexmesh.agent.simulator import Simulator
from flexmesh.protocol.membership import PRESETS

DAY = 86400.0


def records(sim: Simulator) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, s in sim.nodes.items():
        n = s.node
        for what, count in (("jobs", len(n.origin.jobs)), ("runs", len(n.owner.runs)),
                            ("leases", len(n.leases.leases)), ("calls", len(n._calls)),
                            ("placed", len(n.scheduler.placed)),
                            ("disk_jobs", len(s.disk_jobs)), ("disk_leases", len(s.disk_leases)),
                            ("logs", len(s.logs)), ("received", len(s.received)),
                            ("archived", len(s.archived))):
            out[f"{name}.{what}"] = count
    return out


def test_a_week_of_jobs_keeps_record_counts_flat() -> None:
    sim = Simulator(1, membership=PRESETS["wan"], keep_finished=4, keep_finished_for=DAY)
    sim.add_node("owner", [Device("gpu0", "gpu", "sim-gpu", 16384, "sim")])
    sim.add_node("desk", [], join=["owner"])
    sim.run_for(60)
    seen: list[dict[str, int]] = []
    for day in range(7):
        for k in range(int(DAY // 600)):  # a job every ten minutes, from either node
            sim.submit("desk" if k % 2 else "owner", f"d{day}-{k}", ["sleep", "30"], 500, 1024)
            sim.run_for(600, check=False)
        seen.append(records(sim))
    assert sim.terminal_jobs()  # jobs ran (and the first of them are forgotten by now)
    for key, count in seen[-1].items():
        assert count <= max(seen[1][key], 1) + 2, (key, [s[key] for s in seen])
        assert count <= 10, (key, count)  # keep_finished, and the jobs still running


def test_retention_forgets_the_oldest_beyond_the_count_and_the_age() -> None:
    r = Retention(keep=2, keep_for=100.0)
    for i, t in enumerate((0.0, 1.0, 2.0)):
        r.ended(f"j{i}", t)
    assert r.due(3.0) == ["j0"]  # one too many
    r.revived("j1")  # a new attempt under the same id: not ended any more
    assert r.due(50.0) == []
    r.ended("j1", 60.0)
    assert r.due(102.0) == ["j2"]  # older than keep_for
    assert r.due(159.0) == [] and r.due(160.0) == ["j1"]
