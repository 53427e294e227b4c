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


def test_held_records_outlive_the_count_but_not_the_age() -> None:
    r = Retention(keep=1, keep_for=100.0)
    for i, t in enumerate((0.0, 1.0, 2.0)):
        r.ended(f"j{i}", t)
    held = {"j0"}
    assert r.due(3.0, held=held.__contains__) == ["j1"]  # j0 is still needed
    assert r.due(4.0, held=held.__contains__) == []  # j2 within the count; j0 uncounted
    r.ended("j3", 5.0)
    assert r.due(6.0, held=held.__contains__) == ["j2"]
    assert r.due(100.0, held=held.__contains__) == ["j0"]  # aged out, needed or not


def _borrowed_run(keep_for: float) -> Simulator:
    """``desk`` runs a job on ``owner`` and is cut off from it while the job ends (not for
    long enough to be declared dead); meanwhile ``owner`` runs more of its own jobs than
    it keeps (``keep_finished=1``)."""
    sim = Simulator(3, membership=PRESETS["wan"], keep_finished=1, keep_finished_for=keep_for)
    sim.add_node("owner", [Device("gpu0", "gpu", "sim-gpu", 16384, "sim")])
    sim.add_node("desk", [], join=["owner"])
    sim.run_for(10)
    sim.submit("desk", "borrowed", ["sleep", "3"], 500, 1024)
    sim.run_for(1)
    assert sim.nodes["desk"].node.origin.jobs["borrowed"].state == "running"
    sim.cut("desk", "owner")
    for k in range(3):
        sim.submit("owner", f"own{k}", ["sleep", "1"], 500, 1024)
    sim.run_for(25)
    assert sim.nodes["desk"].node.origin.jobs["borrowed"].state == "running"
    last = sim.job("own2")
    assert last is not None and last.state == "succeeded"
    assert sim.job("own0") is None  # ended and forgotten: keep_finished=1 applies to these
    return sim


def test_an_owner_keeps_a_run_until_its_origin_heard_how_it_ended() -> None:
    sim = _borrowed_run(keep_for=DAY)
    wrote = sim.nodes["owner"].logs["borrowed"].content("stdout", sim.now)
    sim.heal()
    sim.run_for(20)
    job = sim.nodes["desk"].node.origin.jobs["borrowed"]
    assert job.state == "succeeded", job.reason
    assert bytes(sim.nodes["desk"].received["borrowed"]["stdout"]) == wrote != b""
    for k in range(3):  # the origin heard: now the count applies to it as well
        sim.submit("owner", f"more{k}", ["sleep", "1"], 500, 1024)
    sim.run_for(30)
    assert "borrowed" not in sim.nodes["owner"].node.owner.runs


def test_a_run_its_owner_forgot_is_lost_to_its_origin_not_followed_forever() -> None:
    sim = _borrowed_run(keep_for=5.0)  # the owner forgets even what its origin needs
    assert "borrowed" not in sim.nodes["owner"].node.owner.runs
    sim.heal()
    job = sim.nodes["desk"].node.origin.jobs["borrowed"]
    while sim.now < 60 and job.state == "running":  # (ended, it is soon forgotten too)
        sim.run_for(0.1)
    assert job.state == "lost" and "no record of job borrowed" in job.reason
