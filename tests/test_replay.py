"""Replay across nodes and restarts: a sealed call opens only at the node it was sealed
for, and nothing sealed before an agent started opens at that agent."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flexmesh.agent import rpc
from flexmesh.agent.config import Settings
from flexmesh.agent.runtime import keys as keys_module
from flexmesh.agent.runtime.keys import Keys
from flexmesh.protocol import wire
from flexmesh.protocol.crypto import Keyring, Sealer, generate_key

KEY = generate_key()
REQUEST = wire.LeaseRequest("j1", "desk", "gpu0", 500, 4096, 3, "coord")


def codec(me: str) -> rpc.Codec:
    return rpc.Codec(Sealer(Keyring([KEY])), b"flexmesh", me=me)


def body(frame: bytes) -> bytes:
    return frame[wire.FRAME_HEADER.size:]


def test_a_call_sealed_for_one_node_does_not_open_at_another() -> None:
    frame = body(codec("coord").encode(REQUEST, to="owner-b"))
    assert codec("owner-b").decode(frame) == REQUEST
    with pytest.raises(rpc.RemoteError) as info:
        codec("owner-c").decode(frame)  # the same bytes, replayed to another node
    assert info.value.reason == "tampered"


def test_a_call_sealed_for_no_node_is_refused_but_a_push_pull_or_reply() -> None:
    sender = codec("coord")
    with pytest.raises(rpc.RemoteError) as info:
        codec("owner-b").decode(body(sender.encode(REQUEST)))
    assert info.value.reason == "misdirected"
    pushpull = wire.PushPull(True, "coord", [])
    assert codec("seed").decode(body(sender.encode(pushpull))) == pushpull  # to a seed
    reply = wire.Ok("starting")
    assert sender.decode(body(codec("owner-b").encode(reply)), request=False) == reply


def test_the_same_call_opens_once() -> None:
    frame = body(codec("coord").encode(REQUEST, to="owner-b"))
    receiver = codec("owner-b")
    receiver.decode(frame)
    with pytest.raises(rpc.RemoteError) as info:
        receiver.decode(frame)
    assert info.value.reason == "replayed"


def test_nothing_sealed_before_an_agent_started_opens_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (Agents tolerate START_SKEW of peers' clock lag; here clocks are one, so none.)
    monkeypatch.setattr(keys_module, "START_SKEW", 0.0)
    keyfile = tmp_path / "k"
    keyfile.write_text(KEY + "\n")
    keyfile.chmod(0o600)
    settings = Settings(name="owner-b", key_file=str(keyfile), state_dir=str(tmp_path))
    before = Keys(settings, tmp_path)
    before.load()
    _next_millisecond()
    captured = body(codec("coord").encode(REQUEST, to="owner-b"))
    assert before.codec.decode(captured) == REQUEST  # the first run took it
    _next_millisecond()
    restarted = Keys(settings, tmp_path)  # its replay window starts empty...
    restarted.load()
    with pytest.raises(rpc.RemoteError) as info:
        restarted.codec.decode(captured)  # ... but nothing from before its start opens
    assert info.value.reason == "stale"
    _next_millisecond()
    fresh = body(codec("coord").encode(REQUEST, to="owner-b"))
    assert restarted.codec.decode(fresh) == REQUEST


def _next_millisecond() -> None:
    """Return once the wall clock's millisecond has moved on (sealed timestamps are ms)."""
    start = int(time.time() * 1000)
    deadline = time.monotonic() + 5
    while int(time.time() * 1000) == start and time.monotonic() < deadline:
        pass
