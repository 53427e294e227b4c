"""Hostile peers against one node: every message type, with valid framing and field values
chosen to hit this node (its name, its jobs, devices and leases, extreme integers within
what the wire admits), plus raw bytes, fed through the node's public inputs.

Shared by ``tests/test_fuzz_node.py`` (a fixed set of examples in CI) and
``scripts/bench_fuzz`` (many). Whatever arrives, the node must not raise, must never lease
a device beyond its capacity, and must keep its terms and membership bounded.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from hypothesis import strategies as st

from flexmesh.agent.devices.base import Device
from flexmesh.agent.models import JobRecord
from flexmesh.agent.node import Node, NodeConfig
from flexmesh.agent.node.routes import REQUESTS
from flexmesh.protocol import wire
from flexmesh.protocol.election import TERM_STEP

ME = "fz"
NAMES = [ME, "peer", "coord", "ghost", ""]
TARGETS = [*NAMES, "gpu0", "gpu1", "j-local", "j-remote", "j-remote.0", "../x", "L1"]
_NAMED = st.sampled_from(TARGETS)
TEXT = st.one_of(_NAMED, _NAMED, _NAMED, st.text(max_size=12))  # mostly aimed at this node


def _int(name: str) -> st.SearchStrategy[int]:
    """Within what the wire admits for the field, the edges weighted up."""
    low, high = wire.INT_RANGES.get(name, wire.INT64)
    edges = [v for v in (low, high, high - 1, 0, 1, 1000, 1 << 20) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.sampled_from(edges), st.integers(low, high))


VALUE: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12)


def _field(f: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    kind = str(f.type)
    if kind in ("int", "int | None"):
        ints = _int(f.name)
        return ints if kind == "int" else st.none() | ints
    return {
        "str": TEXT, "bool": st.booleans(), "bytes": st.binary(max_size=64),
        "dict[str, Any]": st.dictionaries(TEXT, VALUE, max_size=5),
        "list[Any]": st.lists(VALUE, max_size=5), "list[str]": st.lists(TEXT, max_size=4),
        "dict[str, str]": st.dictionaries(TEXT, TEXT, max_size=4),
        "list[float]": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=12),
    }[kind]


def message(cls: type[wire.Message]) -> st.SearchStrategy[wire.Message]:
    return st.builds(cls, *[_field(f) for f in dataclasses.fields(cls)])  # type: ignore[arg-type]


# Calls a node answers (over TCP), gossip it takes (over UDP), and bytes that are neither.
CALLS = [*REQUESTS, wire.JobSync]
GOSSIP = [wire.Ping, wire.IndirectPing, wire.Ack, wire.Nack, wire.Alive, wire.Suspect,
          wire.Dead, wire.Facts]
INPUT = st.one_of(
    st.tuples(st.just("tcp"), st.one_of([message(c) for c in CALLS])),
    st.tuples(st.just("udp"), st.one_of([message(c) for c in GOSSIP])),
    st.tuples(st.just("raw"), st.binary(max_size=80)),
)
Input = tuple[str, Any]


def target_node() -> Node:
    """A coordinator with two GPUs, a local job and a job it runs for another node."""
    node = Node(NodeConfig(ME, "127.0.0.1:7946"), random.Random(7), 0.0)
    node.set_devices([Device("gpu0", "gpu", "T4", 16384, "sim"),
                      Device("gpu1", "gpu", "T4", 16384, "sim")],
                     {"gpu0": (1000, 16384), "gpu1": (1000, 16384)}, 0.0)
    node.tick(5.0)
    node.submit(JobRecord(id="j-local", origin=ME, command=["true"], compute_milli=500,
                          memory_mib=0), 5.0)
    for t in (6.0, 7.0, 8.0):
        node.tick(t)
        node.drain()  # effects are what a runtime carries out: here, dropped
    return node


def feed(node: Node, inputs: list[Input], start: float = 10.0) -> None:
    """Every input through the node's public entry points; checks after each."""
    now = start
    term0 = max(node.max_term, node.leases.max_term)
    for kind, item in inputs:
        now += 0.25
        if kind == "tcp":  # through the codec, as the runtime hands it over
            msg = wire.decode_frame_body(wire.encode_frame(item)[4:])
            if isinstance(msg, wire.JobSync):
                node.sync_reply(msg, b"", b"", 1 << 16, 0.0)
            else:
                node.handle_request(msg, now)
        elif kind == "udp":
            node.step_packet("10.0.0.9:7946", wire.encode_packet([item]), now)
        else:
            node.step_packet("10.0.0.9:7946", item, now)
        node.tick(now)
        node.drain()
        check(node, term0)


def check(node: Node, term0: int) -> None:
    for device in node.owner.devices.values():
        compute, memory = node.leases.used(device.id)
        assert compute <= device.compute_milli, (device.id, compute)
        assert memory <= device.memory_mib, (device.id, memory)
    # Terms only ever rise by bounded steps from what was seen, never to the maximum.
    assert max(node.max_term, node.leases.max_term) <= term0 + 64 * TERM_STEP
    assert len(node.membership.members) <= 1 + 64 * 64
    node.publish_facts()  # our own facts still encode
