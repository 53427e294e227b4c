"""The owner's lease table: capacity, fencing, the life cycle as data, and a stateful model."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from flexmesh.protocol.lease import (
    ACTIVE,
    EXPIRED,
    LENT,
    RELEASED,
    RESERVED,
    TRANSITIONS,
    Lease,
    LeaseTable,
    Refusal,
)


def table(**devices: tuple[int, int]) -> LeaseTable:
    t = LeaseTable("owner")
    for name, (compute, memory) in (devices or {"gpu0": (1000, 16384)}).items():
        t.set_device(name, compute, memory)
    return t


def ask(
    t: LeaseTable,
    job: str = "j1",
    device: str = "gpu0",
    compute: int = 250,
    memory: int = 1024,
    term: int = 1,
    now: float = 0.0,
    ttl: float = 30.0,
) -> Lease | Refusal:
    return t.request(
        job_id=job,
        device=device,
        compute_milli=compute,
        memory_mib=memory,
        term=term,
        coordinator="coord",
        origin="origin",
        now=now,
        ttl=ttl,
    )


def granted(result: Lease | Refusal) -> Lease:
    assert isinstance(result, Lease), result
    return result


def refused(result: Lease | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


# --- granting --------------------------------------------------------------------------


def test_a_grant_within_capacity() -> None:
    t = table()
    lease = granted(ask(t, compute=250, memory=4096, term=3, now=10.0, ttl=30.0))
    assert lease.state == RESERVED
    assert lease.token == 1 and lease.id == "owner/1"
    assert (lease.job_id, lease.device) == ("j1", "gpu0")
    assert (lease.compute_milli, lease.memory_mib) == (250, 4096)
    assert (lease.term, lease.coordinator, lease.origin) == (3, "coord", "origin")
    assert (lease.created, lease.expires) == (10.0, 40.0)
    assert t.used("gpu0") == (250, 4096)
    assert t.free("gpu0") == (750, 12288)
    assert t.active() == [lease]


def test_fractions_fill_a_device_exactly() -> None:
    t = table()
    for i in range(4):
        granted(ask(t, job=f"j{i}", compute=250, memory=4096))
    assert t.free("gpu0") == (0, 0)
    refused(ask(t, job="j9", compute=1, memory=0))


def test_refusal_beyond_capacity_says_what_is_free() -> None:
    t = table()
    granted(ask(t, job="j1", compute=750, memory=15360))
    r = refused(ask(t, job="j2", compute=500, memory=512))
    assert "250 milli" in r.reason and "1024 MiB" in r.reason
    assert "500 milli" in r.reason  # and what was asked
    r = refused(ask(t, job="j3", compute=100, memory=2048))  # compute fits, memory does not
    assert "1024 MiB" in r.reason
    assert t.used("gpu0") == (750, 15360)
    assert t.token == 1  # refusals hand out no token


@pytest.mark.parametrize(("compute", "memory"), [(0, 10), (-1, 10), (100, -1)])
def test_refusal_of_empty_or_negative_requests(compute: int, memory: int) -> None:
    t = table()
    refused(ask(t, compute=compute, memory=memory))
    assert t.active() == []


def test_zero_memory_is_a_valid_request() -> None:
    granted(ask(table(), compute=100, memory=0))


def test_unknown_device_is_refused_by_name() -> None:
    r = refused(ask(table(), device="gpu7"))
    assert "gpu7" in r.reason and "owner" in r.reason


def test_re_requesting_the_same_job_is_idempotent() -> None:
    t = table()
    first = granted(ask(t, job="j1"))
    again = granted(ask(t, job="j1"))  # the reply got lost: the coordinator asks again
    assert again is first
    assert t.token == 1
    assert t.used("gpu0") == (250, 1024)


def test_a_job_holds_one_lease_at_a_time() -> None:
    t = table(gpu0=(1000, 16384), gpu1=(1000, 16384))
    first = granted(ask(t, job="j1", device="gpu0"))
    r = refused(ask(t, job="j1", device="gpu1"))
    assert first.id in r.reason
    assert t.used("gpu1") == (0, 0)
    t.release(first.id)
    second = granted(ask(t, job="j1", device="gpu1"))  # once released, it may move
    assert second.token > first.token


# --- fencing -----------------------------------------------------------------------------


def test_a_term_below_the_highest_seen_is_refused() -> None:
    t = table()
    granted(ask(t, job="j1", term=5))
    r = refused(ask(t, job="j2", term=4))
    assert r.max_term == 5
    assert "stale" in r.reason and "4" in r.reason and "5" in r.reason
    granted(ask(t, job="j3", term=5))  # the same term is fine
    granted(ask(t, job="j4", term=9))
    r = refused(ask(t, job="j5", term=5))
    assert r.max_term == 9
    assert t.max_term == 9


def test_a_stale_term_is_refused_even_for_a_job_it_already_placed() -> None:
    t = table()
    lease = granted(ask(t, job="j1", term=2))
    granted(ask(t, job="j2", term=3))
    refused(ask(t, job="j1", term=2))  # the old coordinator retries after being replaced
    assert lease.state == RESERVED  # what was granted stays granted


def test_a_refused_request_still_raises_the_term_seen() -> None:
    t = table()
    refused(ask(t, device="nope", term=7))
    refused(ask(t, term=6))
    assert t.max_term == 7


def test_fencing_tokens_strictly_increase() -> None:
    t = table()
    tokens = []
    for i in range(20):
        lease = granted(ask(t, job=f"j{i}", compute=10, memory=0))
        tokens.append(lease.token)
        if i % 3 == 0:
            t.release(lease.id)
        if i % 5 == 0:
            t.forget_finished()
    assert tokens == sorted(set(tokens))
    assert tokens == list(range(1, 21))


# --- the life cycle -----------------------------------------------------------------------


def test_the_transition_table() -> None:
    assert TRANSITIONS == {
        (RESERVED, "start"): LENT,
        (RESERVED, "release"): RELEASED,
        (RESERVED, "expire"): EXPIRED,
        (LENT, "release"): RELEASED,
    }
    assert {RESERVED, LENT} == ACTIVE


def test_start_then_release() -> None:
    t = table()
    lease = granted(ask(t))
    assert granted(t.start(lease.id, "j1", lease.token)).state == LENT
    assert granted(t.start(lease.id, "j1", lease.token)) is lease  # a retried start
    assert t.used("gpu0") == (250, 1024)
    assert t.release(lease.id) is lease
    assert lease.state == RELEASED
    assert t.used("gpu0") == (0, 0)
    assert t.release(lease.id) is None  # twice: nothing more to release
    r = refused(t.start(lease.id, "j1", lease.token))
    assert "released" in r.reason


@pytest.mark.parametrize(
    ("lease_id", "job", "token_delta"),
    [("owner/1", "j1", 1), ("owner/1", "j2", 0), ("owner/9", "j1", 0)],
)
def test_start_needs_the_right_lease_job_and_token(
    lease_id: str, job: str, token_delta: int
) -> None:
    t = table()
    lease = granted(ask(t))
    r = refused(t.start(lease_id, job, lease.token + token_delta))
    assert lease_id in r.reason
    assert lease.state == RESERVED


def test_release_of_a_reservation_and_of_unknown_leases() -> None:
    t = table()
    lease = granted(ask(t))
    assert t.release("owner/42") is None
    assert t.release(lease.id) is lease
    assert lease.state == RELEASED


def test_an_expired_reservation_frees_its_capacity() -> None:
    t = table()
    lease = granted(ask(t, compute=1000, memory=16384, now=100.0, ttl=10.0))
    refused(ask(t, job="j2", now=105.0))
    assert t.next_deadline() == 110.0
    assert t.expire(109.999) == []
    assert lease.state == RESERVED
    assert t.expire(110.0) == [lease]
    assert lease.state == EXPIRED
    assert t.free("gpu0") == (1000, 16384)
    assert t.next_deadline() is None
    granted(ask(t, job="j2", now=110.0))
    r = refused(t.start(lease.id, "j1", lease.token))  # too late to start
    assert "expired" in r.reason
    assert t.release(lease.id) is None


def test_a_started_lease_never_expires() -> None:
    t = table()
    lease = granted(ask(t, now=0.0, ttl=5.0))
    t.start(lease.id, "j1", lease.token)
    assert t.next_deadline() is None
    assert t.expire(1e9) == []
    assert lease.state == LENT


def test_next_deadline_is_the_earliest_reservation() -> None:
    t = table()
    assert t.next_deadline() is None
    granted(ask(t, job="a", compute=100, now=0.0, ttl=30.0))
    b = granted(ask(t, job="b", compute=100, now=0.0, ttl=10.0))
    granted(ask(t, job="c", compute=100, now=5.0, ttl=20.0))
    assert t.next_deadline() == 10.0
    t.start(b.id, "b", b.token)
    assert t.next_deadline() == 25.0


def test_forget_finished_keeps_only_active_leases() -> None:
    t = table()
    a = granted(ask(t, job="a", compute=100, ttl=1.0))
    b = granted(ask(t, job="b", compute=100))
    c = granted(ask(t, job="c", compute=100))
    t.start(c.id, "c", c.token)
    d = granted(ask(t, job="d", compute=100))
    t.release(d.id)
    t.expire(1.0)
    t.forget_finished()
    assert sorted(t.leases) == sorted([b.id, c.id])
    assert a.state == EXPIRED


# --- devices -----------------------------------------------------------------------------


def test_lend_limits() -> None:
    t = LeaseTable("owner")
    t.set_device("gpu0", 1000, 16384, lend_compute=500, lend_memory=8192)
    assert t.capacity("gpu0") == (1000, 16384)
    assert t.free("gpu0") == (500, 8192)
    refused(ask(t, job="j1", compute=600, memory=0))
    refused(ask(t, job="j1", compute=100, memory=9000))
    granted(ask(t, job="j1", compute=500, memory=8192))
    assert t.free("gpu0") == (0, 0)


def test_a_lend_limit_above_capacity_is_clamped() -> None:
    t = LeaseTable("owner")
    t.set_device("gpu0", 1000, 16384, lend_compute=5000, lend_memory=99999)
    assert t.free("gpu0") == (1000, 16384)
    refused(ask(t, compute=1001, memory=0))


def test_lowering_the_lend_limit_below_what_is_lent() -> None:
    """The owner's own workload grew: nothing new is granted, nothing goes negative, and
    what is already lent stays lent (reclaiming is the scheduler's decision)."""
    t = table()
    lease = granted(ask(t, compute=600, memory=8000))
    t.set_device("gpu0", 1000, 16384, lend_compute=300, lend_memory=4000)
    assert t.free("gpu0") == (0, 0)
    refused(ask(t, job="j2", compute=1, memory=0))
    assert lease.state == RESERVED
    t.release(lease.id)
    assert t.free("gpu0") == (300, 4000)


def test_a_device_over_its_limit_on_one_axis_takes_no_new_lease() -> None:
    """Memory alone over the lend limit still blocks a lease that asks for no memory: the
    device is being reclaimed, and new work would only be preempted again (found by the
    stateful model below)."""
    t = table()
    granted(ask(t, job="j0", compute=1, memory=512))
    t.set_device("gpu0", 1000, 16384, lend_memory=0)
    assert "reclaimed" in refused(ask(t, job="j1", compute=1, memory=0)).reason


def ask_many(t: LeaseTable, devices: tuple[str, ...], job: str = "j1", compute: int = 1000,
             memory: int = 1024) -> Lease | Refusal:
    return t.request(job_id=job, device=devices[0], more=devices[1:], compute_milli=compute,
                     memory_mib=memory, term=1, coordinator="c", origin="o", now=0.0, ttl=30.0)


def test_one_lease_holds_several_devices() -> None:
    t = table(gpu0=(1000, 16384), gpu1=(1000, 16384), gpu2=(1000, 16384))
    lease = granted(ask_many(t, ("gpu0", "gpu2"), memory=8000))
    assert lease.devices == ("gpu0", "gpu2")
    assert t.used("gpu0") == t.used("gpu2") == (1000, 8000)
    assert t.used("gpu1") == (0, 0)
    assert ask_many(t, ("gpu0", "gpu2"), memory=8000) is lease  # asked again: the same
    refused(ask_many(t, ("gpu1", "gpu2"), memory=8000))  # the job already holds a lease
    assert Lease.from_dict(lease.to_dict()) == lease
    t.release(lease.id)
    assert t.free("gpu2") == (1000, 16384)


def test_several_devices_are_all_or_nothing() -> None:
    t = table(gpu0=(1000, 16384), gpu1=(1000, 16384))
    granted(ask(t, job="small", device="gpu1", compute=100, memory=0))
    why = refused(ask_many(t, ("gpu0", "gpu1"), job="big")).reason
    assert "gpu1" in why
    assert t.used("gpu0") == (0, 0)  # nothing half-granted
    assert "twice" in refused(ask_many(t, ("gpu0", "gpu0"), job="big")).reason
    assert "no device" in refused(ask_many(t, ("gpu0", "gpu9"), job="big")).reason


def test_removing_one_of_its_devices_ends_a_lease_on_several() -> None:
    t = table(gpu0=(1000, 16384), gpu1=(1000, 16384), gpu2=(1000, 16384))
    reserved = granted(ask_many(t, ("gpu0", "gpu1"), job="a"))
    assert t.remove_device("gpu1") == [reserved]
    assert reserved.state == RELEASED  # nothing runs on it yet
    assert t.free("gpu0") == (1000, 16384)
    running = granted(ask_many(t, ("gpu0", "gpu2"), job="b"))
    granted(t.start(running.id, "b", running.token))
    assert t.remove_device("gpu2") == [running]
    # Its process still runs on gpu0 until it is stopped: gpu0 stays taken till then.
    assert running.state == LENT and t.free("gpu0") == (0, 15360)
    t.release(running.id)
    assert t.free("gpu0") == (1000, 16384)


def test_a_lease_journaled_before_several_devices_still_loads() -> None:
    old = granted(ask(t := table())).to_dict()
    del old["more"]
    assert Lease.from_dict(old).devices == ("gpu0",)
    assert t.leases


def test_remove_device_releases_its_active_leases() -> None:
    t = table(gpu0=(1000, 16384), gpu1=(1000, 16384))
    a = granted(ask(t, job="a", device="gpu0", compute=100))
    b = granted(ask(t, job="b", device="gpu0", compute=100))
    t.start(b.id, "b", b.token)
    done = granted(ask(t, job="c", device="gpu0", compute=100))
    t.release(done.id)
    other = granted(ask(t, job="d", device="gpu1", compute=100))
    gone = t.remove_device("gpu0")
    assert sorted(x.id for x in gone) == sorted([a.id, b.id])
    assert all(x.state == RELEASED for x in gone)
    assert other.state == RESERVED
    assert t.devices() == ["gpu1"]
    assert t.free("gpu0") == (0, 0)
    assert t.used("gpu0") == (0, 0)
    refused(ask(t, job="e", device="gpu0"))
    assert t.remove_device("gpu0") == []  # twice is harmless
    assert t.remove_device("never-there") == []


def test_a_device_that_comes_back_starts_with_empty_books() -> None:
    t = table()
    granted(ask(t, compute=1000))
    t.remove_device("gpu0")
    t.set_device("gpu0", 1000, 16384)
    granted(ask(t, job="j2", compute=1000))


# --- restart -----------------------------------------------------------------------------


def test_restore_after_a_restart() -> None:
    t = table()
    a = granted(ask(t, job="a", compute=300, memory=1000, term=4))
    b = granted(ask(t, job="b", compute=200, memory=500, term=4))
    t.start(b.id, "b", b.token)
    c = granted(ask(t, job="c", compute=100, memory=0, term=4))
    t.release(c.id)
    journal = [x.to_dict() for x in t.leases.values()]

    fresh = table()
    for row in journal:
        fresh.restore(Lease.from_dict({**row, "added_in_a_later_version": 1}))
    assert fresh.token == 3
    assert fresh.max_term == 4
    assert fresh.used("gpu0") == (500, 1500)
    assert {x.id: x.state for x in fresh.active()} == {a.id: RESERVED, b.id: LENT}
    refused(ask(fresh, job="x", term=3))  # fencing survives the restart
    nxt = granted(ask(fresh, job="x", term=4))
    assert nxt.token == 4 and nxt.id == "owner/4"
    assert granted(fresh.start(a.id, "a", a.token)).state == LENT


def test_restore_never_lowers_the_token_or_term() -> None:
    t = LeaseTable("owner", token=50, max_term=9)
    t.set_device("gpu0", 1000, 16384)
    old = Lease("owner/3", "j", "gpu0", 100, 0, 3, 2, "c", "o", RELEASED, 0.0, 1.0)
    t.restore(old)
    assert (t.token, t.max_term) == (50, 9)
    assert granted(ask(t, term=9)).token == 51


def test_lease_dict_round_trip() -> None:
    lease = granted(ask(table()))
    assert Lease.from_dict(lease.to_dict()) == lease


# --- a stateful model ---------------------------------------------------------------------

DEVICES = {"gpu0": (1000, 16384), "gpu1": (1000, 8192)}
JOBS = [f"j{i}" for i in range(6)]


@dataclass
class Model:
    """What the owner's books should say, kept independently of the table."""

    lend: dict[str, tuple[int, int]] = field(default_factory=dict)
    max_term: int = 0
    token: int = 0
    states: dict[str, str] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)

    def used(self, device: str) -> tuple[int, int]:
        active = [
            x for i, x in self.leases.items() if x.device == device and self.states[i] in ACTIVE
        ]
        return sum(x.compute_milli for x in active), sum(x.memory_mib for x in active)


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = LeaseTable("owner")
        self.m = Model()
        self.now = 0.0

    @initialize()
    def devices(self) -> None:
        for name, (c, mem) in DEVICES.items():
            self.t.set_device(name, c, mem)
            self.m.lend[name] = (c, mem)

    @rule(
        job=st.sampled_from(JOBS),
        device=st.sampled_from([*DEVICES, "gpu9"]),
        compute=st.sampled_from([-10, 0, 1, 100, 250, 333, 500, 1000, 1200]),
        memory=st.sampled_from([-1, 0, 512, 1024, 4096, 8192, 16384, 20000]),
        term=st.integers(0, 6),
        ttl=st.sampled_from([0.0, 1.0, 5.0, 30.0]),
    )
    def request(
        self, job: str, device: str, compute: int, memory: int, term: int, ttl: float
    ) -> None:
        before = self.m.used(device)
        result = ask(self.t, job, device, compute, memory, term, self.now, ttl)
        if term < self.m.max_term:
            assert isinstance(result, Refusal) and result.max_term == self.m.max_term
            return
        self.m.max_term = term
        held = [
            x for i, x in self.m.leases.items() if x.job_id == job and self.m.states[i] in ACTIVE
        ]
        if held:
            if held[0].device == device:
                assert result is self.t.leases[held[0].id]
            else:
                assert isinstance(result, Refusal)
            return
        fits = (
            device in self.m.lend
            and compute > 0
            and memory >= 0
            and before[0] + compute <= self.m.lend[device][0]
            and before[1] + memory <= self.m.lend[device][1]
        )
        if not fits:
            assert isinstance(result, Refusal), result
            return
        assert isinstance(result, Lease), result
        # the safety property: at grant time, within both the lend limit and the capacity
        used = self.t.used(device)
        assert used[0] <= self.m.lend[device][0] <= DEVICES[device][0]
        assert used[1] <= self.m.lend[device][1] <= DEVICES[device][1]
        assert result.token == self.m.token + 1
        assert result.term == term
        self.m.token = result.token
        self.m.leases[result.id] = result
        self.m.states[result.id] = RESERVED

    @rule(i=st.integers(0, 50), good_token=st.booleans())
    def start(self, i: int, good_token: bool) -> None:
        if not self.m.leases:
            return
        lid = sorted(self.m.leases)[i % len(self.m.leases)]
        lease = self.m.leases[lid]
        result = self.t.start(lid, lease.job_id, lease.token if good_token else lease.token + 7)
        state = self.m.states[lid]
        if good_token and state in ACTIVE:
            assert isinstance(result, Lease) and result.state == LENT
            self.m.states[lid] = LENT
        else:
            assert isinstance(result, Refusal)

    @rule(i=st.integers(0, 50))
    def release(self, i: int) -> None:
        if not self.m.leases:
            return
        lid = sorted(self.m.leases)[i % len(self.m.leases)]
        result = self.t.release(lid)
        if self.m.states[lid] in ACTIVE:
            assert result is not None and result.state == RELEASED
            self.m.states[lid] = RELEASED
        else:
            assert result is None

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 4.0, 30.0]))
    def advance(self, dt: float) -> None:
        self.now += dt
        gone = self.t.expire(self.now)
        expected = {
            i
            for i, x in self.m.leases.items()
            if self.m.states[i] == RESERVED and self.now >= x.expires
        }
        assert {x.id for x in gone} == expected
        for i in expected:
            self.m.states[i] = EXPIRED

    @rule(
        device=st.sampled_from(list(DEVICES)),
        compute=st.none() | st.integers(0, 1500),
        memory=st.none() | st.integers(0, 20000),
    )
    def set_lend_limit(self, device: str, compute: int | None, memory: int | None) -> None:
        cap_c, cap_m = DEVICES[device]
        self.t.set_device(device, cap_c, cap_m, compute, memory)
        self.m.lend[device] = (
            cap_c if compute is None else min(compute, cap_c),
            cap_m if memory is None else min(memory, cap_m),
        )

    @rule(device=st.sampled_from(list(DEVICES)))
    def remove_and_re_add(self, device: str) -> None:
        gone = self.t.remove_device(device)
        expected = {
            i for i, x in self.m.leases.items() if x.device == device and self.m.states[i] in ACTIVE
        }
        assert {x.id for x in gone} == expected
        for i in expected:
            self.m.states[i] = RELEASED
        cap_c, cap_m = DEVICES[device]
        self.t.set_device(device, cap_c, cap_m)
        self.m.lend[device] = (cap_c, cap_m)

    @rule()
    def forget_finished(self) -> None:
        self.t.forget_finished()
        for lid in [i for i, st_ in self.m.states.items() if st_ not in ACTIVE]:
            del self.m.states[lid]
            del self.m.leases[lid]
        assert set(self.t.leases) == set(self.m.leases)

    @rule()
    def restart(self) -> None:
        """The agent restarts: token and term from its state file, leases from the journal."""
        fresh = LeaseTable("owner", token=self.t.token, max_term=self.t.max_term)
        for name, (c, mem) in self.m.lend.items():
            cap_c, cap_m = DEVICES[name]
            fresh.set_device(name, cap_c, cap_m, c, mem)
        for lease in self.t.leases.values():
            fresh.restore(Lease.from_dict(lease.to_dict()))
        self.t = fresh
        self.m.leases = dict(fresh.leases)

    @invariant()
    def books_agree(self) -> None:
        for device in DEVICES:
            used = self.t.used(device)
            assert used == self.m.used(device)
            assert used[0] <= DEVICES[device][0] and used[1] <= DEVICES[device][1]
            free = self.t.free(device)
            lend = self.m.lend.get(device, (0, 0))
            assert free == (max(lend[0] - used[0], 0), max(lend[1] - used[1], 0))
        for lid, state in self.m.states.items():
            assert self.t.leases[lid].state == state
        assert self.t.token == self.m.token
        assert self.t.max_term == self.m.max_term

    @invariant()
    def tokens_unique(self) -> None:
        tokens = [x.token for x in self.t.leases.values()]
        assert len(tokens) == len(set(tokens))
        assert all(0 < tok <= self.t.token for tok in tokens)

    @invariant()
    def deadline(self) -> None:
        reserved = [x.expires for x in self.t.leases.values() if x.state == RESERVED]
        assert self.t.next_deadline() == (min(reserved) if reserved else None)


STEPS = {(state, nxt) for (state, _event), nxt in TRANSITIONS.items()}


class LeaseMachineWithTransitions(LeaseMachine):
    """Also: every state change observed between two steps is a step of TRANSITIONS."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, str] = {}

    @invariant()
    def transitions_follow_the_table(self) -> None:
        for lid, lease in self.t.leases.items():
            prev = self.seen.get(lid)
            if prev is None:
                assert lease.state == RESERVED  # every lease is born reserved
            elif prev != lease.state:
                assert (prev, lease.state) in STEPS, (prev, lease.state)
            self.seen[lid] = lease.state


TestLeaseTable = LeaseMachineWithTransitions.TestCase
TestLeaseTable.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
