"""Requests no device of the mesh could ever hold: told ``impossible: ...``, failed after
the grace unless they wait for capacity; busy is only ``waiting: ...`` (sans-IO)."""

from __future__ import annotations

from collections.abc import Sequence

from flexmesh.agent.scheduler import Impossible, Proposal, Scheduler
from flexmesh.policies import DEFAULT_POLICY, Candidate, get_policy, get_spec
from flexmesh.protocol import wire

GRACE = 10.0


def devices(node: str, n: int, kind: str = "gpu", memory: int = 16384,
            free: int = 1000) -> list[Candidate]:
    free_mem = memory if free else 0
    return [Candidate(node, f"{kind}{i}", kind, f"sim-{kind}-{memory}", 1000, memory, free,
                      free_mem) for i in range(n)]


def submit(job: str, compute: int = 1000, memory: int = 1024, kind: str = "gpu",
           count: int = 1, wait: bool = False, gang: str = "", size: int = 0,
           rank: int = 0) -> wire.Submit:
    return wire.Submit(job, "desk", compute, memory, kind, 0, 0, count, False, gang, size, rank,
                       wait)


def scheduler() -> Scheduler:
    s = Scheduler(get_policy(DEFAULT_POLICY), spec=get_spec(DEFAULT_POLICY))
    s.never_fit.grace = GRACE
    return s


def failures(out: Sequence[object]) -> list[Impossible]:
    return [p for p in out if isinstance(p, Impossible)]


def run_until(s: Scheduler, view: list[Candidate], until: float,
              start: float = 0.0) -> list[Impossible]:
    """Propose every second from ``start`` to ``until``; the failures ordered meanwhile."""
    got: list[Impossible] = []
    t = start
    while t <= until:
        got += failures(s.propose(view, t))
        t += 1.0
    return got


def test_a_kind_no_node_has_is_impossible_then_fails_after_the_grace() -> None:
    s = scheduler()
    view = devices("a", 2)
    s.enqueue(submit("j", kind="npu"), 0.0)
    assert run_until(s, view, GRACE - 1) == []
    reason = s.queue["j"].reason
    assert reason.startswith("impossible: no npu device in the mesh"), reason
    (fail,) = failures(s.propose(view, GRACE))
    assert fail.origin == "desk" and fail.msg.job_id == "j" and fail.msg.attempt == 0
    assert fail.msg.reason == "impossible: no npu device in the mesh"
    assert "j" not in s.queue
    # the origin asks again (it had not heard yet): told the same, not queued again
    assert s.enqueue(submit("j", kind="npu"), GRACE + 1) == fail.msg
    assert "j" not in s.queue


def test_more_memory_than_any_device_of_its_kind_has_is_impossible() -> None:
    s = scheduler()
    view = devices("a", 2) + devices("b", 1, kind="npu", memory=65536)
    s.enqueue(submit("big", memory=32768), 0.0)  # only the NPU has that much
    s.enqueue(submit("fits", memory=32768, kind="any"), 0.0)
    out = s.propose(view, 0.0)
    assert [p.job_id for p in out if isinstance(p, Proposal)] == ["fits"]
    assert s.queue["big"].reason.startswith(
        "impossible: 32 GiB of memory asked per device; the largest gpu device in the mesh "
        "has 16 GiB")
    assert [f.msg.job_id for f in run_until(s, view, GRACE + 1)] == ["big"]


def test_a_request_in_proportion_is_impossible_only_beyond_every_device() -> None:
    s = scheduler()
    busy = devices("a", 2, free=0) + devices("b", 1, memory=81920, free=0)
    s.enqueue(submit("mem-only", compute=0, memory=40960), 0.0)  # fits the 80 GiB one
    s.enqueue(submit("gpu-only", compute=500, memory=0), 0.0)
    s.enqueue(submit("too-big", compute=0, memory=90000), 0.0)
    assert [f.msg.job_id for f in run_until(s, busy, 3 * GRACE)] == ["too-big"]
    for job in ("mem-only", "gpu-only"):
        assert s.queue[job].reason.startswith("waiting:"), s.queue[job].reason


def test_more_whole_devices_than_any_node_has_is_impossible() -> None:
    s = scheduler()
    view = devices("a", 2) + devices("b", 3, memory=8192)
    s.enqueue(submit("four", count=4), 0.0)
    s.enqueue(submit("three-big", count=3, memory=10000), 0.0)  # b's three are too small
    s.enqueue(submit("three", count=3, memory=8192), 0.0)
    out = s.propose(view, 0.0)
    assert [p.job_id for p in out if isinstance(p, Proposal)] == ["three"]
    assert s.queue["four"].reason.startswith(
        "impossible: 4 gpu devices asked on one node; no node has more than 3")
    assert s.queue["three-big"].reason.startswith(
        "impossible: 3 gpu devices asked on one node; no node has more than 2")
    assert sorted(f.msg.job_id for f in run_until(s, view, GRACE + 1)) == ["four", "three-big"]


def test_a_gang_larger_than_the_nodes_with_its_devices_fails_whole() -> None:
    s = scheduler()
    view = devices("a", 4) + devices("b", 4) + devices("c", 1, kind="npu")
    for r in range(3):
        s.enqueue(submit(f"g.{r}", compute=500, gang="g", size=3, rank=r), 0.0)
    assert run_until(s, view, GRACE - 1) == []
    assert s.queue["g.0"].reason.startswith(
        "impossible: a gang of 3 needs as many nodes; 2 node(s) of the mesh")
    got = failures(s.propose(view, GRACE))
    assert sorted(f.msg.job_id for f in got) == ["g.0", "g.1", "g.2"]
    assert not s.queue and not s.gangs


def test_busy_is_waiting_and_never_fails() -> None:
    s = scheduler()
    s.enqueue(submit("j", count=2), 0.0)
    assert run_until(s, devices("a", 2, free=0), 10 * GRACE) == []
    assert s.queue["j"].reason.startswith("waiting:")


def test_capacity_that_joins_within_the_grace_places_the_request() -> None:
    s = scheduler()
    s.enqueue(submit("j", kind="npu"), 0.0)
    assert run_until(s, devices("a", 1), GRACE - 2) == []
    out = s.propose(devices("a", 1) + devices("n", 1, kind="npu"), GRACE - 1)
    assert [p.job_id for p in out if isinstance(p, Proposal)] == ["j"]
    # it was refused there and the NPU node left: its grace starts again from now
    s.refused("j", "busy", GRACE)
    assert run_until(s, devices("a", 1), 2 * GRACE, start=GRACE + 1) == []
    assert s.queue["j"].reason.startswith("impossible:")
    assert len(failures(s.propose(devices("a", 1), 2 * GRACE + 1))) == 1


def test_a_request_that_waits_for_capacity_never_fails() -> None:
    s = scheduler()
    s.enqueue(submit("j", kind="npu", wait=True), 0.0)
    assert run_until(s, devices("a", 1), 10 * GRACE) == []
    assert s.queue["j"].reason == "impossible: no npu device in the mesh (waiting for capacity)"
    out = s.propose(devices("n", 1, kind="npu"), 10 * GRACE + 1)
    assert [p.job_id for p in out if isinstance(p, Proposal)] == ["j"]
