"""The facts a node gossips: typed, validated on the way in, trimmed to one datagram, and
encoded byte for byte as earlier versions did (peers of mixed versions read each other)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from flexmesh.agent.devices.base import Device
from flexmesh.agent.node import Node, NodeConfig
from flexmesh.protocol import facts, wire

GOLDEN = Path(__file__).parent / "data" / "facts-golden.json"


def gpu(i: int, healthy: bool = True) -> Device:
    return Device(f"GPU-{i:08x}-1234-5678-9abc-def012345678", "gpu", "NVIDIA H100 80GB HBM3",
                  81559, "nvml", healthy=healthy)


def lease(node: Node, job: str, devices: list[str], compute: int, memory: int, term: int,
          priority: int, preemptible: bool) -> None:
    req = wire.LeaseRequest(job, "origin", devices[0], compute, memory, term, "coord",
                            devices[1:], priority, preemptible)
    reply = node.handle_request(req, 1.0)
    assert isinstance(reply, wire.LeaseReply) and reply.granted, reply


def states() -> dict[str, Node]:
    """The states tests/data/facts-golden.json was written from, by the encoder of the
    release before the facts had a type of their own (commit 0935005, agent/node.py)."""
    empty = Node(NodeConfig("empty", "127.0.0.1:7946", priority=3, eligible=False),
                 random.Random(1), 0.0)
    lent = Node(NodeConfig("owner", "127.0.0.1:7946", priority=1), random.Random(1), 0.0)
    lent.enforcement = "watchdog"
    lent.set_devices([gpu(0), gpu(1), gpu(2, healthy=False)], {gpu(1).id: (600, 40000)}, 0.0)
    for j, (dev, c, pre, prio) in enumerate([(0, 250, True, 0), (0, 250, False, 0),
                                             (1, 300, True, 5)]):
        lease(lent, f"job{j}", [gpu(dev).id], c, 1024 * (j + 1), 7, prio, pre)
    lease(lent, "multi", [gpu(0).id, gpu(1).id], 200, 2048, 9, 2, True)
    busy = Node(NodeConfig("busy-owner-with-a-long-name", "127.0.0.1:7946", eligible=False),
                random.Random(1), 0.0)
    busy.set_devices([gpu(i) for i in range(8)], {}, 0.0)
    for j in range(40):
        lease(busy, f"{j:032x}", [gpu(j % 8).id], 100, 1024, 1, j % 3, True)
    return {"empty": empty, "lent": lent, "trimmed": busy}


def test_facts_are_encoded_byte_for_byte_as_before() -> None:
    nodes = states()
    for case in json.loads(GOLDEN.read_text()):
        old = bytes.fromhex(case["hex"])
        golden = wire.decode_packet(wire.encode_packet_raw([old]))[0]
        assert isinstance(golden, wire.Facts)
        me = nodes[case["case"]].membership.me
        # (the version counts publishes, which is not what this test is about)
        ours = wire.encode_message(wire.Facts(me.name, me.incarnation, golden.version,
                                              me.facts))
        assert ours == old, case["case"]


def test_decode_reads_back_what_encode_wrote() -> None:
    f = facts.NodeFacts(
        (facts.DeviceFact("gpu0", "gpu", "m", 16384, 1000, 250, 1024, 750, 15360, "sim", True,
                          "mps"),),
        priority=2, eligible=False, claim=4, max_term=5,
        preemptible=(facts.PreemptibleFact("j", ("gpu0",), 250, 1024, 1),))
    assert facts.decode(f.encode()) == f
    assert "pre" not in facts.NodeFacts().encode()


def test_decode_skips_what_does_not_make_sense_and_never_raises() -> None:
    good = ["gpu0", "gpu", "m", 16384, 1000, 0, 0, 1000, 16384, "sim", True]
    rows = [good, good,  # twice: the second is ignored
            ["gpu1", "gpu", "m", 16384, 0, 0, 0, 0, 0, "sim", True],  # no compute
            ["gpu2", "gpu", "m", -1, 1000, 0, 0, 0, 0, "sim", True],  # negative memory
            ["gpu3", "gpu", "m", 16384, True, 0, 0, 0, 0, "sim", True],  # bool, not int
            ["gpu4"], "gpu5", None]
    pre = [["j1", ["gpu0"], 100, 0, 0], ["j2", [], 100, 0, 0], ["j3", ["gpu0"], 0, 0, 0],
           ["j4", "gpu0", 100, 0, 0], 7]
    f = facts.decode({"dev": rows, "pre": pre, "prio": "x", "elig": 0, "claim": None})
    assert [d.id for d in f.devices] == ["gpu0"]
    assert f.devices[0].enforcement == facts.UNKNOWN_ENFORCEMENT  # an older peer
    assert [p.job_id for p in f.preemptible] == ["j1"]
    assert (f.priority, f.eligible, f.claim, f.max_term) == (0, False, 0, 0)
    for junk in (None, 3, "facts", [], {"dev": "x", "pre": {}}):
        assert facts.decode(junk) == facts.NodeFacts()


def test_fit_drops_the_costliest_preemptible_jobs_until_one_datagram_holds_them() -> None:
    pre = tuple(facts.PreemptibleFact(f"{j:064x}", ("gpu0", "gpu1"), 100, 1024, j)
                for j in range(40))
    f = facts.fit(facts.NodeFacts(preemptible=pre), "n" * 60, 1, 1)
    assert 0 < len(f.preemptible) < facts.MAX_PREEMPTIBLE
    assert f.preemptible == pre[:len(f.preemptible)]  # cheapest first, kept in order
    size = len(wire.encode_message(wire.Facts("n" * 60, 1, 1, f.encode())))
    assert size + wire.packet_overhead(1) <= wire.UDP_BUDGET


def test_held_keys_round_trip_and_are_left_out_when_none() -> None:
    keys = tuple(bytes([i]) * facts.HELD_KEY_BYTES for i in range(5))
    f = facts.NodeFacts(held=keys)
    assert facts.decode(_through_wire(f.encode())).held == keys
    assert "held" not in facts.NodeFacts().encode()  # the encoding of before


def _through_wire(data: dict[str, object]) -> object:
    packet = wire.encode_packet([wire.Facts("n", 1, 1, data)])
    msg = wire.decode_packet(packet)[0]
    assert isinstance(msg, wire.Facts)
    return msg.data


def test_hostile_held_keys_are_dropped_and_bounded() -> None:
    good = b"k" * facts.HELD_KEY_BYTES
    junk = [good, good, b"short", b"x" * 9, "text-key", 7, None, [good], b""]
    assert facts.decode({"held": junk}).held == (good,)
    for bad in ("keys", 3, {"a": 1}, None):
        assert facts.decode({"held": bad}).held == ()
    many = [i.to_bytes(facts.HELD_KEY_BYTES, "big") for i in range(1000)]
    assert facts.decode({"held": many}).held == tuple(many[:facts.MAX_HELD])


def test_fit_drops_the_oldest_held_keys_before_any_preemptible_job() -> None:
    pre = tuple(facts.PreemptibleFact(f"{j:064x}", ("gpu0", "gpu1"), 100, 1024, j)
                for j in range(13))
    keys = tuple(i.to_bytes(facts.HELD_KEY_BYTES, "big") for i in range(facts.MAX_HELD))
    f = facts.fit(facts.NodeFacts(preemptible=pre, held=keys), "n" * 60, 1, 1)
    assert f.preemptible == pre  # all kept: the keys went first
    assert 0 < len(f.held) < facts.MAX_HELD
    assert f.held == keys[:len(f.held)]  # most recent first, kept in order
    size = len(wire.encode_message(wire.Facts("n" * 60, 1, 1, f.encode())))
    assert size + wire.packet_overhead(1) <= wire.UDP_BUDGET
    roomy = facts.fit(facts.NodeFacts(held=keys), "n", 1, 1)
    assert roomy.held == keys  # a full digest fits beside a few devices
