"""The real node code, 50 nodes in the deterministic simulator: joins, a crash, a partition."""

from __future__ import annotations

import pytest

from flexmesh.agent.devices.base import Device
from flexmesh.agent.simulator import LinkFaults, Simulator
from flexmesh.protocol import wire
from flexmesh.protocol.lease import Lease
from flexmesh.protocol.membership import PRESETS


def gpu(i: int) -> Device:
    return Device(f"gpu{i}", "gpu", "sim-gpu", 16384, "sim")


def build(seed: int, n: int, faults: LinkFaults | None = None) -> Simulator:
    sim = Simulator(seed, faults=faults, membership=PRESETS["lan"])
    sim.add_node("n00", [gpu(0), gpu(1)])
    for i in range(1, n):
        devices = [gpu(0)] if i % 3 == 0 else []
        sim.add_node(f"n{i:02d}", devices, join=["n00"])
        sim.run_for(0.05)
    return sim


def settle(sim: Simulator, limit: float) -> float:
    """Run until every connected group has converged; return the time it took."""
    start = sim.now
    while sim.now - start < limit:
        sim.run_for(1.0)
        if all(sim.converged(g) for g in sim.groups()):
            return sim.now - start
    groups = [(sorted(g)[:3], sim.converged(g)) for g in sim.groups()]
    raise AssertionError(f"seed {sim.seed}: not converged after {limit}s: {groups}")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fifty_nodes_join_crash_partition_heal(seed: int) -> None:
    sim = build(seed, 50, LinkFaults(loss=0.01))
    settle(sim, 30)
    assert len(sim.groups()) == 1

    # Jobs from a deviceless node are placed on others' devices, never over capacity
    # (sim.check() runs after every event and raises on over-commit).
    for j in range(40):
        sim.submit("n01", f"j{j}", ["sleep", "2"], 250, 2048)
    sim.run_for(30)
    done = sim.terminal_jobs()
    assert len(done) == 40 and set(done.values()) == {"succeeded"}, done

    coordinator = sim.nodes["n05"].node.belief.coordinator
    assert coordinator is not None
    sim.crash(coordinator)
    settle(sim, 60)
    new = {sim.nodes[n].node.belief for n in sim.up_nodes()}
    assert len(new) == 1 and next(iter(new)).coordinator != coordinator

    side = {f"n{i:02d}" for i in range(1, 20)}
    sim.partition(side)
    # Up to 30 members at once become unreachable: each is declared dead after its
    # suspicion timeout (lan preset: 6.8 s shrinking with confirmations, at most 41 s).
    settle(sim, 120)
    groups = sim.groups()
    assert len(groups) == 2
    coordinators = {sim.nodes[next(iter(g))].node.belief.coordinator for g in groups}
    assert len(coordinators) == 2  # one per side: each keeps scheduling its own devices

    # Both sides place work during the partition.
    sim.submit("n01", "left-side", ["sleep", "1"], 500, 1024)
    sim.submit("n30", "right-side", ["sleep", "1"], 500, 1024)
    sim.run_for(20)
    assert sim.terminal_jobs().get("left-side") == "succeeded"
    assert sim.terminal_jobs().get("right-side") == "succeeded"

    sim.heal()
    settle(sim, 120)
    beliefs = {sim.nodes[n].node.belief for n in sim.up_nodes()}
    assert len(beliefs) == 1, beliefs
    terms = {b.term for b in beliefs}
    assert max(terms) > 1


def test_same_seed_same_history() -> None:
    def run() -> tuple[object, ...]:
        sim = build(7, 12, LinkFaults(loss=0.05, duplicate=0.02))
        sim.run_for(20)
        sim.crash("n03")
        sim.run_for(20)
        return (sim.stats["packets"], sim.stats["bytes"],
                tuple(sorted((n, s.node.belief.term) for n, s in sim.nodes.items() if s.up)))

    assert run() == run()


def test_owner_refusal_requeues_and_never_overcommits() -> None:
    # One small device, many requests at once: the coordinator's view lags the owner's
    # books, so some lease requests are refused; they go back to the queue and finish later.
    sim = Simulator(11, membership=PRESETS["local"])
    sim.add_node("a")
    sim.add_node("b", [Device("gpu0", "gpu", "sim-gpu", 8192, "sim")], join=["a"])
    sim.run_for(5)
    for j in range(12):
        sim.submit("a", f"j{j}", ["sleep", "1"], 500, 4096)
    sim.run_for(60)
    done = sim.terminal_jobs()
    assert len(done) == 12 and set(done.values()) == {"succeeded"}


def test_whole_devices_on_one_node_all_or_nothing() -> None:
    """A job that asks for two whole GPUs gets two on one node, under one lease; a node with
    a single GPU never takes it, and a third such job waits for the first to end."""
    sim = Simulator(7, membership=PRESETS["lan"])
    sim.add_node("big", [gpu(i) for i in range(4)])
    sim.add_node("one", [gpu(0)], join=["big"])
    sim.add_node("desk", [], join=["big"])
    settle(sim, 30)
    for j in range(3):
        sim.submit("desk", f"pair{j}", ["sleep", str(10 + 10 * j)], 1000, 4096, count=2)
    sim.run_for(8)  # the origin re-asks the coordinator and learns why it waits
    jobs = [sim.job(f"pair{j}") for j in range(3)]
    running = [j for j in jobs if j is not None and j.state == "running"]
    waiting = [j for j in jobs if j is not None and j.state == "queued"]
    assert len(running) == 2 and len(waiting) == 1, jobs
    for job in running:
        assert job.node == "big" and len(set(job.devices)) == 2
    assert not set(running[0].devices) & set(running[1].devices)
    assert "2 devices" in waiting[0].reason
    leases = sim.nodes["big"].node.leases.active()
    assert sorted(len(x.devices) for x in leases) == [2, 2]
    sim.run_for(40)
    done = sim.terminal_jobs()
    assert {done[f"pair{j}"] for j in range(3)} == {"succeeded"}, done
    last = sim.job(waiting[0].id)
    assert last is not None and last.node == "big" and len(last.devices) == 2


def test_a_higher_priority_job_preempts_only_preemptible_ones() -> None:
    """Both GPUs are busy: one with two preemptible halves, one with a job that did not
    agree to be preempted. A priority-10 job takes the first GPU; the two halves are
    preempted, requeued and finish later; the other job is never touched."""
    sim = Simulator(11, membership=PRESETS["lan"])
    sim.add_node("a", [gpu(0)])
    sim.add_node("b", [gpu(0)], join=["a"])
    sim.add_node("desk", [], join=["a"])
    settle(sim, 30)
    sim.submit("desk", "keep", ["sleep", "60"], 1000, 1024)
    sim.run_for(3)
    keep = sim.job("keep")
    assert keep is not None and keep.state == "running"
    other = "a" if keep.node == "b" else "b"
    for j in range(2):
        sim.submit("desk", f"low{j}", ["sleep", "20"], 500, 1024, preemptible=True)
    sim.run_for(3)
    assert {sim.job(f"low{j}").node for j in range(2)} == {other}  # type: ignore[union-attr]
    sim.submit("desk", "urgent", ["sleep", "5"], 1000, 2048, priority=10)
    sim.run_for(5)
    urgent = sim.job("urgent")
    assert urgent is not None and urgent.state == "running" and urgent.node == other
    for j in range(2):
        low = sim.job(f"low{j}")
        assert low is not None and low.state == "queued", low
        assert "preempted for job urgent (priority 10)" in low.reason, low
        assert low.attempts == 1, low  # requeued once (late reports of the old run ignored)
    assert sim.nodes[other].node.counters.get("preempted") == 2
    # The owner is the authority: a job that did not agree is never stopped, and a
    # coordinator of an older term is not obeyed.
    owner = sim.nodes[keep.node].node
    term = owner.leases.max_term
    reply = owner.handle_request(wire.Preempt(["keep"], "want it", term, "x"), sim.now)
    assert isinstance(reply, wire.Error) and "no preemptible job" in reply.reason
    reply = owner.handle_request(wire.Preempt(["keep"], "want it", term - 1, "x"), sim.now)
    assert isinstance(reply, wire.Error) and "stale" in reply.reason
    sim.run_for(80)
    done = sim.terminal_jobs()
    assert {done[j] for j in ("keep", "urgent", "low0", "low1")} == {"succeeded"}, done
    keep = sim.job("keep")
    assert keep is not None and keep.attempts <= 1  # started once, never preempted


def borrowed_job_then_owner_leaves(seed: int, seconds: int) -> Simulator:
    """A job from "desk" runs on "owner", which then stops gracefully (its jobs go on)."""
    sim = Simulator(seed, membership=PRESETS["lan"])
    sim.add_node("coord", [])
    sim.add_node("owner", [gpu(0)], join=["coord"])
    sim.add_node("desk", [], join=["coord"])
    settle(sim, 30)
    sim.submit("desk", "long", ["sleep", str(seconds)], 500, 1024)
    sim.run_for(5)
    job = sim.job("long")
    assert job is not None and job.state == "running" and job.node == "owner"
    sim.leave("owner")
    return sim


def test_an_owner_that_leaves_and_comes_back_keeps_its_borrowed_jobs() -> None:
    """An upgrade: the owner stops gracefully and starts again. The submitter does not call
    the job lost; it follows it again once the owner is back."""
    sim = borrowed_job_then_owner_leaves(5, 120)
    sim.run_for(20)
    job = sim.job("long")
    assert job is not None and job.state == "running", job
    assert "left the mesh" in job.reason and "followed again" in job.reason
    sim.restart("owner", join=["coord"])
    sim.run_for(20)
    job = sim.job("long")
    assert job is not None and job.state == "running" and job.reason == "", job
    sim.run_for(120)
    job = sim.job("long")
    # Re-adopted, not a child of the new instance: its supervisor recorded how it ended.
    assert job is not None and job.state == "succeeded" and job.exit_code == 0, job


def test_an_owner_that_never_comes_back_loses_its_jobs_after_the_limit() -> None:
    sim = borrowed_job_then_owner_leaves(6, 5000)
    limit = sim.nodes["desk"].node.config.owner_away_limit
    sim.run_for(limit - 30)
    job = sim.job("long")
    assert job is not None and job.state == "running"
    sim.run_for(60)
    job = sim.job("long")
    assert job is not None and job.state == "lost" and "not back within" in job.reason, job


def test_a_cancel_that_cannot_reach_the_owner_is_told_again() -> None:
    sim = Simulator(8, membership=PRESETS["lan"])
    sim.add_node("owner", [gpu(0)])
    sim.add_node("desk", [], join=["owner"])
    settle(sim, 30)
    sim.submit("desk", "long", ["sleep", "300"], 500, 1024)
    sim.run_for(5)
    job = sim.job("long")
    assert job is not None and job.state == "running" and job.node == "owner"
    sim.cut("desk", "owner")
    assert sim.nodes["desk"].node.cancel("long", sim.now) == "cancelling"
    sim.run_for(3)  # the call failed; the job still runs there
    assert sim.nodes["owner"].node.owner.runs["long"].state == "running"
    sim.heal()
    sim.run_for(15)
    job = sim.job("long")
    assert job is not None and job.state == "cancelled", job
    assert sim.nodes["owner"].node.owner.runs["long"].state == "cancelled"


# --- gangs ---------------------------------------------------------------------------------


def gang_mesh(seed: int) -> Simulator:
    sim = Simulator(seed, membership=PRESETS["lan"])
    sim.add_node("a", [gpu(0)])
    for n in "bc":
        sim.add_node(n, [gpu(0)], join=["a"])
    sim.add_node("desk", [], join=["a"])
    settle(sim, 30)
    return sim


def test_a_gang_runs_on_nodes_of_its_own_all_at_once() -> None:
    """Three members on three nodes, started together and told where each rank runs; a
    gang of four, one more than there are nodes to lend, waits with nothing reserved."""
    sim = gang_mesh(3)
    ids = sim.submit_gang("desk", "g1", 3, ["sleep", "20"], 500, 1024)
    big = sim.submit_gang("desk", "g2", 4, ["sleep", "5"], 500, 1024)
    sim.run_for(8)
    jobs = [sim.job(i) for i in ids]
    assert all(j is not None and j.state == "running" for j in jobs), jobs
    nodes = [j.node for j in jobs if j is not None]
    assert sorted(nodes) == ["a", "b", "c"]
    envs = {job: env for _, job, env in sim.runs}
    for rank, job_id in enumerate(ids):
        env = envs[job_id]
        assert env["FLEXMESH_GANG"] == "g1" and env["FLEXMESH_GANG_SIZE"] == "3"
        assert env["FLEXMESH_GANG_RANK"] == str(rank)
        assert env["FLEXMESH_GANG_NODES"].split(",") == nodes
        assert len(env["FLEXMESH_GANG_ADDRS"].split(",")) == 3
    for job_id in big:
        job = sim.job(job_id)
        assert job is not None and job.state == "queued"
        assert job.reason.startswith("impossible: a gang of 4 needs as many nodes")
    for n in "abc":
        held = [x.job_id for x in sim.nodes[n].node.leases.active()]
        assert all(h.startswith("g1.") for h in held), (n, held)
    sim.run_for(30)
    done = sim.terminal_jobs()
    assert {done[i] for i in ids} == {"succeeded"}, done
    sim.run_for(30)  # the impossible gang's grace (60 s) is over: every member fails
    for job_id in big:
        job = sim.job(job_id)
        assert job is not None and job.state == "failed", job
        assert job.reason == ("impossible: a gang of 4 needs as many nodes; 3 node(s) of the "
                              "mesh have the devices one member asks for")
    # submitted on a node that lends too: its own member is told of the gang as well
    mine = sim.submit_gang("a", "g3", 3, ["sleep", "5"], 500, 1024)
    sim.run_for(8)
    envs = {job: env for _, job, env in sim.runs}
    assert [envs[i]["FLEXMESH_GANG_RANK"] for i in mine] == ["0", "1", "2"]


def test_a_gang_member_refused_gives_the_others_leases_back() -> None:
    """One owner refuses (its devices were taken between its gossip and the request): the
    two leases the others granted are given back at once, and the gang waits whole; it is
    placed once the third node lends again."""
    sim = gang_mesh(4)
    ids = sim.submit_gang("desk", "g", 3, ["sleep", "10"], 500, 1024)
    c = sim.nodes["c"]
    c.node.set_devices(c.devices, {c.devices[0].id: (0, 0)}, sim.now)  # c's own work takes it all
    sim.run_for(1.0)
    assert all(not sim.nodes[n].node.leases.active() for n in "abc")
    released = [x for n in "ab" for x in sim.nodes[n].node.leases.leases.values()]
    assert released and all(x.state == "released" for x in released), released
    for job_id in ids:
        job = sim.job(job_id)
        assert job is not None and job.state == "queued"
    sim.run_for(10)
    assert all(not sim.nodes[n].node.leases.active() for n in "abc")  # two nodes: no gang
    c.node.set_devices(c.devices, {}, sim.now)
    sim.run_for(30)
    done = sim.terminal_jobs()
    assert {done[i] for i in ids} == {"succeeded"}, done


def test_a_gang_ends_together_when_a_member_is_lost() -> None:
    """The owner of one member dies and is not back within the grace: that member is lost
    (a gang's member is not requeued alone) and the others are stopped."""
    sim = gang_mesh(5)
    ids = sim.submit_gang("desk", "g", 3, ["sleep", "300"], 500, 1024)
    sim.run_for(8)
    jobs = {i: sim.job(i) for i in ids}
    assert all(j is not None and j.state == "running" for j in jobs.values()), jobs
    victim = next(i for i, j in jobs.items() if j is not None and j.node == "b")
    sim.crash("b")
    sim.run_for(40)
    assert victim not in sim.terminal_jobs()  # (within the grace: it may run on)
    sim.run_for(60)
    done = sim.terminal_jobs()
    assert done[victim] == "lost"
    assert "out of reach for 60 s" in sim.job(victim).reason  # type: ignore[union-attr]
    others = [i for i in ids if i != victim]
    assert {done[i] for i in others} == {"cancelled"}, done
    for i in others:
        job = sim.job(i)
        assert job is not None and f"gang member {victim} lost" in job.reason
    assert all(not sim.nodes[n].node.leases.active() for n in "ac")


def test_a_gang_whose_origin_restarts_without_a_member_ends_whole() -> None:
    """The origin lends too and runs rank 0; it crashes and its process is gone when it
    comes back: that member is lost, and the members it reads after it are stopped."""
    sim = gang_mesh(6)
    ids = sim.submit_gang("a", "g", 3, ["sleep", "300"], 500, 1024)
    sim.run_for(8)
    job = sim.job("g.0")
    assert job is not None and job.node == "a" and job.state == "running"
    sim.crash("a")
    sim.run_for(1)
    sim.restart("a", ["b"])
    sim.run_for(60)
    a = sim.nodes["a"].node
    assert a.origin.jobs["g.0"].state == "lost"
    assert {a.origin.jobs[i].state for i in ids[1:]} == {"cancelled"}
    assert all(not sim.nodes[n].node.leases.active() for n in "bc")


def test_cancelling_a_member_that_waits_for_its_gang_gives_its_lease_back() -> None:
    """Rank 0 has its placement (here: its own node's lease), rank 1 has none yet. The
    user cancels rank 0: nothing was started, the lease is given back at once, and the
    rank still queued is cancelled with it rather than left waiting."""
    sim = Simulator(3, membership=PRESETS["lan"])
    sim.add_node("a", [gpu(0)])
    sim.add_node("b", [gpu(0)], join=["a"])
    settle(sim, 30)
    sim.isolate("a")  # no coordinator answers rank 1
    a = sim.nodes["a"].node
    assert sim.submit_gang("a", "g", 2, ["sleep", "300"], 500, 1024) == ["g.0", "g.1"]
    lease = a.leases.request(job_id="g.0", device="gpu0", compute_milli=500, memory_mib=1024,
                             term=a.leases.max_term, coordinator="a", origin="a",
                             now=sim.now, ttl=a.config.lease_ttl)
    assert isinstance(lease, Lease)
    a.handle_request(wire.Placed("g.0", "a", "gpu0", lease.id, lease.token, lease.term, []),
                     sim.now)
    assert a.origin.jobs["g.0"].state == "placed" and a.origin.jobs["g.1"].state == "queued"
    assert a.cancel("g.0", sim.now) == "cancelled"
    assert not a.leases.active()
    g1 = a.origin.jobs["g.1"]
    assert g1.state == "cancelled" and "gang member g.0" in g1.reason
    sim.run_for(20)
    assert [job for _, job, _ in sim.runs] == []
