"""SWIM + Lifeguard membership, driven directly: a tiny in-test router, virtual time, seeds.

``Net`` delivers each SendPacket at once (through the real codec), runs push-pull
exchanges through real frames, and ticks every node exactly at its ``next_deadline()``.
It checks two invariants on every step: no datagram exceeds the UDP budget, and a tick
always moves a node's next deadline into the future.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmesh.protocol import wire
from flexmesh.protocol.broadcast import BroadcastQueue, retransmit_limit
from flexmesh.protocol.membership import (
    ALIVE,
    DEAD,
    LEFT,
    PRESETS,
    SUSPECT,
    Config,
    ConfirmedEvent,
    FactsEvent,
    MemberEvent,
    Membership,
    NameConflict,
    SendPacket,
    StartPushPull,
    with_overrides,
)
from flexmesh.protocol.suspicion import Awareness, suspicion_min_timeout, suspicion_timeout

LAN = PRESETS["lan"]


def addr(name: str) -> str:
    return f"{name}:7946"


@dataclass
class Net:
    config: Config = LAN
    seed: int = 1
    now: float = 0.0
    loss: float = 0.0
    nodes: dict[str, Membership] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    cuts: set[frozenset[str]] = field(default_factory=set)
    events: list[tuple[float, str, MemberEvent]] = field(default_factory=list)
    facts_events: list[tuple[float, str, str]] = field(default_factory=list)
    sent: list[tuple[str, str, list[wire.Message]]] = field(default_factory=list)
    pushpulls: list[tuple[float, str, str]] = field(default_factory=list)
    confirmed: list[tuple[float, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.by_addr: dict[str, str] = {}

    # --- topology -----------------------------------------------------------------------

    def add(self, name: str, join: str | None = None, incarnation: int = 0) -> Membership:
        rng = random.Random(f"{self.seed}/{name}/{incarnation}")
        m = Membership(name, addr(name), self.config, rng, self.now, incarnation)
        self.nodes[name] = m
        self.by_addr[addr(name)] = name
        if join is not None:
            m.join([addr(join)])
        self.flush()
        return m

    def link_ok(self, a: str, b: str) -> bool:
        return a not in self.down and b not in self.down and frozenset((a, b)) not in self.cuts

    def cut(self, a: str, b: str) -> None:
        self.cuts.add(frozenset((a, b)))

    def partition(self, side: set[str]) -> None:
        for a in side:
            for b in set(self.nodes) - side:
                self.cut(a, b)

    def heal(self) -> None:
        self.cuts.clear()

    # --- delivery -----------------------------------------------------------------------

    def flush(self) -> None:
        for _ in range(100_000):
            busy = False
            for name in sorted(self.nodes):
                for eff in self.nodes[name].drain():
                    busy = True
                    self._effect(name, eff)
            if not busy:
                return
        raise AssertionError("effects never settle")

    def _effect(self, src: str, eff: object) -> None:
        if isinstance(eff, MemberEvent):
            self.events.append((self.now, src, eff))
        elif isinstance(eff, FactsEvent):
            self.facts_events.append((self.now, src, eff.name))
        elif isinstance(eff, ConfirmedEvent):
            self.confirmed.append((self.now, src, eff.name))
        elif isinstance(eff, SendPacket):
            assert len(eff.data) <= wire.UDP_BUDGET, (src, len(eff.data))
            msgs = wire.decode_packet(eff.data)
            dst = self.by_addr.get(eff.addr)
            self.sent.append((src, dst or eff.addr, msgs))
            if dst is None or src in self.down or not self.link_ok(src, dst):
                return
            if self.loss and self.rng.random() < self.loss:
                return
            self.nodes[dst].step(addr(src), msgs, self.now)
        elif isinstance(eff, StartPushPull):
            self._pushpull(src, eff)
        elif isinstance(eff, NameConflict):
            raise AssertionError(f"a name conflict in a mesh of distinct names: {eff!r}")
        else:
            raise AssertionError(f"unknown effect {eff!r}")

    def _pushpull(self, src: str, eff: StartPushPull) -> None:
        dst = self.by_addr.get(eff.addr)
        self.pushpulls.append((self.now, src, eff.addr))
        if dst is None or not self.link_ok(src, dst):
            return
        a, b = self.nodes[src], self.nodes[dst]
        request = wire.encode_frame(wire.PushPull(eff.join, src, a.local_state()))
        msg = wire.decode_frame_body(request[4:])
        assert isinstance(msg, wire.PushPull)
        assert b.merge_remote_state(msg.states, self.now) == 0
        reply = wire.encode_frame(wire.PushPull(False, dst, b.local_state()))
        answer = wire.decode_frame_body(reply[4:])
        assert isinstance(answer, wire.PushPull)
        assert a.merge_remote_state(answer.states, self.now) == 0

    # --- time ---------------------------------------------------------------------------

    def run_until(self, until: float) -> None:
        self.flush()
        while True:
            # a node that left is done (see test_next_deadline_moves_on_after_leave)
            live = [
                n
                for n in sorted(self.nodes)
                if n not in self.down and self.nodes[n].me.state != LEFT
            ]
            if not live:
                self.now = until
                return
            t = min(self.nodes[n].next_deadline() for n in live)
            if t > until:
                self.now = until
                return
            self.now = max(self.now, t)
            for n in live:
                node = self.nodes[n]
                if node.next_deadline() <= self.now:
                    node.tick(self.now)
                    assert node.next_deadline() > self.now, (n, self.now)
            self.flush()

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # --- queries ------------------------------------------------------------------------

    def state(self, observer: str, name: str) -> str | None:
        m = self.nodes[observer].members.get(name)
        return None if m is None else m.state

    def converged(self, names: list[str]) -> bool:
        return all(
            {n: self.state(o, n) for n in names} == dict.fromkeys(names, ALIVE) for o in names
        )

    def first_event(self, observer: str, name: str, state: str, after: float = 0.0) -> float:
        for t, obs, ev in self.events:
            if obs == observer and ev.name == name and ev.state == state and t >= after:
                return t
        raise AssertionError(f"{observer} never saw {name} {state} after {after}")

    def saw(self, name: str, state: str, after: float = 0.0) -> list[str]:
        return sorted(
            {
                obs
                for t, obs, ev in self.events
                if ev.name == name and ev.state == state and t >= after
            }
        )


def cluster(n: int, seed: int = 1, config: Config = LAN) -> Net:
    net = Net(config=config, seed=seed)
    net.add("n0")
    for i in range(1, n):
        net.add(f"n{i}", join="n0")
        net.run_for(0.1)
    net.run_for(10)
    names = [f"n{i}" for i in range(n)]
    assert net.converged(names), {o: net.nodes[o].members.keys() for o in names}
    return net


# --- joining ----------------------------------------------------------------------------


def test_join_by_push_pull_is_immediate_and_mutual() -> None:
    net = Net()
    a = net.add("a")
    b = net.add("b", join="a")
    assert net.pushpulls == [(0.0, "b", addr("a"))]
    assert net.state("a", "b") == ALIVE
    assert net.state("b", "a") == ALIVE
    assert a.members["b"].addr == addr("b")
    assert b.members["a"].addr == addr("a")
    first = [(obs, ev) for _, obs, ev in net.events]
    assert ("a", MemberEvent("b", ALIVE, None, addr("b"))) in first
    assert ("b", MemberEvent("a", ALIVE, None, addr("a"))) in first


def test_join_never_dials_itself() -> None:
    m = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    m.join([addr("a"), addr("b")])
    assert m.drain() == [StartPushPull(addr("b"), join=True)]


def test_a_third_node_is_learned_by_gossip() -> None:
    net = Net()
    net.add("a")
    net.add("b", join="a")
    net.add("c", join="b")  # a hears of c only from b's piggybacked Alive
    assert net.state("a", "c") is None
    net.run_for(5)
    assert net.converged(["a", "b", "c"])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ten_nodes_converge(seed: int) -> None:
    cluster(10, seed=seed)


# --- probing ----------------------------------------------------------------------------


def test_probes_keep_healthy_members_alive() -> None:
    net = cluster(5)
    start = net.now
    net.run_for(120)
    assert not [e for e in net.events if e[0] >= start]  # no state change at all
    for name, m in net.nodes.items():
        assert m.counters.get("probes", 0) >= 100, name  # about one per second
        assert m.counters.get("probe_failed", 0) == 0, name
        assert m.awareness.score == 0
    acks = sum(1 for _, _, msgs in net.sent for x in msgs if isinstance(x, wire.Ack))
    assert acks >= 500


def test_ping_to_another_name_is_not_answered() -> None:
    """A restarted address may now belong to someone else: only the named target acks."""
    m = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    m.drain()
    m.step(addr("x"), [wire.Ping(9, "someone-else", "x", addr("x"))], 0.0)
    assert m.drain() == []
    assert m.counters["misdirected_ping"] == 1
    m.step(addr("x"), [wire.Ping(9, "a", "x", addr("x"))], 0.0)
    (eff,) = m.drain()
    assert isinstance(eff, SendPacket) and eff.addr == addr("x")
    assert [(m.seq, m.source) for m in wire.decode_packet(eff.data)
            if isinstance(m, wire.Ack)] == [(9, "a")]


def test_a_silent_node_becomes_suspect_then_dead_after_the_timeout() -> None:
    net = cluster(3)
    crash = net.now
    net.down.add("n2")
    net.run_for(60)
    min_s = suspicion_min_timeout(LAN.suspicion_mult, 3, LAN.probe_interval)
    max_s = LAN.suspicion_max_mult * min_s
    assert min_s == 4.0
    for obs in ("n0", "n1"):
        t_s = net.first_event(obs, "n2", SUSPECT)
        t_d = net.first_event(obs, "n2", DEAD)
        # suspected within a few periods (after a direct and an indirect probe)...
        assert crash < t_s <= crash + 3 * LAN.probe_interval
        # ...and dead no sooner than the shortest suspicion, no later than the longest
        assert min_s - 1e-9 <= t_d - t_s <= max_s + 1e-9, (obs, t_s, t_d)
        assert net.state(obs, "n2") == DEAD


def test_suspicion_is_not_dead_one_instant_before_its_deadline() -> None:
    """Two nodes: no one can confirm, so the suspicion lasts exactly the minimum."""
    cfg = with_overrides(LAN, probe_interval=1.0)
    a = Membership("a", addr("a"), cfg, random.Random(1), 0.0)
    a.handle_alive(wire.Alive("b", addr("b"), 0), 0.0)
    a.handle_suspect(wire.Suspect("b", 0, "a"), 10.0)
    timeout = suspicion_min_timeout(cfg.suspicion_mult, 2, cfg.probe_interval)
    a.tick(10.0 + timeout - 1e-6)
    assert a.members["b"].state == SUSPECT
    a.tick(10.0 + timeout)
    assert a.members["b"].state == DEAD
    dead = [e for e in a.drain() if isinstance(e, MemberEvent) and e.state == DEAD]
    assert dead == [MemberEvent("b", DEAD, SUSPECT, addr("b"))]


def dead_at(peers: list[str], victim: str, sources: list[str], start: float = 100.0) -> float:
    """When ``a``, knowing ``peers``, declares ``victim`` dead after hearing it suspected by
    each of ``sources`` at ``start`` (nobody answers a's probes in the meantime)."""
    a = Membership("a", addr("a"), LAN, random.Random(1), start)
    # a does not probe here: its own failed probe of the victim would be one more
    # independent confirmation (as in memberlist), and these tests count only the sources.
    a._next_probe = math.inf
    for peer in peers:
        a.handle_alive(wire.Alive(peer, addr(peer), 0), start)
    for source in sources:
        a.step(addr(source), [wire.Suspect(victim, 0, source)], start)
    assert a.members[victim].state == SUSPECT
    t = start
    while a.members[victim].state == SUSPECT:
        t = a.next_deadline()
        assert t < start + 1000
        a.tick(t)
    assert a.members[victim].state == DEAD
    return t - start


FOUR = ["b", "c", "d"]  # with a: min 4 s, max 24 s, two confirmations hoped for
SIX = ["b", "c", "d", "e", "f"]  # with a: min 4 s, max 24 s, three hoped for


def test_a_suspicion_lasts_between_the_minimum_and_the_maximum() -> None:
    for sources in (["b"], ["b", "c"], ["push-pull"], ["b", "c", "d"]):
        assert 4.0 <= dead_at(FOUR, "d", sources) <= 24.0, sources


def test_the_same_confirmer_counts_once() -> None:
    assert dead_at(FOUR, "d", ["b", "b", "b"]) == dead_at(FOUR, "d", ["b"])
    assert dead_at(SIX, "f", ["b", "c", "b", "c"]) == dead_at(SIX, "f", ["b", "c"])


def test_independent_confirmations_shorten_the_suspicion() -> None:
    assert dead_at(FOUR, "d", ["b", "c"]) < dead_at(FOUR, "d", ["b"])
    assert dead_at(SIX, "f", ["b", "c", "d"]) < dead_at(SIX, "f", ["b", "c"])
    # once everyone hoped for has agreed, the shortest timeout, counted from the start
    assert dead_at(SIX, "f", ["b", "c", "d", "e"]) == pytest.approx(4.0)


def test_a_confirmation_that_comes_late_ends_the_suspicion_at_once() -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    for peer in SIX:
        a.handle_alive(wire.Alive(peer, addr(peer), 0), 0.0)
    for source in ("b", "c"):
        a.handle_suspect(wire.Suspect("f", 0, source), 100.0)
    a.tick(106.0)
    assert a.members["f"].state == SUSPECT
    for source in ("d", "e"):  # now everyone agrees: start + min has long passed
        a.handle_suspect(wire.Suspect("f", 0, source), 106.5)
    a.tick(106.5)
    assert a.members["f"].state == DEAD


def test_our_own_failed_probes_suspect_for_the_longest_time() -> None:
    """Nobody answers: a suspects each peer in turn and, with no confirmation from anyone,
    each suspicion runs the full maximum."""
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    for peer in FOUR:
        a.handle_alive(wire.Alive(peer, addr(peer), 0), 0.0)
    a.drain()
    since: dict[str, float] = {}
    lasted: dict[str, float] = {}
    t = 0.0
    while t < 60.0:
        t = a.next_deadline()
        a.tick(t)
        for e in a.drain():
            if isinstance(e, MemberEvent) and e.state == SUSPECT:
                since[e.name] = t
            elif isinstance(e, MemberEvent) and e.state == DEAD:
                lasted[e.name] = t - since[e.name]
    assert a.counters["suspicions"] == 3  # a's later failed probes of a suspect add nothing:
    assert a.counters["probe_failed"] >= 3  # a is the originator, not a confirmation
    assert lasted == pytest.approx(dict.fromkeys(FOUR, 24.0))


def test_one_peers_word_alone_runs_the_longest_suspicion() -> None:
    assert dead_at(["b", "c"], "c", ["b"]) == pytest.approx(24.0)


def test_indirect_probe_through_helpers_when_the_direct_link_is_cut() -> None:
    net = cluster(4)
    start = net.now
    net.cut("n0", "n3")
    net.run_for(60)
    assert not [e for e in net.events if e[0] >= start], "nobody may suspect n3 or n0"
    assert net.nodes["n0"].counters.get("probe_failed", 0) == 0
    indirect = [
        (src, dst)
        for src, dst, msgs in net.sent
        for x in msgs
        if isinstance(x, wire.IndirectPing) and x.target == "n3"
    ]
    assert indirect and {src for src, _ in indirect} == {"n0"}
    assert {dst for _, dst in indirect} <= {"n1", "n2"}


def test_without_helpers_the_cut_member_is_suspected() -> None:
    """The control for the test above: with only two nodes, a cut link means suspicion."""
    net = cluster(2)
    net.cut("n0", "n1")
    net.run_for(5)
    assert net.state("n0", "n1") in (SUSPECT, DEAD)


def test_relay_answers_nack_when_the_target_is_silent() -> None:
    h = Membership("h", addr("h"), LAN, random.Random(1), 0.0)
    h.drain()
    h.step(addr("a"), [wire.IndirectPing(7, "t", addr("t"), "a", addr("a"), True)], 0.0)
    (ping,) = h.drain()
    assert isinstance(ping, SendPacket) and ping.addr == addr("t")
    (p,) = [x for x in wire.decode_packet(ping.data) if isinstance(x, wire.Ping)]
    assert p.target == "t" and p.source == "h" and p.source_addr == addr("h")
    h.tick(LAN.probe_timeout)
    out = [e for e in h.drain() if isinstance(e, SendPacket) and e.addr == addr("a")]
    assert any(wire.Nack(7, "h") in wire.decode_packet(e.data) for e in out)


def test_relay_forwards_the_ack_under_the_requesters_sequence() -> None:
    h = Membership("h", addr("h"), LAN, random.Random(1), 0.0)
    h.drain()
    h.step(addr("a"), [wire.IndirectPing(7, "t", addr("t"), "a", addr("a"), True)], 0.0)
    (ping,) = h.drain()
    assert isinstance(ping, SendPacket)
    (p,) = [x for x in wire.decode_packet(ping.data) if isinstance(x, wire.Ping)]
    h.step(addr("t"), [wire.Ack(p.seq, "t")], 0.1)
    (fwd,) = h.drain()
    assert isinstance(fwd, SendPacket) and fwd.addr == addr("a")
    assert wire.Ack(7, "t") in wire.decode_packet(fwd.data)
    h.tick(5.0)  # the relay is done: no Nack afterwards
    assert not any(
        isinstance(x, wire.Nack)
        for e in h.drain()
        if isinstance(e, SendPacket)
        for x in wire.decode_packet(e.data)
    )


# --- refutation -------------------------------------------------------------------------


def test_a_suspected_node_refutes_and_stays_alive() -> None:
    net = cluster(4)
    start = net.now
    net.nodes["n1"].step(addr("n0"), [wire.Suspect("n3", 0, "n0")], net.now)
    net.run_for(30)
    n3 = net.nodes["n3"]
    assert n3.me.incarnation >= 1
    assert n3.counters["refutations"] >= 1
    for obs in ("n0", "n1", "n2"):
        m = net.nodes[obs].members["n3"]
        assert (m.state, m.incarnation) == (ALIVE, n3.me.incarnation), obs
    assert net.first_event("n1", "n3", SUSPECT, after=start) == start
    assert net.first_event("n1", "n3", ALIVE, after=start) > start
    assert net.saw("n3", DEAD) == []


def test_suspect_about_me_raises_my_incarnation_and_announces_it() -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0, incarnation=5)
    a.handle_alive(wire.Alive("b", addr("b"), 0), 0.0)
    a.drain()
    a.step(addr("b"), [wire.Suspect("a", 4, "b")], 1.0)  # older: nothing to refute
    assert a.me.incarnation == 5
    a.step(addr("b"), [wire.Suspect("a", 5, "b")], 1.0)
    assert a.me.incarnation == 6
    assert a.me.state == ALIVE
    assert a.awareness.score == 1  # Lifeguard: being suspected hints we are slow
    a.step(addr("b"), [wire.Ping(1, "a", "b", addr("b"))], 1.1)
    (ack,) = [e for e in a.drain() if isinstance(e, SendPacket)]
    msgs = wire.decode_packet(ack.data)
    assert wire.Alive("a", addr("a"), 6) in msgs
    facts = [x for x in msgs if isinstance(x, wire.Facts) and x.node == "a"]
    assert facts and facts[0].incarnation == 6  # facts re-stamped with the new incarnation


@pytest.mark.parametrize(
    ("msg", "incarnation"),
    [
        (wire.Dead("a", 3, "b"), 4),  # someone declared us dead: refute
        (wire.Dead("a", 2, "b"), 3),  # an older verdict: ignore
        (wire.Dead("a", 3, "a"), 3),  # our own leave echoed back: not refuted
        (wire.Alive("a", addr("a"), 7), 8),  # a newer incarnation of us (we restarted)
        (wire.Alive("a", addr("a"), 3), 3),
    ],
)
def test_refutation_table(msg: wire.Message, incarnation: int) -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0, incarnation=3)
    a.step(addr("b"), [msg], 1.0)
    assert a.me.incarnation == incarnation
    assert a.me.state == ALIVE


def test_alive_at_the_same_incarnation_does_not_clear_a_suspicion() -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    a.handle_alive(wire.Alive("b", addr("b"), 2), 0.0)
    a.handle_suspect(wire.Suspect("b", 2, "c"), 1.0)
    a.handle_alive(wire.Alive("b", addr("b"), 2), 1.5)
    assert a.members["b"].state == SUSPECT
    a.handle_alive(wire.Alive("b", addr("b"), 3), 2.0)
    assert a.members["b"].state == ALIVE
    a.tick(1000.0)  # one tick, long past the deadline: the cancelled suspicion never fires
    assert a.members["b"].state == ALIVE
    assert not [e for e in a.drain() if isinstance(e, MemberEvent) and e.state == DEAD]


@pytest.mark.parametrize("stale", [wire.Suspect("b", 2, "c"), wire.Dead("b", 2, "c")])
def test_a_stale_rumour_is_answered_with_the_newer_alive(stale: wire.Message) -> None:
    """Peer c missed every copy of b's refutation and still spreads suspicion (or death) of
    b at incarnation 2: a, which has b alive at 3, tells c directly."""
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    a.handle_alive(wire.Alive("b", addr("b"), 3), 0.0)
    a.drain()
    a.step(addr("c"), [stale], 1.0)
    (reply,) = [e for e in a.drain() if isinstance(e, SendPacket)]
    assert reply.addr == addr("c")
    assert wire.decode_packet(reply.data) == [wire.Alive("b", addr("b"), 3)]
    assert a.counters["stale_rumours_corrected"] == 1
    assert a.members["b"].state == ALIVE


@pytest.mark.parametrize("news", [wire.Suspect("b", 3, "c"), wire.Suspect("b", 4, "c"),
                                  wire.Dead("b", 3, "c")])
def test_current_news_is_not_answered(news: wire.Message) -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    a.handle_alive(wire.Alive("b", addr("b"), 3), 0.0)
    a.drain()
    a.step(addr("c"), [news], 1.0)
    assert not [e for e in a.drain() if isinstance(e, SendPacket) and e.addr == addr("c")]
    assert "stale_rumours_corrected" not in a.counters


def test_what_we_suspect_ourselves_is_not_corrected() -> None:
    """Only an alive member is vouched for: a suspicion of our own at a newer incarnation
    says nothing about whether b lives."""
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    a.handle_alive(wire.Alive("b", addr("b"), 3), 0.0)
    a.handle_suspect(wire.Suspect("b", 3, "d"), 0.5)
    a.drain()
    a.step(addr("c"), [wire.Suspect("b", 2, "c")], 1.0)
    assert not [e for e in a.drain() if isinstance(e, SendPacket) and e.addr == addr("c")]


def test_a_peer_that_missed_every_refutation_is_set_right_before_its_timeout() -> None:
    """The false DEAD the lossy benchmark found: n1 never hears n3's refutation, but its own
    suspicion gossip reaches peers that did, and their direct answer ends it in time.
    (Anti-entropy is pushed out of the way: it would also end it, but 30 s later.)"""
    net = cluster(5, config=with_overrides(LAN, pushpull_interval=600.0))
    start = net.now
    n3 = net.nodes["n3"]
    net.nodes["n0"].step(addr("n2"), [wire.Suspect("n3", 0, "n2")], net.now)
    net.flush()
    net.run_for(5)
    assert n3.me.incarnation >= 1
    # n1 missed all of it (as if every copy was lost): it still has n3 at incarnation 0
    # when the old suspicion reaches it, and it cannot hear n3 itself.
    net.nodes["n1"].members["n3"].incarnation = 0
    net.cut("n1", "n3")
    net.nodes["n1"].step(addr("n2"), [wire.Suspect("n3", 0, "n2")], net.now)
    net.flush()
    net.run_for(60)
    assert net.nodes["n1"].members["n3"].state == ALIVE
    assert net.saw("n3", DEAD) == []
    assert sum(n.counters.get("stale_rumours_corrected", 0) for n in net.nodes.values()) >= 1
    assert net.first_event("n1", "n3", SUSPECT, after=start) is not None


# --- leaving ----------------------------------------------------------------------------


def test_graceful_leave_is_seen_as_left_not_dead() -> None:
    net = cluster(4)
    start = net.now
    net.nodes["n3"].leave(net.now)
    net.flush()
    net.run_for(60)
    for obs in ("n0", "n1", "n2"):
        assert net.state(obs, "n3") == LEFT, obs
    assert net.saw("n3", LEFT, after=start) == ["n0", "n1", "n2"]
    assert net.saw("n3", DEAD) == []
    assert net.saw("n3", SUSPECT) == []
    assert not [p for p in net.pushpulls if p[2] == addr("n3")]  # left is not retried
    assert net.converged(["n0", "n1", "n2"])


def test_a_node_that_left_ignores_input_and_time() -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    a.handle_alive(wire.Alive("b", addr("b"), 0), 0.0)
    a.leave(1.0)
    out = a.drain()
    assert a.me.state == LEFT
    sent = [x for e in out if isinstance(e, SendPacket) for x in wire.decode_packet(e.data)]
    assert wire.Dead("a", 0, "a") in sent
    a.step(addr("b"), [wire.Ping(1, "a", "b", addr("b"))], 2.0)
    a.tick(100.0)
    assert a.drain() == []


def test_next_deadline_moves_on_after_leave() -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    a.handle_alive(wire.Alive("b", addr("b"), 0), 0.0)
    a.leave(5.0)
    t = a.next_deadline()
    a.tick(max(t, 5.0))
    assert a.next_deadline() > max(t, 5.0)


# --- facts ------------------------------------------------------------------------------


def test_facts_spread_to_everyone() -> None:
    net = cluster(5)
    start = net.now
    net.nodes["n2"].set_facts({"devices": [{"id": "gpu0", "memory_mib": 16384}]})
    net.run_for(5)
    version = net.nodes["n2"].me.facts_version
    assert version == 1
    for obs in ("n0", "n1", "n3", "n4"):
        m = net.nodes[obs].members["n2"]
        assert m.facts == {"devices": [{"id": "gpu0", "memory_mib": 16384}]}
        assert m.facts_version == version
    observers = {obs for t, obs, name in net.facts_events if name == "n2" and t >= start}
    assert observers == {"n0", "n1", "n2", "n3", "n4"}


def test_facts_merge_by_incarnation_then_version() -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    a.handle_alive(wire.Alive("b", addr("b"), 0), 0.0)
    a.drain()

    def facts_of_b() -> tuple[int, int, dict[str, object]]:
        m = a.members["b"]
        return m.facts_inc, m.facts_version, m.facts

    a.handle_facts(wire.Facts("b", 0, 5, {"v": 5}))
    assert facts_of_b() == (0, 5, {"v": 5})
    assert a.drain() == [FactsEvent("b")]
    a.handle_facts(wire.Facts("b", 0, 4, {"v": 4}))  # older version: ignored
    a.handle_facts(wire.Facts("b", 0, 5, {"v": "dup"}))  # same version: ignored
    assert facts_of_b() == (0, 5, {"v": 5})
    assert a.drain() == []
    a.handle_facts(wire.Facts("b", 1, 0, {"v": "restarted"}))  # newer incarnation wins
    assert facts_of_b() == (1, 0, {"v": "restarted"})
    a.handle_facts(wire.Facts("b", 0, 99, {"v": "stale"}))
    assert facts_of_b() == (1, 0, {"v": "restarted"})
    a.handle_facts(wire.Facts("nobody", 0, 1, {}))  # facts of an unknown node: ignored
    assert "nobody" not in a.members
    a.handle_facts(wire.Facts("a", 9, 9, {"forged": True}))  # only we speak for us
    assert a.me.facts == {}


def test_facts_too_large_for_a_datagram_travel_by_push_pull() -> None:
    net = cluster(3)
    big = {"blob": "x" * 4000}
    net.nodes["n1"].set_facts(big)  # every packet is still checked against the budget
    net.run_for(5)
    assert net.nodes["n0"].members["n1"].facts != big
    net.run_for(2 * LAN.pushpull_interval)
    assert net.nodes["n0"].members["n1"].facts == big
    assert net.nodes["n2"].members["n1"].facts == big


def test_set_facts_bumps_the_version() -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0, incarnation=2)
    assert (a.me.facts_inc, a.me.facts_version) == (2, 0)
    a.set_facts({"x": 1})
    a.set_facts({"x": 2})
    assert (a.me.facts_inc, a.me.facts_version, a.me.facts) == (2, 2, {"x": 2})
    assert a.drain() == [FactsEvent("a"), FactsEvent("a")]


# --- push-pull --------------------------------------------------------------------------


def test_remote_dead_in_push_pull_arrives_as_suspect() -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    a.handle_alive(wire.Alive("b", addr("b"), 3), 0.0)
    rows = [
        ["b", addr("b"), 3, DEAD, -1, -1, {}],
        ["c", addr("c"), 0, DEAD, -1, -1, {}],  # unknown and "dead": a suspect to us
        ["d", addr("d"), 0, LEFT, -1, -1, {}],  # a leave is believed as is
        ["e", addr("e"), 1, SUSPECT, -1, -1, {}],
    ]
    assert a.merge_remote_state(rows, 1.0) == 0
    assert a.members["b"].state == SUSPECT
    assert a.members["c"].state == SUSPECT
    assert a.members["d"].state == LEFT
    assert a.members["e"].state == SUSPECT
    # a suspect that refutes in time stays; one that does not is declared dead
    a.handle_alive(wire.Alive("b", addr("b"), 4), 2.0)
    assert a.members["b"].state == ALIVE
    a.tick(1.0 + 100.0)  # one tick: past every suspicion deadline, before any probe fails
    assert a.members["b"].state == ALIVE
    assert a.members["c"].state == DEAD


def test_push_pull_never_confirms_a_suspicion_by_itself() -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    for peer in ("b", "c", "d"):
        a.handle_alive(wire.Alive(peer, addr(peer), 0), 0.0)
    a.merge_remote_state([["d", addr("d"), 0, DEAD, -1, -1, {}]], 100.0)
    a.merge_remote_state([["d", addr("d"), 0, DEAD, -1, -1, {}]], 100.5)
    deadline = 100.0 + suspicion_timeout(4.0, 24.0, 0, 2)
    a.tick(deadline - 1e-6)
    assert a.members["d"].state == SUSPECT
    a.tick(deadline)
    assert a.members["d"].state == DEAD


def test_push_pull_about_me_is_refuted() -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0, incarnation=2)
    a.merge_remote_state([["a", addr("a"), 2, LEFT, -1, -1, {}]], 1.0)
    assert (a.me.state, a.me.incarnation) == (ALIVE, 3)
    a.merge_remote_state([["a", addr("a"), 3, ALIVE, -1, -1, {}]], 1.0)
    assert a.me.incarnation == 3  # the same word about us: nothing to refute
    a.merge_remote_state([["a", addr("a"), 9, ALIVE, -1, -1, {}]], 1.0)
    assert a.me.incarnation == 10


@pytest.mark.parametrize(
    "row",
    [
        "not a row",
        None,
        42,
        ["b", addr("b"), 0, ALIVE, -1, -1],  # six columns
        ["b", addr("b"), 0, ALIVE, -1, -1, {}, "extra"],
        ["b", addr("b"), "0", ALIVE, -1, -1, {}],
        ["b", addr("b"), 0, "zombie", -1, -1, {}],
        ["b", addr("b"), 0, ALIVE, -1, -1, []],
        [1, addr("b"), 0, ALIVE, -1, -1, {}],
        ["b", None, 0, ALIVE, -1, -1, {}],
        ["b", addr("b"), 0, ALIVE, -1, "1", {}],
    ],
    ids=repr,
)
def test_malformed_push_pull_rows_are_counted_and_skipped(row: object) -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    good = ["c", addr("c"), 0, ALIVE, 0, 1, {"k": 1}]
    assert a.merge_remote_state([row, good], 1.0) == 1
    assert a.counters["bad_pushpull_rows"] == 1
    assert "b" not in a.members
    assert a.members["c"].state == ALIVE
    assert a.members["c"].facts == {"k": 1}


NAMES = st.sampled_from(["a", "b", "c"])
INT64 = st.integers(-(2**63), 2**63 - 1)  # what msgpack can carry
WELL_FORMED_ROW = st.tuples(
    NAMES,
    NAMES.map(addr),
    st.integers(-2, 5),
    st.sampled_from([ALIVE, SUSPECT, DEAD, LEFT]),
    st.integers(-1, 5),
    st.integers(-1, 5),
    st.dictionaries(st.text(max_size=3), INT64, max_size=2),
).map(list)
GARBAGE_ROW = st.lists(st.none() | INT64 | st.text(max_size=6), max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(WELL_FORMED_ROW | GARBAGE_ROW, max_size=12))
def test_arbitrary_push_pull_rows_never_raise(rows: list[list[object]]) -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0, incarnation=2)
    bad = a.merge_remote_state(rows, 1.0)
    assert 0 <= bad <= len(rows)
    # whatever a peer says, we are alive, at an incarnation above any verdict on us
    assert a.me.state == ALIVE
    if any(len(r) == 7 and r[0] == "a" and r[1] != addr("a") and r[3] in (ALIVE, SUSPECT)
           for r in rows):  # another live node has our name: nothing is merged
        assert set(a.members) == {"a"} and a.me.incarnation == 2
        assert any(isinstance(e, NameConflict) for e in a.drain())
        return
    verdicts = [r[2] for r in rows if len(r) == 7 and r[0] == "a" and r[3] != ALIVE]
    assert all(a.me.incarnation > v for v in verdicts if isinstance(v, int))
    for name, m in a.members.items():
        assert m.state in (ALIVE, SUSPECT, DEAD, LEFT)
        assert m.state != DEAD  # a peer's "dead" is at most a suspicion here
        if name != "a":
            assert m.name == name


# --- reconnect and partitions -------------------------------------------------------------


def test_a_dead_member_is_retried_every_reconnect_interval() -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    a.handle_alive(wire.Alive("b", addr("b"), 0), 0.0)
    a.handle_alive(wire.Alive("c", addr("c"), 0), 0.0)
    a.handle_dead(wire.Dead("b", 0, "c"), 0.0)
    a.handle_dead(wire.Dead("c", 0, "c"), 0.0)  # c left: never retried
    assert (a.members["b"].state, a.members["c"].state) == (DEAD, LEFT)
    a.drain()
    dials = []
    t = 0.0
    while t < 5 * LAN.reconnect_interval:
        t = a.next_deadline()
        a.tick(t)
        dials += [(t, e) for e in a.drain() if isinstance(e, StartPushPull)]
    reconnects = [(t, e) for t, e in dials if e.addr == addr("b")]
    assert len(reconnects) >= 4
    assert all(not e.join for _, e in reconnects)
    assert not [e for _, e in dials if e.addr == addr("c")]
    assert a.counters["reconnect_attempts"] == len(reconnects)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_views_merge_after_a_partition_heals(seed: int) -> None:
    net = cluster(4, seed=seed)
    left, right = {"n0", "n1"}, {"n2", "n3"}
    net.partition(left)
    net.run_for(60)
    for a in left:
        for b in right:
            assert net.state(a, b) == DEAD, (a, b)
            assert net.state(b, a) == DEAD, (b, a)
    assert net.converged(sorted(left)) and net.converged(sorted(right))
    healed = net.now
    net.heal()
    net.run_for(3 * LAN.reconnect_interval)
    names = sorted(left | right)
    assert net.converged(names), {o: net.nodes[o].members for o in names}
    assert sum(m.counters.get("reconnect_attempts", 0) for m in net.nodes.values()) > 0
    refuted = [n for n in names if net.nodes[n].me.incarnation > 0]
    assert refuted  # someone had to refute the other side's verdict
    for n in refuted:  # and everyone agrees on the new incarnation
        assert {net.nodes[o].members[n].incarnation for o in names} == {net.nodes[n].me.incarnation}
    assert [p for p in net.pushpulls if p[0] >= healed]


def test_a_crashed_node_that_restarts_rejoins_with_a_new_incarnation() -> None:
    net = cluster(3)
    net.down.add("n2")
    net.run_for(60)
    assert net.state("n0", "n2") == DEAD
    net.down.discard("n2")
    net.add("n2", join="n0", incarnation=1)  # a fresh process, same name
    net.run_for(10)
    assert net.converged(["n0", "n1", "n2"])
    assert net.nodes["n0"].members["n2"].incarnation >= 1


@pytest.mark.parametrize("seed", [1, 2])
def test_heavy_loss_then_quiet_converges(seed: int) -> None:
    net = cluster(6, seed=seed)
    net.loss = 0.3
    net.run_for(60)
    net.loss = 0.0
    net.run_for(6 * LAN.reconnect_interval)
    assert net.converged([f"n{i}" for i in range(6)])


def test_dead_members_are_forgotten_after_dead_reap() -> None:
    cfg = with_overrides(LAN, dead_reap=100.0)
    a = Membership("a", addr("a"), cfg, random.Random(1), 0.0)
    a.handle_alive(wire.Alive("b", addr("b"), 0), 0.0)
    a.handle_dead(wire.Dead("b", 0, "x"), 10.0)
    a.tick(109.0)
    assert "b" in a.members
    a.tick(111.0)
    assert "b" not in a.members


# --- Lifeguard's local health --------------------------------------------------------------


def test_a_failed_probe_with_nacks_does_not_blame_ourselves() -> None:
    net = cluster(4)
    net.down.add("n3")  # the helpers answer with nacks: we are fine, n3 is not
    net.run_for(8)
    for obs in ("n0", "n1", "n2"):
        assert net.nodes[obs].awareness.score == 0, obs


def test_missed_nacks_raise_awareness_and_stretch_the_probe_interval() -> None:
    net = cluster(4)
    # n0 can reach nobody: its indirect probes get no nack back, so it doubts itself
    for other in ("n1", "n2", "n3"):
        net.cut("n0", other)
    net.run_for(6)
    score = net.nodes["n0"].awareness.score
    assert score >= 1
    assert net.nodes["n0"].awareness.scale(LAN.probe_interval) == (score + 1) * LAN.probe_interval
    probes_before = net.nodes["n0"].counters["probes"]
    net.run_for(20)
    # one probe per (score + 1) periods, fewer than one a second
    assert net.nodes["n0"].counters["probes"] - probes_before < 20


def test_a_failed_probe_with_no_one_to_nack_raises_awareness() -> None:
    net = cluster(2)
    net.down.add("n1")
    net.run_for(3)
    assert net.nodes["n0"].counters.get("probe_failed", 0) >= 1
    assert net.nodes["n0"].awareness.score >= 1


def test_independent_failed_probes_confirm_a_suspicion() -> None:
    for seed in (1, 2, 3):
        net = cluster(5, seed=seed)
        crash = net.now
        net.down.add("n4")
        net.run_for(60)
        live = ["n0", "n1", "n2", "n3"]
        suspected = min(net.first_event(o, "n4", SUSPECT, after=crash) for o in live)
        dead = min(net.first_event(o, "n4", DEAD, after=crash) for o in live)
        # every live node probes n4 within 4 periods and fails: by then 3 independent
        # confirmations are in, so the suspicion ends at the 4 s minimum or soon after
        assert dead - suspected <= 4.0 + 4 * LAN.probe_interval + 1.0, (seed, dead - suspected)


# --- timing math, as tables ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("mult", "n", "limit"),
    [
        (4, 0, 4),
        (4, 1, 4),
        (4, 2, 4),
        (4, 9, 4),
        (4, 10, 8),
        (4, 99, 8),
        (4, 100, 12),
        (4, 999, 12),
        (4, 1000, 16),
        (6, 50, 12),
        (1, 10**6, 7),
    ],
)
def test_retransmit_limit_grows_with_log_n(mult: int, n: int, limit: int) -> None:
    assert retransmit_limit(mult, n) == limit


@given(st.integers(1, 8), st.integers(0, 10**6), st.integers(0, 10**6))
def test_retransmit_limit_is_monotone(mult: int, a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    assert mult <= retransmit_limit(mult, lo) <= retransmit_limit(mult, hi)


@pytest.mark.parametrize(
    ("mult", "n", "interval", "expected"),
    [
        (4.0, 0, 1.0, 4.0),
        (4.0, 1, 1.0, 4.0),
        (4.0, 10, 1.0, 4.0),
        (4.0, 100, 1.0, 8.0),
        (4.0, 1000, 0.5, 6.0),
        (6.0, 100, 5.0, 60.0),
    ],
)
def test_suspicion_min_timeout(mult: float, n: int, interval: float, expected: float) -> None:
    assert suspicion_min_timeout(mult, n, interval) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("confirmations", "expected", "timeout"),
    [
        (0, 3, 24.0),  # nobody agrees yet: the longest
        (1, 3, 14.0),  # log(2)/log(4) = 1/2 of the way down
        (3, 3, 4.0),  # everyone we hoped for agrees: the shortest
        (7, 3, 4.0),  # more than hoped for: never below the minimum
        (0, 0, 4.0),  # no one could confirm: the minimum at once
        (5, 0, 4.0),
        (1, 1, 4.0),
        (0, 1, 24.0),
        (2, 8, 24.0 - 20.0 * math.log(3) / math.log(9)),
    ],
)
def test_suspicion_timeout_shrinks_with_confirmations(
    confirmations: int, expected: int, timeout: float
) -> None:
    assert suspicion_timeout(4.0, 24.0, confirmations, expected) == pytest.approx(timeout)


@given(
    st.floats(0.1, 100.0),
    st.floats(1.0, 10.0),
    st.integers(0, 20),
    st.integers(0, 20),
)
def test_suspicion_timeout_is_bounded_and_never_grows(
    min_s: float, factor: float, confirmations: int, expected: int
) -> None:
    max_s = min_s * factor
    t = suspicion_timeout(min_s, max_s, confirmations, expected)
    assert min_s <= t <= max_s * (1 + 1e-12)
    assert suspicion_timeout(min_s, max_s, confirmations + 1, expected) <= t


@pytest.mark.parametrize(
    ("deltas", "score"),
    [
        ([], 0),
        ([1], 1),
        ([1, 1, 1], 3),
        ([-1], 0),  # never below healthy
        ([1] * 20, 7),  # never above max - 1
        ([5, -2], 3),
        ([100, -100], 0),
        ([3, 3, 3, -1], 6),
    ],
)
def test_awareness_is_bounded(deltas: list[int], score: int) -> None:
    aw = Awareness(8)
    for d in deltas:
        aw.apply(d)
    assert aw.score == score
    assert aw.scale(0.5) == pytest.approx(0.5 * (score + 1))


def test_awareness_max_comes_from_the_config() -> None:
    m = Membership("a", addr("a"), with_overrides(LAN, awareness_max=3), random.Random(1), 0.0)
    for _ in range(10):
        m.awareness.apply(1)
    assert m.awareness.score == 2
    assert m.awareness.scale(1.0) == 3.0


def test_a_late_timer_raises_awareness_and_is_counted() -> None:
    m = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    m.timer_overshoot(0.01)  # ordinary jitter
    assert m.awareness.score == 0 and "loop_lag_events" not in m.counters
    m.timer_overshoot(LAN.loop_lag_limit + 0.5)
    m.timer_overshoot(2.0)
    assert m.awareness.score == 2 and m.counters["loop_lag_events"] == 2
    assert m.awareness.scale(LAN.probe_timeout) == 3 * LAN.probe_timeout


def test_presets_are_ordered_by_patience() -> None:
    local, lan, wan, edge = (PRESETS[k] for k in ("local", "lan", "wan", "edge"))
    for cfg in PRESETS.values():
        assert 0 < cfg.probe_timeout < cfg.probe_interval
        assert cfg.suspicion_max_mult > 1
    assert local.probe_interval < lan.probe_interval < wan.probe_interval
    assert edge.indirect_checks > lan.indirect_checks
    assert edge.retransmit_mult > lan.retransmit_mult
    assert edge.suspicion_confirmations > lan.suspicion_confirmations


def test_two_more_accusers_bring_a_lan_suspicion_to_its_minimum() -> None:
    a = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    for name in ("b", "c", "d", "e", "f", "g", "h", "i", "j"):
        a.handle_alive(wire.Alive(name, addr(name), 0), 0.0)
    a.handle_suspect(wire.Suspect("b", 0, "c"), 10.0)
    min_s = suspicion_min_timeout(LAN.suspicion_mult, 10, LAN.probe_interval)
    assert a._suspicions["b"].deadline == pytest.approx(10.0 + LAN.suspicion_max_mult * min_s)
    a.handle_suspect(wire.Suspect("b", 0, "d"), 11.0)
    assert 10.0 + min_s < a._suspicions["b"].deadline < 10.0 + LAN.suspicion_max_mult * min_s
    a.handle_suspect(wire.Suspect("b", 0, "e"), 12.0)
    assert a._suspicions["b"].deadline == pytest.approx(10.0 + min_s)


# --- the broadcast queue -----------------------------------------------------------------


def test_newer_broadcast_replaces_older_for_the_same_key() -> None:
    q = BroadcastQueue()
    q.push(("m", "b"), b"suspect b")
    q.push(("m", "b"), b"alive b inc 2")
    q.push(("f", "b"), b"facts b")
    assert len(q) == 2
    assert sorted(q.take(1000, 0, 10)) == [b"alive b inc 2", b"facts b"]


def test_replacement_resets_the_transmit_count() -> None:
    q = BroadcastQueue()
    q.push(("m", "b"), b"old")
    q.take(1000, 0, 3)
    q.take(1000, 0, 3)
    q.push(("m", "b"), b"new")
    assert [q.take(1000, 0, 3) for _ in range(4)] == [[b"new"]] * 3 + [[]]


def test_broadcasts_are_dropped_after_the_limit() -> None:
    q = BroadcastQueue()
    q.push(("m", "a"), b"x" * 10)
    assert [q.take(1000, 0, 3) for _ in range(4)] == [[b"x" * 10]] * 3 + [[]]
    assert len(q) == 0


def test_broadcast_take_respects_the_byte_budget() -> None:
    q = BroadcastQueue()
    for i in range(10):
        q.push(("m", f"n{i}"), bytes([i]) * 100)
    out = q.take(350, 5, 10)
    assert len(out) == 3  # 3 * (100 + 5) <= 350 < 4 * 105
    assert sum(len(p) + 5 for p in out) <= 350
    assert q.take(0, 0, 10) == []
    assert q.take(-5, 0, 10) == []
    assert len(q) == 10


def test_broadcast_order_least_sent_then_newest() -> None:
    q = BroadcastQueue()
    q.push(("m", "a"), b"a" * 50)
    q.push(("m", "b"), b"b" * 50)
    assert q.take(60, 0, 10) == [b"b" * 50]  # newest first
    assert q.take(60, 0, 10) == [b"a" * 50]  # then the one sent less
    q.push(("m", "c"), b"c" * 50)
    assert q.take(60, 0, 10) == [b"c" * 50]
    assert q.take(200, 0, 10) == [b"c" * 50, b"b" * 50, b"a" * 50]  # ties: newest first


def test_an_item_too_large_for_the_budget_does_not_block_smaller_ones() -> None:
    q = BroadcastQueue()
    q.push(("m", "small"), b"s" * 10)
    q.push(("f", "big"), b"B" * 500)
    assert q.take(100, 0, 10) == [b"s" * 10]
    q.drop(("f", "big"))
    q.drop(("f", "nothing"))
    assert len(q) == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcdef"), st.binary(max_size=120)),
        min_size=1,
        max_size=30,
    ),
    st.integers(1, 400),
    st.integers(0, 8),
    st.integers(1, 6),
)
def test_broadcast_queue_properties(
    pushes: list[tuple[str, bytes]], budget: int, overhead: int, limit: int
) -> None:
    q = BroadcastQueue()
    latest: dict[str, bytes] = {}
    for i, (key, data) in enumerate(pushes):
        payload = i.to_bytes(2, "big") + data  # each push distinct
        q.push(("m", key), payload)
        latest[key] = payload
    assert len(q) == len(latest)
    sent: dict[bytes, int] = {}
    for _ in range(limit * len(latest) + 1):  # each round sends at least one that fits
        out = q.take(budget, overhead, limit)
        assert sum(len(p) + overhead for p in out) <= budget
        assert len(out) == len(set(out))  # one key at most once per packet
        for p in out:
            assert p in latest.values()  # never stale news
            sent[p] = sent.get(p, 0) + 1
    assert all(count <= limit for count in sent.values())
    assert len(q) == 0 or any(len(p) + overhead > budget for p in latest.values())


def _conflicts(m: Membership) -> list[NameConflict]:
    return [e for e in m.drain() if isinstance(e, NameConflict)]


def test_a_second_node_with_a_live_members_name_is_refused_by_the_mesh() -> None:
    a = Membership("a", "10.0.0.1:7946", LAN, random.Random(1), 0.0)
    a.handle_alive(wire.Alive("x", "10.0.0.2:7946", 3), 0.0)
    a.drain()
    # The impostor joins with a newer incarnation at another address: refused, told once.
    impostor = [["x", "10.0.0.9:7946", 7, ALIVE, 7, 0, {}]]
    a.merge_remote_state(impostor, 1.0)
    a.merge_remote_state(impostor, 2.0)
    a.handle_alive(wire.Alive("x", "10.0.0.9:7946", 8), 3.0)
    assert a.members["x"].addr == "10.0.0.2:7946" and a.members["x"].incarnation == 3
    assert _conflicts(a) == [NameConflict("x", "10.0.0.2:7946", "10.0.0.9:7946")]
    assert a.counters["name_conflicts"] == 3
    # Once the first x was declared dead, x may come back at a new address (it moved).
    a.handle_dead(wire.Dead("x", 3, "a"), 4.0)
    a.handle_alive(wire.Alive("x", "10.0.0.9:7946", 9), 5.0)
    assert (a.members["x"].addr, a.members["x"].state) == ("10.0.0.9:7946", ALIVE)


def test_a_node_does_not_join_a_mesh_that_has_a_live_member_of_its_name() -> None:
    x = Membership("x", "10.0.0.9:7946", LAN, random.Random(1), 0.0, incarnation=1)
    x.drain()
    state = [["a", "10.0.0.1:7946", 1, ALIVE, 1, 0, {}],
             ["x", "10.0.0.2:7946", 5, ALIVE, 5, 0, {}]]
    x.merge_remote_state(state, 1.0)
    assert set(x.members) == {"x"} and x.me.addr == "10.0.0.9:7946"
    assert x.me.incarnation == 1  # no refutation war with the real x
    assert _conflicts(x) == [NameConflict("x", "10.0.0.9:7946", "10.0.0.2:7946")]
    # A gossiped Alive of the other x is not refuted either.
    x.handle_alive(wire.Alive("x", "10.0.0.2:7946", 6), 2.0)
    assert x.me.incarnation == 1 and x.me.addr == "10.0.0.9:7946"
    # Restarted at a new address after the mesh declared the old one dead: it joins.
    state[1][3] = DEAD
    x.merge_remote_state(state, 3.0)
    assert "a" in x.members and x.me.incarnation > 5


# --- what a peer can make a node hold (issue 11) ----------------------------------------


def fake_rows(n: int, facts: dict[str, object] | None = None) -> list[list[object]]:
    return [[f"fake{i}", f"10.9.{i // 250}.{i % 250}:7946", 1, ALIVE, 1, 0, facts or {}]
            for i in range(n)]


def test_a_push_pull_of_twenty_thousand_fake_members_adds_at_most_the_cap_and_is_cheap(
) -> None:
    """Before the cap, one forged push-pull of 20,000 members took every row (1.2 s) and
    then minutes of CPU gossiping them."""
    import time

    m = Membership("a", addr("a"), LAN, random.Random(1), 0.0)
    m.set_confirming(True, 0.0)  # as the coordinator: it pings every newcomer
    m.drain()
    facts = {"dev": [["gpu0", "gpu", "fake", 1 << 40, 1000, 0, 0, 1000, 1 << 40]]}
    started = time.perf_counter()
    assert m.merge_remote_state(fake_rows(20_000, facts), 1.0) == 0
    m.drain()
    assert len(m.members) == 1 + LAN.max_new_per_message == 65
    assert m.counters["members_dropped_per_message"] == 20_000 - 64
    now = 1.0
    while now < 11.0:  # ten seconds of gossip, probes and confirmation pings
        now = max(m.next_deadline(), now + 0.001)
        m.tick(now)
        m.drain()
    assert time.perf_counter() - started < 2.0  # about 0.15 s on a 2-core machine


def test_a_gossip_packet_adds_at_most_the_cap_of_new_members() -> None:
    config = with_overrides(LAN, max_new_per_message=3)
    m = Membership("a", addr("a"), config, random.Random(1), 0.0)
    alive: list[wire.Message] = [wire.Alive(f"g{i}", addr(f"g{i}"), 0) for i in range(5)]
    m.step(addr("g0"), alive, 1.0)
    assert sorted(m.members) == ["a", "g0", "g1", "g2"]
    assert m.counters["members_dropped_per_message"] == 2
    m.step(addr("g0"), alive, 2.0)  # the next packet may add more
    assert len(m.members) == 6


def test_a_node_holds_at_most_max_members() -> None:
    config = with_overrides(LAN, max_members=100)
    m = Membership("a", addr("a"), config, random.Random(1), 0.0)
    for start in range(0, 1000, 64):
        rows = [[f"f{i}", f"10.0.0.{i % 250}:{1000 + i}", 1, ALIVE, -1, -1, {}]
                for i in range(start, start + 64)]
        m.merge_remote_state(rows, 1.0)
    assert len(m.members) == 100
    assert m.counters["members_dropped_too_many"] == 1024 - 99


def test_a_newcomer_to_a_mesh_larger_than_the_cap_learns_all_of_it_within_seconds() -> None:
    config = with_overrides(LAN, max_new_per_message=4)
    net = cluster(12, config=config)
    net.add("late", join="n0")
    late = net.nodes["late"]
    assert len(late.members) <= 1 + 4 + 1 and late.catching_up  # n0's reply was cut short
    net.run_for(3)
    assert net.converged([f"n{i}" for i in range(12)] + ["late"])


def test_a_member_is_confirmed_only_once_it_answers_a_ping() -> None:
    net = Net()
    a = net.add("a")
    a.set_confirming(True, net.now)  # as the coordinator does
    assert a.me.confirmed  # itself
    b = net.add("b", join="a")
    net.run_for(0.001)
    assert a.members["b"].confirmed  # pinged as soon as heard of (at the next tick)
    assert not b.members["a"].confirmed  # b pings nobody out of turn ...
    net.run_for(2.0)
    assert b.members["a"].confirmed  # ... but its first probe of a confirms it
    assert ("a", "b") in {(obs, name) for _, obs, name in net.confirmed}
    # A ghost, announced by gossip at an address nobody listens on: pinged a few times,
    # never confirmed, and probed to death like any silent member.
    a.step(addr("b"), [wire.Alive("ghost", "10.9.9.9:7946", 0)], net.now)
    net.run_for(1.0)
    assert a.members["ghost"].state == ALIVE and not a.members["ghost"].confirmed
    pings = [msgs for src, dst, msgs in net.sent if src == "a" and dst == "10.9.9.9:7946"]
    assert len(pings) >= 1
    net.run_for(60)
    assert not a.members["ghost"].confirmed and a.members["ghost"].state == DEAD


def test_a_member_that_moves_must_answer_again() -> None:
    net = Net()
    a = net.add("a")
    a.set_confirming(True, net.now)
    net.add("b", join="a")
    net.run_for(0.001)
    assert a.members["b"].confirmed
    # (A live member's name at another address is a second node, refused: a node moves
    # once its old address was declared dead.)
    inc = a.members["b"].incarnation
    a.step(addr("c"), [wire.Dead("b", inc, "c"), wire.Alive("b", "10.9.9.9:7946", inc + 1)],
           net.now)
    assert a.members["b"].addr == "10.9.9.9:7946" and not a.members["b"].confirmed
