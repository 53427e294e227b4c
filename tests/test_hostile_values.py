"""Numbers no honest peer sends: a term, incarnation or facts version far past anything
seen, and devices larger than any machine. Each was once taken in and poisoned a node or
the mesh for good (a term near 2**64 overflowed the coordinator, an incarnation near it
left a node unable to refute, a facts version near it could never be superseded); now
each is dropped or refused, and counted."""

from __future__ import annotations

import random

from flexmesh.agent.devices.base import Device
from flexmesh.agent.node import Node, NodeConfig
from flexmesh.protocol import facts, wire
from flexmesh.protocol.election import TERM_STEP
from flexmesh.protocol.membership import (
    INCARNATION_STEP,
    PRESETS,
    VERSION_STEP,
    Membership,
)


def _owner() -> Node:
    node = Node(NodeConfig("owner", "127.0.0.1:7946"), random.Random(1), 0.0)
    node.set_devices([Device("gpu0", "gpu", "sim", 16384, "sim")], {}, 0.0)
    return node


def _lease(node: Node, job: str, term: int) -> wire.Message:
    req = wire.LeaseRequest(job, "origin", "gpu0", 100, 1024, term, "coord", [], 0, True)
    return node.handle_request(req, 1.0)


def test_a_lease_request_whose_term_jumps_to_the_sky_is_refused() -> None:
    node = _owner()
    ok = _lease(node, "j1", 5)
    assert isinstance(ok, wire.LeaseReply) and ok.granted
    seen = max(node.max_term, node.leases.max_term)  # (alone, it has elected itself since)
    sky = _lease(node, "j2", seen + TERM_STEP + 1)
    assert isinstance(sky, wire.LeaseReply) and not sky.granted
    assert "jumps more than" in sky.reason and node.counters["implausible_term"] == 1
    assert node.leases.max_term == 5  # nothing of it was kept: the next term still works
    nxt = _lease(node, "j3", seen + 1)
    assert isinstance(nxt, wire.LeaseReply) and nxt.granted
    seen = max(node.max_term, node.leases.max_term)
    stop = node.handle_request(wire.Preempt(["j1"], "room", seen + TERM_STEP + 1, "c", 9), 2.0)
    assert isinstance(stop, wire.Error) and "jumps more than" in stop.reason
    # and a term near 2**64 never gets past the codec at all
    frame = wire.encode_frame(wire.LeaseRequest("j4", "o", "gpu0", 100, 0, 2**64 - 1, "c"))
    try:
        wire.decode_frame_body(frame[4:])
    except wire.DecodeError as exc:
        assert "range" in str(exc)
    else:
        raise AssertionError("a term of 2**64-1 was decoded")


def test_a_voter_claiming_a_far_term_is_not_heard_by_the_election() -> None:
    node = _owner()
    node.saw_term(3)
    forged = facts.NodeFacts(claim=3 + TERM_STEP + 1, max_term=3 + TERM_STEP + 1)
    node.membership.handle_alive(wire.Alive("ghost", "127.0.0.1:9", 1), 1.0)
    node.membership.handle_facts(wire.Facts("ghost", 1, 1, forged.encode()))
    node.tick(2.0)
    assert node.max_term < 3 + TERM_STEP
    assert node.belief.coordinator != "ghost"
    assert node.counters["implausible_term"] >= 1


def _membership() -> Membership:
    m = Membership("a", "127.0.0.1:1", PRESETS["lan"], random.Random(1), 0.0)
    m.handle_alive(wire.Alive("b", "127.0.0.1:2", 3), 0.0)
    return m


def test_a_suspicion_far_past_our_own_incarnation_is_not_refuted_into_the_sky() -> None:
    m = _membership()
    before = m.me.incarnation
    m.handle_suspect(wire.Suspect("a", before + INCARNATION_STEP + 1, "x"), 1.0)
    m.handle_dead(wire.Dead("a", 2**53, "x"), 1.0)
    m.merge_remote_state([["a", "127.0.0.1:1", 2**53, "dead", 0, -1, {}]], 1.0)
    assert m.me.incarnation == before
    assert m.counters["implausible_incarnation"] == 3
    m.handle_suspect(wire.Suspect("a", before, "x"), 1.0)  # an honest one still is
    assert m.me.incarnation == before + 1


def test_a_member_cannot_be_pinned_by_a_far_incarnation_or_facts_version() -> None:
    m = _membership()
    m.handle_alive(wire.Alive("b", "127.0.0.1:2", 3 + INCARNATION_STEP + 1), 1.0)
    m.handle_dead(wire.Dead("b", 2**53, "x"), 1.0)
    assert m.members["b"].incarnation == 3 and m.members["b"].state == "alive"
    m.handle_facts(wire.Facts("b", 3, 7, {"prio": 1}))
    m.handle_facts(wire.Facts("b", 3, 7 + VERSION_STEP + 1, {"prio": 666}))
    m.handle_facts(wire.Facts("b", 3 + INCARNATION_STEP + 1, 0, {"prio": 666}))
    assert m.members["b"].facts == {"prio": 1}
    assert m.counters["implausible_facts"] == 2
    m.handle_facts(wire.Facts("b", 3, 8, {"prio": 2}))  # its own next word still counts
    assert m.members["b"].facts == {"prio": 2}
    # a member first heard with a long history is taken as it is
    m.handle_alive(wire.Alive("c", "127.0.0.1:3", 40), 1.0)
    m.handle_facts(wire.Facts("c", 40, 5 * VERSION_STEP, {"prio": 3}))
    assert m.members["c"].facts == {"prio": 3}


def test_a_device_larger_than_any_machine_is_left_out_of_the_facts() -> None:
    ghost = facts.DeviceFact("gpu0", "gpu", "ghost", 10**12, 1000, 0, 0, 1000, 10**12,
                             "sim", True, "none")
    real = facts.DeviceFact("gpu1", "gpu", "h200", 143771, 1000, 0, 0, 1000, 143771,
                            "nvml", True, "none")
    decoded = facts.decode(facts.NodeFacts(devices=(ghost, real)).encode())
    assert [d.id for d in decoded.devices] == ["gpu1"]
    assert facts.decode({"claim": 2**60, "mt": -5, "prio": 2**40}).claim == 0
