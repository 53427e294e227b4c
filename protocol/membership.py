"""SWIM membership with Lifeguard's refinements, sans-IO.

Theory of operation
-------------------
The runtime feeds decoded packets to ``step(src, msgs, now)`` and calls ``tick(now)`` no
later than ``next_deadline()``. Everything the node wants done comes out of ``drain()`` as
effects: UDP packets to send, push-pull exchanges to run over TCP, and member events.

Each protocol period the node probes one member (round-robin over a shuffled list): a
direct Ping, then after ``probe_timeout`` an IndirectPing through ``indirect_checks`` peers,
and if nothing came back by the end of the period the member becomes *suspect*. A suspect
that does not refute (by announcing a higher incarnation) before its suspicion timeout is
declared *dead*. Membership changes ride on every packet as piggybacked broadcasts and are
also gossiped to a few random members every ``gossip_interval``.

Each node carries versioned *facts* (devices, usage, coordinator claim), merged by
``(incarnation, version)``.

What a peer can make a node hold is bounded: one packet or push-pull adds at most
``max_new_per_message`` members it did not know, and a node holds at most ``max_members``;
the rest is dropped and counted. A push-pull cut short at the first bound is followed by
another soon, so a newcomer to a large mesh still learns all of it within seconds. A member
is *confirmed* once it has answered one of this node's probes (directly or through a
helper): members only heard of in gossip, which may not exist at all, are not.

Rules of this file: no sockets, no clock reads, no global randomness (``rng`` is injected).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any

from flexmesh.protocol import vivaldi, wire
from flexmesh.protocol.broadcast import BroadcastQueue, retransmit_limit
from flexmesh.protocol.suspicion import Awareness, suspicion_min_timeout, suspicion_timeout

ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
LEFT = "left"
STATES = (ALIVE, SUSPECT, DEAD, LEFT)
_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 2}
# How far a member's incarnation may rise past what this node knows in one message (it
# rises by one per refutation or restart), and a facts version at one incarnation (one
# per publish). A bigger jump is a forgery or a bug: taken, it could never be superseded
# by the member itself. Dropped and counted.
INCARNATION_STEP = 1 << 16
VERSION_STEP = 1 << 20
CONFIRM_TRIES = 3  # pings to confirm a newcomer before its turn among the probes comes


@dataclass(frozen=True, slots=True)
class Config:
    """Timings of the protocol; see PRESETS for the values per environment."""

    probe_interval: float = 1.0  # one probe per period
    probe_timeout: float = 0.5  # direct ack wait before asking others
    indirect_checks: int = 3  # peers asked to probe on our behalf
    suspicion_mult: float = 4.0  # suspicion min = mult * max(1, log10 N) * interval
    suspicion_max_mult: float = 6.0  # suspicion max = this * min
    # Independent confirmations (other accusers) that bring a suspicion down to its minimum,
    # on a log scale (Lifeguard's K). Two, as memberlist's LAN default does: with three
    # accusers a live node has still the minimum to refute. More where loss is heavy.
    suspicion_confirmations: int = 2
    retransmit_mult: int = 4  # broadcast limit = mult * ceil(log10(N + 1))
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    pushpull_interval: float = 30.0  # scaled up with log N beyond 32 nodes
    reconnect_interval: float = 10.0  # push-pull with one dead member (heals partitions)
    dead_reap: float = 3600.0  # forget dead members after this long
    awareness_max: int = 8
    loop_lag_limit: float = 0.25  # a timer firing this much late says our own loop is slow
    # What a peer can make this node hold. New members one packet or push-pull may add: a
    # forged push-pull of 20,000 members would otherwise cost seconds of CPU, and minutes
    # of gossip. A cut-short push-pull is followed by another one gossip_interval later.
    max_new_per_message: int = 64
    max_members: int = 10_000  # members held in all (dead ones count until reaped)


PRESETS: dict[str, Config] = {
    # One machine or a container host: loopback never loses packets and answers in
    # microseconds, so probe fast and time out fast.
    "local": Config(
        probe_interval=0.5,
        probe_timeout=0.2,
        suspicion_mult=3.0,
        gossip_interval=0.1,
        pushpull_interval=15.0,
    ),
    # A switched LAN: round trips well under 10 ms, rare loss.
    "lan": Config(),
    # Between sites: 100-300 ms round trips, occasional loss.
    "wan": Config(
        probe_interval=5.0,
        probe_timeout=3.0,
        suspicion_mult=6.0,
        gossip_interval=0.5,
        gossip_nodes=4,
        pushpull_interval=60.0,
    ),
    # Drone radio links: 10-30% loss and round trips up to a second or more. Long
    # timeouts, more indirect helpers and more retransmits keep false suspicions away.
    "edge": Config(
        probe_interval=2.0,
        probe_timeout=1.5,
        indirect_checks=5,
        suspicion_mult=6.0,
        suspicion_confirmations=3,
        retransmit_mult=6,
        gossip_interval=0.5,
        gossip_nodes=4,
        pushpull_interval=30.0,
    ),
}


@dataclass(slots=True)
class Member:
    name: str
    addr: str
    incarnation: int = 0
    state: str = ALIVE
    since: float = 0.0  # when the state last changed
    facts_inc: int = -1
    facts_version: int = -1
    facts: dict[str, Any] = field(default_factory=dict)
    # Answered a probe of this node (or is this node) at ``addr``: only a confirmed member
    # is trusted with placements. A member that moves to another address must answer again.
    confirmed: bool = False


# --- effects --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendPacket:
    addr: str
    data: bytes


@dataclass(frozen=True, slots=True)
class StartPushPull:
    addr: str
    join: bool


@dataclass(frozen=True, slots=True)
class MemberEvent:
    name: str
    state: str
    prev: str | None  # None for a member seen for the first time
    addr: str


@dataclass(frozen=True, slots=True)
class FactsEvent:
    name: str


@dataclass(frozen=True, slots=True)
class NameConflict:
    """Two live nodes claim one name: the one known at ``known`` (this node itself, when
    ``name`` is ours) and another at ``other``. The other is refused, once per address."""

    name: str
    known: str
    other: str


@dataclass(frozen=True, slots=True)
class ConfirmedEvent:
    """A member answered a probe for the first time (at its current address)."""

    name: str


Effect = (SendPacket | StartPushPull | MemberEvent | FactsEvent | NameConflict
          | ConfirmedEvent)


@dataclass(slots=True)
class _Probe:
    target: str
    seq: int
    started: float
    direct_deadline: float
    acked: bool = False
    nacks: int = 0
    indirect_sent: int = 0


@dataclass(slots=True)
class _Relay:
    requester_addr: str
    orig_seq: int
    deadline: float
    want_nack: bool


@dataclass(slots=True)
class _Suspicion:
    started: float
    min_s: float
    max_s: float
    expected: int
    confirmers: set[str]
    deadline: float


class Membership:
    def __init__(
        self,
        name: str,
        addr: str,
        config: Config,
        rng: random.Random,
        now: float,
        incarnation: int = 0,
    ) -> None:
        self.name = name
        self.addr = addr
        self.config = config
        self.rng = rng
        # This node's network coordinate, and the latest each peer's ack carried.
        self.coord = vivaldi.Coordinate()
        self.coords: dict[str, vivaldi.Coordinate] = {}
        self.members: dict[str, Member] = {
            name: Member(name, addr, incarnation, ALIVE, now, incarnation, 0, {}, True)
        }
        self.awareness = Awareness(config.awareness_max)
        self._out: list[Effect] = []
        self._queue = BroadcastQueue()
        self._seq = 0
        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        # Pings to members not yet confirmed, sent as soon as they are heard of (so a
        # newcomer may draw placements a round trip later, not when its turn to be probed
        # comes): seq -> the member, its deadline, the tries left. Deadlines rise in
        # insertion order, so the first entry is the next to expire.
        self._confirming: dict[int, tuple[str, float, int]] = {}
        self._confirm_new = False  # see set_confirming
        # Members to ping at the next tick (name -> tries left), once the input that made
        # them known is done with: an election it causes may turn confirming off.
        self._to_confirm: dict[str, int] = {}
        self._confirm_due = now
        self._new_left: int | None = None  # new members the message being read may add
        self.catching_up = False  # the last push-pull merged was cut short: more to learn
        self._next_probe = now + rng.uniform(0, config.probe_interval)
        self._next_gossip = now + config.gossip_interval
        self._next_pushpull = now + self._pushpull_every()
        self._next_reconnect = now + config.reconnect_interval
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, _Suspicion] = {}
        self._left = False
        self._seeds: list[str] = []
        self.counters: dict[str, int] = {}
        self._conflicts: set[tuple[str, str]] = set()  # (name, address) refused and told
        self._enqueue_alive(self.me)
        self._enqueue_facts(self.me)

    # --- queries ------------------------------------------------------------------------

    @property
    def me(self) -> Member:
        return self.members[self.name]

    def live_count(self) -> int:
        return sum(1 for m in self.members.values() if m.state in (ALIVE, SUSPECT))

    def drain(self) -> list[Effect]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float:
        if self._left:
            return self._next_probe  # only the idle beat of tick() after a leave
        times = [self._next_probe, self._next_pushpull, self._next_reconnect]
        if len(self._queue):
            times.append(self._next_gossip)
        if self._probe and not self._probe.acked and not self._probe.indirect_sent:
            times.append(self._probe.direct_deadline)
        times.extend(r.deadline for r in self._relays.values())
        if self._confirming:
            times.append(next(iter(self._confirming.values()))[1])
        if self._to_confirm:
            times.append(self._confirm_due)
        times.extend(s.deadline for s in self._suspicions.values())
        return min(times)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    # --- local actions ------------------------------------------------------------------

    def join(self, seeds: list[str]) -> None:
        """Join through seeds; while we know nobody alive, they are tried again every
        ``reconnect_interval`` (a seed that was down, or a key not yet rotated in)."""
        self._seeds = [a for a in seeds if a != self.addr]
        for addr in self._seeds:
            self._out.append(StartPushPull(addr, join=True))

    @property
    def left(self) -> bool:
        """Whether this node said it leaves the mesh."""
        return self._left

    def leave(self, now: float) -> None:
        """Announce a graceful leave: others mark this node ``left``, not ``dead``."""
        me = self.me
        self._left = True
        me.state, me.since = LEFT, now
        dead = wire.Dead(self.name, me.incarnation, self.name)
        self._queue.push(("m", self.name), wire.encode_message(dead))
        peers = [m for m in self.members.values() if m.name != self.name and m.state == ALIVE]
        for m in self.rng.sample(peers, min(len(peers), 2 * self.config.gossip_nodes)):
            self._send(m.addr, [], piggyback=True)

    def timer_overshoot(self, seconds: float) -> None:
        """The runtime's timer fired ``seconds`` after it was due. Lifeguard: a node whose
        own loop lags is the slow one; raise its awareness so it probes and times out more
        patiently instead of accusing healthy peers."""
        if seconds > self.config.loop_lag_limit:
            self._count("loop_lag_events")
            self.awareness.apply(1)

    def set_facts(self, data: dict[str, Any]) -> None:
        me = self.me
        me.facts = data
        me.facts_version += 1
        me.facts_inc = me.incarnation
        self._enqueue_facts(me)
        self._out.append(FactsEvent(self.name))

    # --- input --------------------------------------------------------------------------

    def step(self, src: str, msgs: list[wire.Message], now: float) -> None:
        if self._left:
            return
        self._new_left = self.config.max_new_per_message
        try:
            # Pings last: their acks then carry whatever the rest of the packet made us say
            # (a suspect's refutation reaches its prober at once: the buddy system).
            for msg in sorted(msgs, key=lambda m: isinstance(m, wire.Ping)):
                self._step_one(src, msg, now)
        finally:
            self._new_left = None

    def _step_one(self, src: str, msg: wire.Message, now: float) -> None:
        if isinstance(msg, wire.Ping):
            self._handle_ping(msg)
        elif isinstance(msg, wire.Ack):
            self._handle_ack(msg, now)
        elif isinstance(msg, wire.Nack):
            self._handle_nack(msg)
        elif isinstance(msg, wire.IndirectPing):
            self._handle_indirect_ping(msg, now)
        elif isinstance(msg, wire.Alive):
            self.handle_alive(msg, now)
        elif isinstance(msg, wire.Suspect):
            self.handle_suspect(msg, now, src)
        elif isinstance(msg, wire.Dead):
            self.handle_dead(msg, now, src)
        elif isinstance(msg, wire.Facts):
            self.handle_facts(msg)
        else:
            self._count("unexpected_udp_message")

    def _handle_ping(self, msg: wire.Ping) -> None:
        if msg.target != self.name:
            self._count("misdirected_ping")
            return
        self._send(msg.source_addr, [wire.Ack(msg.seq, self.name, self.coord.to_wire())])

    def _handle_ack(self, msg: wire.Ack, now: float) -> None:
        asked = self._confirming.pop(msg.seq, None)
        if asked is not None:
            self._confirm(self.members.get(asked[0]))
            return
        probe = self._probe
        if probe is not None and msg.seq == probe.seq and not probe.acked:
            probe.acked = True
            self.awareness.apply(-1)
            self._confirm(self.members.get(probe.target))
            self._observe_rtt(msg, now - probe.started)
            return
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            self._send(relay.requester_addr, [wire.Ack(relay.orig_seq, msg.source)])

    def _observe_rtt(self, ack: wire.Ack, rtt: float) -> None:
        """A direct probe's round trip: this node's coordinate moves, the acker's is kept
        (Vivaldi, as Serf does: the coordinates ride on the probes, not in gossip)."""
        peer = vivaldi.Coordinate.from_wire(ack.coord) if ack.coord else None
        if peer is None or ack.source == self.name:
            return
        self.coords[ack.source] = peer
        if vivaldi.update(self.coord, peer, rtt, self.rng):
            self._count("rtt_samples")

    def rtt(self, a: str, b: str) -> float | None:
        """The round trip between members ``a`` and ``b`` the coordinates predict, in
        seconds; None where one of them has not been measured yet."""
        ca = self.coord if a == self.name else self.coords.get(a)
        cb = self.coord if b == self.name else self.coords.get(b)
        return None if ca is None or cb is None else ca.distance(cb)

    def _handle_nack(self, msg: wire.Nack) -> None:
        if self._probe is not None and msg.seq == self._probe.seq:
            self._probe.nacks += 1

    def _handle_indirect_ping(self, msg: wire.IndirectPing, now: float) -> None:
        seq = self._next_seq()
        # Answer a little before the requester's own wait ends, so that a nack still counts.
        deadline = now + 0.8 * self.awareness.scale(self.config.probe_timeout)
        self._relays[seq] = _Relay(msg.source_addr, msg.seq, deadline, msg.nack)
        self._send(msg.target_addr, [wire.Ping(seq, msg.target, self.name, self.addr)])

    def _implausible(self, name: str, incarnation: int) -> bool:
        """Whether ``incarnation`` jumps too far past what this node knows of ``name``."""
        m = self.me if name == self.name else self.members.get(name)
        if m is None or incarnation <= m.incarnation + INCARNATION_STEP:
            return False
        self._count("implausible_incarnation")
        return True

    def handle_alive(self, msg: wire.Alive, now: float) -> None:
        if self._implausible(msg.node, msg.incarnation):
            return
        if msg.node == self.name:
            if msg.addr != self.addr:
                self._conflict(self.name, self.addr, msg.addr)  # another node took our name
            elif msg.incarnation > self.me.incarnation:
                # Someone thinks we are at a newer incarnation than we know (we restarted):
                # jump past it so our own word wins.
                self._refute(msg.incarnation, now)
            return
        m = self.members.get(msg.node)
        if m is None:
            if self._add(Member(msg.node, msg.addr, msg.incarnation, ALIVE, now)):
                self._enqueue_alive(self.members[msg.node])
            return
        if msg.addr != m.addr and m.state in (ALIVE, SUSPECT):
            # A live member's name claimed at another address: a second node with the
            # same name, refused (a node that moved is taken once it was declared dead).
            self._conflict(m.name, m.addr, msg.addr)
            return
        if msg.incarnation <= m.incarnation:
            return
        m.incarnation = msg.incarnation
        if msg.addr != m.addr:
            m.addr, m.confirmed = msg.addr, False
            self._ask_to_confirm(m, now)
        self._suspicions.pop(m.name, None)
        self._set_state(m, ALIVE, now)
        self._enqueue_alive(m)

    def _correct_stale_rumour(self, m: Member | None, incarnation: int, src: str | None) -> None:
        """A peer spreads suspicion or death of ``m`` at an incarnation ``m`` has already
        refuted: it missed every copy of the refutation (lossy links). Send it the newer
        Alive directly, so its suspicion ends before its timeout turns into a false DEAD.
        Bounded by the stale peer's own retransmit limit: one small reply per copy."""
        if src is None or m is None or m.state != ALIVE or incarnation >= m.incarnation:
            return
        self._count("stale_rumours_corrected")
        self._send(src, [wire.Alive(m.name, m.addr, m.incarnation)], piggyback=False)

    def handle_suspect(self, msg: wire.Suspect, now: float, src: str | None = None) -> None:
        if self._implausible(msg.node, msg.incarnation):
            return
        if msg.node == self.name:
            if msg.incarnation >= self.me.incarnation:
                self._refute(msg.incarnation, now)
            else:
                # Suspected at an incarnation we already refuted: our Alive did not reach
                # that peer (lost packets). Send it again, riding the ack to the prober.
                self._enqueue_alive(self.me)
            return
        m = self.members.get(msg.node)
        self._correct_stale_rumour(m, msg.incarnation, src)
        if m is None or msg.incarnation < m.incarnation or m.state in (DEAD, LEFT):
            return
        if m.state == SUSPECT and msg.incarnation == m.incarnation:
            self._confirm_suspicion(m, msg.source, now)
            return
        m.incarnation = msg.incarnation
        self._start_suspicion(m, msg.source, now)

    def handle_dead(self, msg: wire.Dead, now: float, src: str | None = None) -> None:
        if self._implausible(msg.node, msg.incarnation):
            return
        if msg.node == self.name:
            if msg.source != self.name and msg.incarnation >= self.me.incarnation:
                self._refute(msg.incarnation, now)
            elif msg.source != self.name:
                self._enqueue_alive(self.me)  # as for a stale suspicion, above
            return
        m = self.members.get(msg.node)
        self._correct_stale_rumour(m, msg.incarnation, src)
        if m is None or msg.incarnation < m.incarnation or m.state in (DEAD, LEFT):
            return
        m.incarnation = msg.incarnation
        self._suspicions.pop(m.name, None)
        self._set_state(m, LEFT if msg.source == msg.node else DEAD, now)
        self._queue.push(("m", m.name), wire.encode_message(msg))

    def handle_facts(self, msg: wire.Facts) -> None:
        if msg.node == self.name:
            return
        m = self.members.get(msg.node)
        if m is None or (msg.incarnation, msg.version) <= (m.facts_inc, m.facts_version):
            return
        if (msg.incarnation > max(m.incarnation, m.facts_inc) + INCARNATION_STEP
                or (msg.incarnation == m.facts_inc and m.facts_version >= 0
                    and msg.version > m.facts_version + VERSION_STEP)):
            self._count("implausible_facts")
            return
        m.facts_inc, m.facts_version, m.facts = msg.incarnation, msg.version, msg.data
        self._queue.push(("f", m.name), wire.encode_message(msg))
        self._out.append(FactsEvent(m.name))

    # --- push-pull (anti-entropy) -----------------------------------------------------------

    def local_state(self) -> list[Any]:
        return [
            [m.name, m.addr, m.incarnation, m.state, m.facts_inc, m.facts_version, m.facts]
            for m in self.members.values()
        ]

    def merge_remote_state(self, rows: list[Any], now: float) -> int:
        """Merge a peer's full state; returns how many rows were malformed and skipped.
        A state in which another live node has this node's name is not merged at all:
        this node does not join a mesh that already has a member of its name."""
        if any(self._claims_my_name(row) for row in rows):
            return 0
        self._new_left = self.config.max_new_per_message
        cut_before = self.counters.get("members_dropped_per_message", 0)
        try:
            bad = self._merge_rows(rows, now)
        finally:
            self._new_left = None
        self.catching_up = self.counters.get("members_dropped_per_message", 0) > cut_before
        if self.catching_up:
            # There is more of the mesh to learn: pull again soon, not in 30 s.
            self._next_pushpull = min(self._next_pushpull, now + self.config.gossip_interval)
        if bad:
            self.counters["bad_pushpull_rows"] = self.counters.get("bad_pushpull_rows", 0) + bad
        return bad

    def _merge_rows(self, rows: list[Any], now: float) -> int:
        bad = 0
        for row in rows:
            try:
                name, addr, inc, state, f_inc, f_ver, facts = row
                ok = (
                    isinstance(name, str)
                    and isinstance(addr, str)
                    and isinstance(inc, int)
                    and state in STATES
                    and isinstance(f_inc, int)
                    and isinstance(f_ver, int)
                    and isinstance(facts, dict)
                )
            except (TypeError, ValueError):
                ok = False
            if not ok:
                bad += 1
                continue
            self._merge_row(name, addr, inc, state, now)
            if f_ver >= 0:
                self.handle_facts(wire.Facts(name, f_inc, f_ver, facts))
        return bad

    def _claims_my_name(self, row: Any) -> bool:
        """Whether a push-pull row is a live node of this node's name at another address
        (a seed's answer when a second node joins with a name already taken)."""
        if not (isinstance(row, list | tuple) and len(row) == 7 and row[0] == self.name):
            return False
        addr, state = row[1], row[3]
        if isinstance(addr, str) and addr != self.addr and state in (ALIVE, SUSPECT):
            self._conflict(self.name, self.addr, addr)
            return True
        return False

    def _conflict(self, name: str, known: str, other: str) -> None:
        self._count("name_conflicts")
        if (name, other) not in self._conflicts:
            self._conflicts.add((name, other))
            self._out.append(NameConflict(name, known, other))

    def _merge_row(self, name: str, addr: str, inc: int, state: str, now: float) -> None:
        if name == self.name:
            # Whatever a peer believes about us, only we say we are alive: refute anything
            # else, including a "left" from before a restart.
            if self._implausible(name, inc):
                return
            if (state != ALIVE and inc >= self.me.incarnation) or inc > self.me.incarnation:
                self._refute(inc, now)
            return
        if state == ALIVE:
            self.handle_alive(wire.Alive(name, addr, inc), now)
        elif state == LEFT:
            if name in self.members:
                self.handle_dead(wire.Dead(name, inc, name), now)
            else:
                self._add(Member(name, addr, inc, LEFT, now))
        else:
            # A peer's "dead" is only a suspicion here: we give the node its own chance
            # to refute before we believe it (Lifeguard; memberlist's mergeState).
            if name in self.members or self._add(Member(name, addr, inc, ALIVE, now)):
                self.handle_suspect(wire.Suspect(name, inc, "push-pull"), now)

    # --- time ---------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        if self._left:
            self._next_probe = now + self.config.probe_interval
            return
        self._tick_suspicions(now)
        self._tick_relays(now)
        self._tick_confirming(now)
        probe = self._probe
        if probe and not probe.acked and not probe.indirect_sent and now >= probe.direct_deadline:
            self._send_indirect(probe, now)
        if now >= self._next_probe:
            self._finish_probe(now)
            self._start_probe(now)
            self._next_probe = now + self.awareness.scale(self.config.probe_interval)
        if now >= self._next_gossip:
            self._gossip()
            self._next_gossip = now + self.config.gossip_interval
        if now >= self._next_pushpull:
            self._start_pushpull()
            self._next_pushpull = now + self._pushpull_every()
        if now >= self._next_reconnect:
            self._reconnect()
            if self.live_count() == 1:
                for addr in self._seeds:
                    self._out.append(StartPushPull(addr, join=True))
            self._next_reconnect = now + self.config.reconnect_interval
        self._tick_suspicions(now)  # a confirmation above may have ended one already
        self._reap(now)

    def _tick_suspicions(self, now: float) -> None:
        for name, s in list(self._suspicions.items()):
            if now < s.deadline:
                continue
            del self._suspicions[name]
            m = self.members[name]
            if m.state != SUSPECT:
                continue
            self._set_state(m, DEAD, now)
            msg = wire.Dead(name, m.incarnation, self.name)
            self._queue.push(("m", name), wire.encode_message(msg))

    def _tick_relays(self, now: float) -> None:
        for seq, relay in list(self._relays.items()):
            if now >= relay.deadline:
                del self._relays[seq]
                if relay.want_nack:
                    self._send(relay.requester_addr, [wire.Nack(relay.orig_seq, self.name)])

    def _finish_probe(self, now: float) -> None:
        probe, self._probe = self._probe, None
        if probe is None or probe.acked:
            return
        # Lifeguard: each expected nack that never came says *we* may be the slow one; with
        # nobody to send nacks, any failed probe counts against our own health.
        if probe.indirect_sent > 0:
            self.awareness.apply(max(probe.indirect_sent - probe.nacks, 0))
        else:
            self.awareness.apply(1)
        m = self.members.get(probe.target)
        if m is None or m.state not in (ALIVE, SUSPECT):
            return
        self._count("probe_failed")
        if m.state == SUSPECT:
            self._confirm_suspicion(m, self.name, now)  # our own, independent failure
            return
        self._start_suspicion(m, self.name, now)

    def _start_probe(self, now: float) -> None:
        target = self._next_probe_target()
        if target is None:
            return
        seq = self._next_seq()
        timeout = self.awareness.scale(self.config.probe_timeout)
        self._probe = _Probe(target.name, seq, now, now + timeout)
        msgs: list[wire.Message] = [wire.Ping(seq, target.name, self.name, self.addr)]
        if target.state == SUSPECT:
            # Buddy system: tell the suspect in the ping itself so it can refute at once.
            msgs.append(wire.Suspect(target.name, target.incarnation, self.name))
        self._count("probes")
        self._send(target.addr, msgs)

    def _next_probe_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_order:
                name = self._probe_order.pop()
                m = self.members.get(name)
                if m is not None and m.state in (ALIVE, SUSPECT):
                    return m
            self._probe_order = [
                n for n, m in self.members.items()
                if n != self.name and m.state in (ALIVE, SUSPECT)
            ]
            self.rng.shuffle(self._probe_order)
        return None

    def _send_indirect(self, probe: _Probe, now: float) -> None:
        target = self.members.get(probe.target)
        if target is None:
            return
        helpers = [
            m for m in self.members.values()
            if m.state == ALIVE and m.name not in (self.name, probe.target)
        ]
        chosen = self.rng.sample(helpers, min(len(helpers), self.config.indirect_checks))
        probe.indirect_sent = max(len(chosen), 0)
        if not chosen:
            probe.indirect_sent = -1  # mark as handled: nobody to ask
            return
        for helper in chosen:
            msg = wire.IndirectPing(
                probe.seq, target.name, target.addr, self.name, self.addr, True
            )
            self._send(helper.addr, [msg])
        # A direct retry too: a single lost UDP packet should not start a suspicion.
        self._send(target.addr, [wire.Ping(probe.seq, target.name, self.name, self.addr)])

    def _gossip(self) -> None:
        if not len(self._queue):
            return
        peers = [
            m for m in self.members.values()
            if m.name != self.name and m.state in (ALIVE, SUSPECT)
        ]
        for m in self.rng.sample(peers, min(len(peers), self.config.gossip_nodes)):
            self._send(m.addr, [], piggyback=True)

    def _start_pushpull(self) -> None:
        peers = [m for m in self.members.values() if m.name != self.name and m.state == ALIVE]
        if peers:
            self._out.append(StartPushPull(self.rng.choice(peers).addr, join=False))

    def _reconnect(self) -> None:
        """Try one member we believe dead (as Serf does): after a partition heals, the
        exchange makes each side refute the other's verdict and the views merge."""
        dead = [m for m in self.members.values() if m.state == DEAD]
        if dead:
            self._count("reconnect_attempts")
            self._out.append(StartPushPull(self.rng.choice(dead).addr, join=False))

    def _pushpull_every(self) -> float:
        n = max(len(self.members), 1)
        scale = 1.0 if n <= 32 else math.ceil(math.log2(n) - math.log2(32)) + 1.0
        return self.config.pushpull_interval * scale

    def _reap(self, now: float) -> None:
        reap = [
            n for n, m in self.members.items()
            if m.state in (DEAD, LEFT) and now - m.since > self.config.dead_reap
        ]
        for n in reap:
            del self.members[n]
            self.coords.pop(n, None)

    # --- suspicion --------------------------------------------------------------------------

    def _start_suspicion(self, m: Member, source: str, now: float) -> None:
        n = self.live_count()
        min_s = suspicion_min_timeout(self.config.suspicion_mult, n, self.config.probe_interval)
        max_s = self.config.suspicion_max_mult * min_s
        # Confirmations that bring it to the minimum, never more than the other members
        # that might also probe it.
        expected = max(0, min(self.config.suspicion_confirmations, n - 2))
        # The originator is remembered so it cannot confirm its own accusation, but it is
        # not a confirmation: one peer's word alone runs the longest timeout.
        seen = {self.name if source == "push-pull" else source}
        timeout = suspicion_timeout(min_s, max_s, 0, expected)
        self._suspicions[m.name] = _Suspicion(now, min_s, max_s, expected, seen, now + timeout)
        self._set_state(m, SUSPECT, now)
        self._count("suspicions")
        msg = wire.Suspect(m.name, m.incarnation, source if source != "push-pull" else self.name)
        self._queue.push(("m", m.name), wire.encode_message(msg))

    def _confirm_suspicion(self, m: Member, source: str, now: float) -> None:
        s = self._suspicions.get(m.name)
        if s is None or source == "push-pull" or source in s.confirmers:
            return
        s.confirmers.add(source)
        timeout = suspicion_timeout(s.min_s, s.max_s, len(s.confirmers) - 1, s.expected)
        s.deadline = s.started + timeout
        self._queue.push(("m", m.name), wire.encode_message(
            wire.Suspect(m.name, m.incarnation, source)))

    def _refute(self, incarnation: int, now: float) -> None:
        me = self.me
        me.incarnation = max(me.incarnation, incarnation) + 1
        self.awareness.apply(1)
        self._count("refutations")
        self._enqueue_alive(me)
        if me.facts_version >= 0:
            me.facts_inc = me.incarnation
            me.facts_version += 1
            self._enqueue_facts(me)

    # --- helpers ------------------------------------------------------------------------

    def _add(self, m: Member) -> bool:
        """Hold a member seen for the first time, within the bounds on what a peer can
        make this node hold; False (and counted) when it is dropped."""
        if self._new_left is not None:
            if self._new_left <= 0:
                self._count("members_dropped_per_message")
                return False
            self._new_left -= 1
        if len(self.members) >= self.config.max_members:
            self._count("members_dropped_too_many")
            return False
        self.members[m.name] = m
        self._out.append(MemberEvent(m.name, m.state, None, m.addr))
        self._ask_to_confirm(m, m.since)
        return True

    def set_confirming(self, on: bool, now: float) -> None:
        """Whether to ping members not yet confirmed as soon as they are heard of (and, on
        turning it on, all those alive now) instead of when their turn to be probed comes.
        The coordinator does, since only it needs to know; every node doing it would send
        N² pings, and their acks would spend the retransmits of the gossip."""
        if on and not self._confirm_new:
            self._confirm_new = True
            for m in self.members.values():
                self._ask_to_confirm(m, now)
        self._confirm_new = on
        if not on:
            self._to_confirm.clear()

    def _ask_to_confirm(self, m: Member, now: float, tries: int = CONFIRM_TRIES) -> None:
        """Ping an alive member not yet confirmed; its Ack confirms it."""
        if not self._confirm_new or m.state != ALIVE or m.confirmed or tries <= 0:
            return
        if not self._to_confirm:
            self._confirm_due = now
        self._to_confirm[m.name] = tries

    def _tick_confirming(self, now: float) -> None:
        while self._confirming:
            seq, (name, deadline, tries) = next(iter(self._confirming.items()))
            if now < deadline:
                break
            del self._confirming[seq]
            m = self.members.get(name)
            if m is not None:
                self._ask_to_confirm(m, now, tries)  # lost? ask again, a few times
        pending, self._to_confirm = self._to_confirm, {}
        for name, tries in pending.items():
            m = self.members.get(name)
            if m is None or m.confirmed or m.state != ALIVE:
                continue
            seq = self._next_seq()
            self._confirming[seq] = (name, now + self.config.probe_interval, tries - 1)
            # Bare: gossip riding it would mostly tell the newcomer what it just told us,
            # and use up retransmits of news the rest of the mesh has not heard.
            self._send(m.addr, [wire.Ping(seq, name, self.name, self.addr)], piggyback=False)

    def _confirm(self, m: Member | None) -> None:
        if m is not None and not m.confirmed:
            m.confirmed = True
            self._out.append(ConfirmedEvent(m.name))

    def _set_state(self, m: Member, state: str, now: float) -> None:
        if m.state == state:
            return
        prev = m.state
        m.state, m.since = state, now
        self._out.append(MemberEvent(m.name, state, prev, m.addr))
        self._ask_to_confirm(m, now)

    def _enqueue_alive(self, m: Member) -> None:
        msg = wire.Alive(m.name, m.addr, m.incarnation)
        self._queue.push(("m", m.name), wire.encode_message(msg))

    def _enqueue_facts(self, m: Member) -> None:
        msg = wire.Facts(m.name, m.facts_inc, m.facts_version, m.facts)
        payload = wire.encode_message(msg)
        if len(payload) + wire.packet_overhead(1) <= wire.UDP_BUDGET:
            self._queue.push(("f", m.name), payload)
        # Facts too large for a datagram travel by push-pull only.

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, addr: str, msgs: list[wire.Message], piggyback: bool = True) -> None:
        encoded = [wire.encode_message(m) for m in msgs]
        if piggyback:
            used = sum(len(e) for e in encoded) + wire.packet_overhead(64)
            limit = retransmit_limit(self.config.retransmit_mult, max(self.live_count(), 1))
            encoded += self._queue.take(wire.UDP_BUDGET - used, 0, limit)
        if encoded:
            self._out.append(SendPacket(addr, wire.encode_packet_raw(encoded)))


def with_overrides(config: Config, **changes: Any) -> Config:
    """A copy of ``config`` with some timings changed (validated by the caller)."""
    return replace(config, **changes)
