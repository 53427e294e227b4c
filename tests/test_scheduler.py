"""The coordinator's queue over its incremental index: bookings, answers, re-indexing."""

from __future__ import annotations

from flexmesh.agent.scheduler import PreemptOrder, Proposal, Scheduler
from flexmesh.policies import DEFAULT_POLICY, Candidate, RunningJob, get_policy, get_spec
from flexmesh.protocol import wire


def gpus(node: str, n: int, free: int = 1000) -> list[Candidate]:
    return [Candidate(node, f"gpu{i}", "gpu", "sim-gpu", 1000, 16384, free, 16384)
            for i in range(n)]


def submit(job: str, compute: int = 1000, priority: int = 0, count: int = 1) -> wire.Submit:
    return wire.Submit(job, "desk", compute, 1024, "gpu", priority, 0, count)


def scheduler() -> Scheduler:
    return Scheduler(get_policy(DEFAULT_POLICY), spec=get_spec(DEFAULT_POLICY))


def proposals(out: list[Proposal | PreemptOrder]) -> list[Proposal]:
    return [p for p in out if isinstance(p, Proposal)]


def test_a_booked_device_is_not_offered_again_until_the_owner_answers() -> None:
    s = scheduler()
    view = gpus("a", 1)
    s.enqueue(submit("j1"), 0.0)
    s.enqueue(submit("j2"), 0.0)
    (first,) = proposals(s.propose(view, 0.0))
    assert (first.job_id, first.placement.node) == ("j1", "a")
    assert proposals(s.propose(view, 5.0)) == []  # the same gossip: still booked for j1
    s.refused("j1", "busy", 5.0)
    again = proposals(s.propose(view, 10.0))
    assert [p.job_id for p in again] == ["j1"]  # the refusal gave the booking back


def test_only_nodes_whose_view_changed_are_indexed_again() -> None:
    s = scheduler()
    view = [c for n in range(50) for c in gpus(f"n{n:02d}", 8)]
    s.enqueue(submit("j1", 250), 0.0)
    s.propose(view, 0.0)
    before = s._cluster.nodes_version
    changed = [c if c.node != "n07" else Candidate(c.node, c.device, "gpu", "sim-gpu", 1000,
                                                   16384, 500, 8000) for c in view]
    s.enqueue(submit("j2", 250), 1.0)
    s.propose(changed, 1.0)
    # n07 changed; the node j1 was booked on is read afresh only once the owner answers
    assert s._cluster.nodes_version - before == 1
    gone = [c for c in changed if c.node != "n10"]
    s.enqueue(submit("j3", 250), 2.0)
    s.propose(gone, 2.0)
    assert "n10" not in s._cluster.nodes


def test_several_devices_are_proposed_together() -> None:
    s = scheduler()
    s.enqueue(submit("pair", count=2), 0.0)
    (p,) = proposals(s.propose(gpus("a", 1) + gpus("b", 4), 0.0))
    assert p.placement.node == "b" and len(set(p.placement.devices)) == 2


def test_preemption_is_ordered_once_then_held() -> None:
    s = scheduler()
    view = gpus("a", 1, free=0)
    s.running = [RunningJob("low", "a", ("gpu0",), 1000, 1024, priority=0, preemptible=True),
                 RunningJob("keep", "a", ("gpu0",), 1000, 1024, priority=0)]
    s.enqueue(submit("urgent", priority=5), 0.0)
    (order,) = s.propose(view, 0.0)
    assert isinstance(order, PreemptOrder)
    assert (order.node, order.victims, order.job_id) == ("a", ("low",), "urgent")
    assert s.propose(view, 1.0) == []  # victims are stopping: not chosen again at once
    assert "preempting 1" in s.queue["urgent"].reason
    (p,) = proposals(s.propose(gpus("a", 1), 2.0))  # room appeared: placed at once
    assert p.job_id == "urgent"


def test_no_preemption_for_an_equal_priority_or_of_a_willing_higher_one() -> None:
    s = scheduler()
    s.running = [RunningJob("peer", "a", ("gpu0",), 1000, 1024, priority=5, preemptible=True)]
    s.enqueue(submit("same", priority=5), 0.0)
    assert s.propose(gpus("a", 1, free=0), 0.0) == []
    assert s.queue["same"].reason.startswith("waiting: ")
