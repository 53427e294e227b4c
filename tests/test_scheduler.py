"""The coordinator's queue over its incremental index: bookings, answers, re-indexing."""

from __future__ import annotations

import random

import pytest

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


def test_a_booking_survives_new_gossip_of_its_node_until_the_owner_answers() -> None:
    s = scheduler()
    s.enqueue(submit("j1", 600), 0.0)
    s.enqueue(submit("j2", 600), 0.0)
    (first,) = proposals(s.propose(gpus("a", 1), 0.0))
    assert first.job_id == "j1"
    # the owner's next gossip does not show j1's grant yet (another list, same figures),
    # and then one that shows someone else's use: j1's 600 stays booked on top of both
    assert proposals(s.propose(gpus("a", 1), 1.0)) == []
    assert proposals(s.propose(gpus("a", 1, free=900), 2.0)) == []
    s.refused("j1", "busy", 3.0)  # the answer gives the booking back
    (again,) = proposals(s.propose(gpus("a", 1, free=900), 5.0))
    assert again.job_id in {"j1", "j2"}


def test_a_node_with_other_devices_is_indexed_anew_with_its_bookings() -> None:
    s = scheduler()
    s.enqueue(submit("j1", 600), 0.0)
    s.enqueue(submit("j2", 600), 0.0)
    (first,) = proposals(s.propose(gpus("a", 1), 0.0))
    assert first.job_id == "j1"
    # the node reports a second device: replaced in the index, j1's booking kept on gpu0
    (second,) = proposals(s.propose(gpus("a", 2), 1.0))
    assert second.job_id == "j2" and second.placement.device == "gpu1"
    assert [d.free_c for d in s._cluster.nodes["a"].devs] == [400, 400]


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


def test_a_node_that_leaves_the_view_after_an_answer_leaves_the_index() -> None:
    s = scheduler()
    s.enqueue(submit("j1"), 0.0)
    (p,) = proposals(s.propose(gpus("a", 1) + gpus("b", 1), 0.0))
    s.refused("j1", "gone", 1.0)
    gone = p.placement.node
    rest = [c for c in gpus("a", 1) + gpus("b", 1) if c.node != gone]
    (again,) = proposals(s.propose(rest, 2.0))
    assert again.placement.node != gone
    assert gone not in s._cluster.nodes


def test_losing_the_role_forgets_queue_and_bookings() -> None:
    s = scheduler()
    view = {"a": gpus("a", 1)}
    s.enqueue(submit("j1"), 0.0)
    assert proposals(s.propose(view, 0.0))
    s.reset()  # another node is coordinator now; later this one is again
    s.enqueue(submit("j2"), 5.0)
    (p,) = proposals(s.propose(view, 5.0))  # the same, unchanged view: not booked for j1
    assert p.job_id == "j2"


def test_a_victim_is_not_chosen_again_while_it_stops() -> None:
    s = scheduler()
    s.running = [RunningJob("low0", "a", ("gpu0",), 1000, 1024, priority=0, preemptible=True),
                 RunningJob("low1", "b", ("gpu0",), 1000, 1024, priority=0, preemptible=True)]
    full = [*gpus("a", 1, free=0), *gpus("b", 1, free=0)]
    s.enqueue(submit("u1", priority=5), 0.0)
    (o1,) = s.propose(full, 0.0)
    s.enqueue(submit("u2", priority=5), 1.0)
    (o2,) = s.propose(full, 1.0)  # gossip still lists low0: it is not picked twice
    assert isinstance(o1, PreemptOrder) and isinstance(o2, PreemptOrder)
    assert {o1.victims, o2.victims} == {("low0",), ("low1",)}


def test_a_refused_preemption_does_not_hold_the_request() -> None:
    s = scheduler()
    s.running = [RunningJob("low", "a", ("gpu0",), 1000, 1024, priority=0, preemptible=True)]
    s.enqueue(submit("u", priority=5), 0.0)
    assert isinstance(s.propose(gpus("a", 1, free=0), 0.0)[0], PreemptOrder)
    s.preempt_failed("u")
    s._doomed.clear()  # the owner said no: its gossip will no longer list it
    assert isinstance(s.propose(gpus("a", 1, free=0), 1.0)[0], PreemptOrder)


def test_one_jobs_devices_are_of_one_kind() -> None:
    s = scheduler()
    mixed = [Candidate("a", "gpu0", "gpu", "sim-gpu", 1000, 16384, 1000, 16384),
             Candidate("a", "npu0", "npu", "sim-npu", 1000, 16384, 1000, 16384)]
    s.enqueue(wire.Submit("pair", "desk", 1000, 0, "any", 0, 0, 2), 0.0)
    assert proposals(s.propose(mixed, 0.0)) == []
    assert s.queue["pair"].reason.startswith(  # (never: the node has one of each kind)
        "impossible: 2 devices asked on one node; no node has more than 1 of one model")
    s.enqueue(wire.Submit("two", "desk", 1000, 0, "any", 0, 0, 2), 1.0)
    (p,) = proposals(s.propose([*mixed, Candidate("a", "gpu1", "gpu", "sim-gpu", 1000, 16384,
                                                  1000, 16384)], 1.0))
    assert sorted(p.placement.devices) == ["gpu0", "gpu1"]


def test_gossip_that_lists_a_device_twice_is_skipped_not_raised() -> None:
    s = scheduler()
    twice = gpus("a", 1) + gpus("a", 1)
    s.enqueue(submit("j1"), 0.0)
    (p,) = proposals(s.propose(twice + gpus("b", 1), 0.0))
    assert p.placement.node == "b"
    assert s.counters["bad_views"] == 1


class Mesh:
    """The truth behind the coordinator's view in a random history: nodes with their GPU
    counts, the compute in use on each device, and the jobs running (node, devices, compute
    per device)."""

    def __init__(self, nodes: dict[str, int]) -> None:
        self.nodes = nodes
        self.used: dict[tuple[str, str], int] = {}
        self.running: list[tuple[str, tuple[str, ...], int]] = []

    def view(self) -> list[Candidate]:
        return [Candidate(n, f"gpu{i}", "gpu", "sim-gpu", 1000, 16384,
                          1000 - self.used.get((n, f"gpu{i}"), 0), 16384)
                for n, count in self.nodes.items() for i in range(count)]

    def fits(self, p: Proposal) -> bool:
        """Whether the proposal still fits: other grants may have come first."""
        return all(self.used.get((p.placement.node, d), 0) + p.submit.compute_milli <= 1000
                   for d in p.placement.devices)

    def start(self, p: Proposal) -> None:
        for d in p.placement.devices:
            key = (p.placement.node, d)
            self.used[key] = self.used.get(key, 0) + p.submit.compute_milli
        self.running.append((p.placement.node, p.placement.devices, p.submit.compute_milli))

    def end_some(self, rng: random.Random) -> None:
        for _ in range(rng.randrange(3)):
            if self.running:
                node, devs, compute = self.running.pop(rng.randrange(len(self.running)))
                for d in devs:
                    self.used[(node, d)] -= compute


def submit_some(s: Scheduler, rng: random.Random, jobs: int, now: float) -> int:
    """Up to three new jobs of the usual sizes; the number of jobs submitted so far."""
    for _ in range(rng.randrange(4)):
        jobs += 1
        compute = rng.choice([100, 250, 500, 1000])
        count = rng.choice([1, 1, 1, 2]) if compute == 1000 else 1
        s.enqueue(wire.Submit(f"j{jobs}", "desk", compute, 0, "gpu", rng.randrange(3), 0,
                              count), now)
    return jobs


def propose_honestly(s: Scheduler, view: list[Candidate], out: dict[str, Proposal],
                     now: float) -> None:
    """One round, checked: no job is proposed while it has a proposal out, and what the
    round proposes fits what the view showed free."""
    free = {(c.node, c.device): c.free_compute_milli for c in view}
    round_use: dict[tuple[str, str], int] = {}
    for p in proposals(s.propose(view, now)):
        assert p.job_id not in out, "proposed twice while its proposal is out"
        out[p.job_id] = p
        for d in p.placement.devices:
            key = (p.placement.node, d)
            round_use[key] = round_use.get(key, 0) + p.submit.compute_milli
            assert round_use[key] <= free[key], "one round proposed beyond the view"


def answer_some(s: Scheduler, rng: random.Random, mesh: Mesh, out: dict[str, Proposal],
                now: float) -> None:
    """Owners answer some of the proposals out: a grant where it still fits (mostly),
    else a refusal."""
    for job_id in list(out):
        if rng.random() < 0.6:
            p = out.pop(job_id)
            devs = p.placement.devices
            if mesh.fits(p) and rng.random() < 0.8:
                mesh.start(p)
                s.granted(job_id, wire.Placed(job_id, p.placement.node, devs[0], "l", 1, 1,
                                              list(devs[1:])), p.submit.compute_milli, 0,
                          0, now)
                s.shadows.clear()  # the owner's gossip shows it at once here
            else:
                s.refused(job_id, "no", now)


def withdraw_or_step_down(s: Scheduler, rng: random.Random, out: dict[str, Proposal]) -> None:
    if rng.random() < 0.05:  # a queued job is withdrawn
        queued = [j for j in s.queue if j not in out]
        if queued:
            s.withdraw(rng.choice(queued))
    if rng.random() < 0.02:  # another node is coordinator for a while
        s.reset()
        out.clear()


@pytest.mark.parametrize("seed", range(12))
def test_random_histories_keep_the_queue_honest(seed: int) -> None:
    """Random submits, answers, withdrawals, role changes and jobs ending, against a model
    of the truth. In every round: no job is proposed while it has a proposal out, and what
    one round proposes fits what the view showed free. At the end, with room everywhere,
    every job still queued is proposed: nothing is lost in the heaps."""
    rng = random.Random(seed)
    s = scheduler()
    mesh = Mesh({f"n{i}": 2 for i in range(6)})
    out: dict[str, Proposal] = {}
    now = 0.0
    jobs = 0
    for _ in range(300):
        now += rng.choice([0.1, 0.5, 1.5])
        jobs = submit_some(s, rng, jobs, now)
        propose_honestly(s, mesh.view(), out, now)
        answer_some(s, rng, mesh, out, now)
        mesh.end_some(rng)
        withdraw_or_step_down(s, rng, out)
    # Everything answered and ended: every queued job is proposed within a few rounds.
    for job_id in out:
        s.refused(job_id, "no", now)
    waiting = set(s.queue)
    roomy = Mesh({f"m{i}": 2 for i in range(len(waiting) + 1)})  # room for all at once
    for _ in range(len(waiting) // 64 + 3):
        now += 2.0
        for p in proposals(s.propose(roomy.view(), now)):
            waiting.discard(p.job_id)
    assert not waiting, f"{len(waiting)} queued jobs were never tried again"


def gang_submit(gang: str, rank: int, size: int, compute: int = 500) -> wire.Submit:
    return wire.Submit(f"{gang}.{rank}", "desk", compute, 1024, "gpu", 0, 0, 1, False, gang,
                       size, rank)


def test_a_gang_is_placed_whole_on_distinct_nodes_once_all_members_are_here() -> None:
    s = scheduler()
    view = [c for n in ("a", "b", "c") for c in gpus(n, 2)]
    s.enqueue(gang_submit("g", 0, 3), 0.0)
    s.enqueue(gang_submit("g", 1, 3), 0.0)
    assert proposals(s.propose(view, 0.0)) == []  # the third member is not here yet
    assert "2 of 3 here" in s.queue["g.0"].reason
    s.enqueue(gang_submit("g", 2, 3), 0.5)
    got = proposals(s.propose(view, 1.0))
    assert sorted(p.job_id for p in got) == ["g.0", "g.1", "g.2"]
    assert sorted(p.placement.node for p in got) == ["a", "b", "c"]
    # one owner refuses: every member goes back, none is proposed alone
    s.refused("g.1", "busy", 1.5)
    assert proposals(s.propose(view, 3.0)) == []  # the others are still out with owners
    for p in got:
        if p.job_id != "g.1":
            s.refused(p.job_id, "gang member g.1 refused", 1.6)
    again = proposals(s.propose(view, 3.0))
    assert sorted(p.job_id for p in again) == ["g.0", "g.1", "g.2"]
    assert len({p.placement.node for p in again}) == 3


def test_a_gang_bigger_than_the_mesh_waits_and_books_nothing() -> None:
    s = scheduler()
    view = [c for n in ("a", "b") for c in gpus(n, 4)]
    for r in range(3):
        s.enqueue(gang_submit("g", r, 3), 0.0)
    s.enqueue(submit("solo", 500), 0.0)
    got = proposals(s.propose(view, 0.0))
    assert [p.job_id for p in got] == ["solo"]
    assert s.queue["g.0"].reason.startswith("impossible: a gang of 3 needs as many nodes")
    assert sum(d.free_c for rec in s._cluster.nodes.values() for d in rec.devs) == 7500


def test_a_shadowed_device_keeps_its_node_facts() -> None:
    s = scheduler()
    cand = Candidate("a", "gpu0", "gpu", "sim-gpu", 1000, 16384, 1000, 16384,
                     node_cpu_milli=8000, node_cpu_free_milli=4000, battery_pct=30,
                     battery_floor_pct=20)
    s.granted("j", wire.Placed("j", "a", "gpu0", "l", 1, 1), 400, 1024, 5, 0.0)
    (shadowed,) = s.shadows.apply([cand])
    assert (shadowed.free_compute_milli, shadowed.free_memory_mib) == (600, 15360)
    assert (shadowed.node_cpu_free_milli, shadowed.battery_pct) == (4000, 30)
    assert shadowed.battery_floor_pct == 20
