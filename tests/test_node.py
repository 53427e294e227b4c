"""The sans-IO node driven by hand: owner-side corner cases that a mesh rarely shows."""

from __future__ import annotations

import random

from flexmesh.agent.devices.base import Device
from flexmesh.agent.models import CANCELLED
from flexmesh.agent.node import Node, NodeConfig, StopJob
from flexmesh.protocol import wire


def gpu(i: int) -> Device:
    return Device(f"GPU-{i:08x}-1234-5678-9abc-def012345678", "gpu", "NVIDIA H100 80GB HBM3",
                  81559, "nvml")


def owner(n: int = 8) -> Node:
    node = Node(NodeConfig("owner", "127.0.0.1:7946"), random.Random(1), 0.0)
    node.set_devices([gpu(i) for i in range(n)], {})
    node.drain()
    return node


def lease(node: Node, job: str, device: str, compute: int = 100, term: int = 1) -> wire.Message:
    req = wire.LeaseRequest(job, "origin", device, compute, 1024, term, "coord", [], 0, True)
    return node.handle_request(req, 1.0)


def test_facts_listing_preemptible_jobs_still_fit_one_datagram() -> None:
    node = owner()
    for j in range(40):
        reply = lease(node, f"{j:012x}", gpu(j % 8).id)
        assert isinstance(reply, wire.LeaseReply) and reply.granted
    me = node.membership.me
    payload = wire.encode_message(wire.Facts(me.name, me.incarnation, me.facts_version,
                                             me.facts))
    assert len(payload) + wire.packet_overhead(1) <= wire.UDP_BUDGET
    assert 0 < len(me.facts["pre"]) <= 16


def test_a_job_stopped_while_its_process_starts_is_killed_once_it_exists() -> None:
    node = owner(1)
    reply = lease(node, "j1", gpu(0).id, compute=1000)
    assert isinstance(reply, wire.LeaseReply) and reply.granted
    assert reply.devices == [gpu(0).id]
    start = wire.StartJob("j1", reply.lease_id, reply.token, "origin", ["sleep", "9"], {},
                          1000, 1024)
    assert isinstance(node.handle_request(start, 2.0), wire.Ok)
    node.drain()
    node.stop_job("j1", "cancelled by its submitter", CANCELLED, 2.5)
    assert node.jobs["j1"].state == CANCELLED
    assert node.leases.free(gpu(0).id)[0] == 1000  # given back at once
    node.job_started("j1", 4242, None, 3.0)  # the runtime had already spawned it
    stops = [e for e in node.drain() if isinstance(e, StopJob)]
    assert [s.job_id for s in stops] == ["j1"]


def test_gossip_rows_that_repeat_a_device_or_claim_nothing_are_dropped() -> None:
    node = owner(1)
    row = [gpu(0).id, "gpu", "m", 81559, 1000, 0, 0, 1000, 81559, "nvml", True, "none"]
    empty = ["gpu9", "gpu", "m", 81559, 0, 0, 0, 0, 0, "nvml", True, "none"]
    node.membership.handle_alive(wire.Alive("peer", "127.0.0.1:7947", 0), 1.0)
    node.membership.handle_facts(wire.Facts("peer", 0, 1, {"dev": [row, row, empty]}))
    cands = node.candidates_by_node()["peer"]
    assert [c.device for c in cands] == [gpu(0).id]


def test_a_submit_that_cannot_be_placed_is_refused_by_the_coordinator() -> None:
    node = Node(NodeConfig("coord", "127.0.0.1:7946"), random.Random(1), 0.0)
    node.tick(0.0)
    for _ in range(40):  # alone: it elects itself once the join grace is over
        node.tick(node.next_deadline())
    assert node.is_coordinator
    bad = wire.Submit("j", "o", 500, 0, "gpu", 0, 0, 2)  # fractions of several devices
    reply = node.handle_request(bad, node._now)
    assert isinstance(reply, wire.Error) and "cannot be placed" in reply.reason
