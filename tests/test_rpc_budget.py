"""What inbound TCP connections can make an agent hold before they prove anything.

Real sockets on 127.0.0.1 (ephemeral ports) against ``rpc.Server`` with small ``Limits``:
a first frame is small unless a Hello that opened came before it; every body is reserved
from one budget shared by all connections; connections are capped in all and per
address; a silent or slow connection is closed. Assertions are on the server's accounting
(its budget and counters), never on the process's memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from flexmesh.agent import rpc
from flexmesh.agent.config import Settings
from flexmesh.agent.runtime import memory
from flexmesh.agent.runtime.transport import tcp_limits
from flexmesh.protocol import wire
from flexmesh.protocol.crypto import Keyring, Sealer

KEY = os.urandom(32)
BIG = 200_000  # bytes: over wire.FIRST_FRAME, a large PushPull's size


def keyed(key: bytes = KEY) -> rpc.Codec:
    """A codec of its own (its own nonces and replay window), as another agent has."""
    return rpc.Codec(Sealer(Keyring([key])), b"test")


CODECS = {"plaintext": lambda: rpc.PLAIN, "keyed": keyed}


def header(n: int) -> bytes:
    return wire.FRAME_HEADER.pack(n)


def pushpull(size: int) -> wire.PushPull:
    rows = [[f"n{i}", "10.0.0.1:7946", 1, "alive", 1, {"pad": "x" * 1000}]
            for i in range(size // 1000)]
    return wire.PushPull(False, "a", rows)


@dataclass
class Harness:
    server: rpc.Server
    tcp: asyncio.Server
    addr: str
    codec: rpc.Codec  # the client's
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    requests: list[wire.Message] = field(default_factory=list)
    clients: list[asyncio.StreamWriter] = field(default_factory=list)

    async def connect(self, local: str | None = None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.addr.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(
            host, int(port), local_addr=(local, 0) if local else None)
        self.clients.append(writer)
        return reader, writer

    async def ask(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  msg: wire.Message | None = None) -> wire.Message:
        writer.write(self.codec.encode(msg or wire.Cancel("j", "small")))
        await writer.drain()
        return await asyncio.wait_for(rpc.read_frame(reader, self.codec), 5)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    harnesses: list[Harness] = []

    async def start(codec: str = "plaintext", **limits: float) -> Harness:
        async def handler(msg: wire.Message) -> wire.Message:
            h.requests.append(msg)
            return wire.Ok(type(msg).__name__)

        server_codec = CODECS[codec]()
        server = rpc.Server(handler, lambda: server_codec,
                            lambda: rpc.Limits(**limits),
                            lambda name: h.counts.update([name]))
        tcp = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        port = tcp.sockets[0].getsockname()[1]
        h = Harness(server, tcp, f"127.0.0.1:{port}", CODECS[codec]())
        harnesses.append(h)
        return h

    yield start
    for h in harnesses:
        for w in h.clients:
            w.close()
        h.tcp.close()
        await h.tcp.wait_closed()


async def closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection (reset or not)."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""


async def until(predicate: Callable[[], bool]) -> None:
    """Let the server's tasks run until ``predicate()`` holds (at most 5 s)."""
    async with asyncio.timeout(5):
        while not predicate():
            await asyncio.sleep(0.001)


# --- the first frame ----------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
async def test_a_large_first_frame_is_refused_before_anything_is_buffered(
        serve: Callable[..., Awaitable[Harness]], codec: str) -> None:
    h = await serve(codec)
    reader, writer = await h.connect()
    writer.write(header(wire.MAX_FRAME) + bytes(64 * 1024))
    assert await closed(reader) == b""
    await until(lambda: h.server.connections == 0)
    assert h.counts == {"frames_dropped_first_too_large": 1}
    assert h.server.budget.peak == 0 and h.requests == []


async def test_a_small_first_frame_from_an_old_peer_is_answered_and_unlocks(
        serve: Callable[..., Awaitable[Harness]]) -> None:
    """A peer without Hello (an older version) still calls with requests up to
    FIRST_FRAME; after one, large frames are read on that connection."""
    h = await serve("keyed")
    reader, writer = await h.connect()
    assert await h.ask(reader, writer) == wire.Ok("Cancel")
    assert await h.ask(reader, writer, pushpull(BIG)) == wire.Ok("PushPull")
    assert not h.counts


@pytest.mark.parametrize("codec", CODECS)
async def test_a_large_request_goes_through_call_after_a_hello(
        serve: Callable[..., Awaitable[Harness]], codec: str) -> None:
    h = await serve(codec, budget=3 * 1024 * 1024)
    msg = pushpull(1024 * 1024)
    for _ in range(4):  # more than the budget in all: each body's room is given back
        assert await rpc.call(h.addr, msg, 10, h.codec, source="a") == wire.Ok("PushPull")
    assert h.requests == [msg] * 4  # the Hellos were taken, not handed on or answered
    await until(lambda: h.server.connections == 0)
    assert h.server.budget.used == 0 and h.server.budget.total > 4 * 1024 * 1024
    assert not h.counts
    # Without its Hello the same request, as the first frame, is refused unread.
    reader, writer = await h.connect()
    writer.write(h.codec.encode(msg))
    assert await closed(reader) == b""
    await until(lambda: h.counts["frames_dropped_first_too_large"] == 1)


async def test_a_small_call_sends_no_hello(serve: Callable[..., Awaitable[Harness]]) -> None:
    h = await serve("keyed")
    msg = wire.Cancel("j", "small")
    assert await rpc.call(h.addr, msg, 10, h.codec) == wire.Ok("Cancel")
    await until(lambda: h.server.connections == 0)
    assert h.server.budget.total == len(h.codec.encode(msg)) - wire.FRAME_HEADER.size


def _replayed(h: Harness) -> bytes:
    return h.codec.encode(wire.Hello("a"))  # sent once first, below, then replayed


FORGED: dict[str, Callable[[Harness], bytes]] = {
    "replayed": _replayed,
    "plaintext": lambda h: wire.encode_frame(wire.Hello("a")),
    "unknown_key": lambda h: keyed(os.urandom(32)).encode(wire.Hello("a")),
    "tampered": lambda h: (lambda f: f[:-1] + bytes([f[-1] ^ 1]))(
        h.codec.encode(wire.Hello("a"))),
    "garbage": lambda h: header(100) + os.urandom(100),
}


@pytest.mark.parametrize("forged", FORGED)
async def test_a_hello_that_does_not_open_unlocks_nothing(
        serve: Callable[..., Awaitable[Harness]], forged: str) -> None:
    h = await serve("keyed")
    hello = FORGED[forged](h)
    if forged == "replayed":  # its first use opens and is followed by a request
        reader, writer = await h.connect()
        writer.write(hello)
        assert await h.ask(reader, writer) == wire.Ok("Cancel")
    reader, writer = await h.connect()
    writer.write(hello + header(wire.MAX_FRAME) + bytes(BIG))
    assert await closed(reader) == b""
    await until(lambda: h.counts["peers_disconnected_garbage"] == 1)
    assert h.server.budget.peak < wire.FIRST_FRAME  # the large frame got no room
    assert h.requests == ([wire.Cancel("j", "small")] if forged == "replayed" else [])


async def test_a_hello_later_on_a_connection_is_refused(
        serve: Callable[..., Awaitable[Harness]]) -> None:
    h = await serve("keyed")
    reader, writer = await h.connect()
    assert await h.ask(reader, writer) == wire.Ok("Cancel")
    writer.write(h.codec.encode(wire.Hello("a")))
    assert await closed(reader) == b""
    await until(lambda: h.counts["frames_dropped_malformed"] == 1)


# --- the budget -------------------------------------------------------------------------


async def test_many_large_frames_cannot_reserve_more_than_the_budget(
        serve: Callable[..., Awaitable[Harness]]) -> None:
    h = await serve("keyed", budget=3 * BIG + BIG // 2)
    readers = []
    for _ in range(10):  # each unlocked by a good Hello, then a large body sent in part
        reader, writer = await h.connect()
        writer.write(h.codec.encode(wire.Hello("a")) + header(BIG) + bytes(1000))
        readers.append(reader)
    budget = h.server.budget
    await until(lambda: h.counts["frames_dropped_budget"] == 7 and budget.used == 3 * BIG)
    assert budget.peak <= budget.limit
    for w in h.clients:  # the three being read give their room back when they go
        w.close()
    await until(lambda: h.server.connections == 0)
    assert budget.used == 0 and 3 * BIG <= budget.peak <= budget.limit


# --- connections ------------------------------------------------------------------------


async def test_connections_over_the_per_address_cap_are_refused(
        serve: Callable[..., Awaitable[Harness]]) -> None:
    h = await serve(max_per_ip=2, max_connections=10)
    held = [await h.connect() for _ in range(2)]
    for r, w in held:
        assert await h.ask(r, w) == wire.Ok("Cancel")
    reader, _ = await h.connect()
    assert await closed(reader) == b""
    assert h.counts == {"tcp_refused_per_ip": 1}
    try:  # another address on the loopback network is not held to 127.0.0.1's cap
        other = await h.connect(local="127.0.0.2")
    except OSError:
        pass
    else:
        assert await h.ask(*other) == wire.Ok("Cancel")
    for r, w in held:  # those admitted go on; one that leaves makes room
        assert await h.ask(r, w) == wire.Ok("Cancel")
    held[0][1].close()
    await until(lambda: h.server.by_ip.get("127.0.0.1") == 1)
    assert await h.ask(*await h.connect()) == wire.Ok("Cancel")


async def test_connections_over_the_total_cap_are_refused(
        serve: Callable[..., Awaitable[Harness]]) -> None:
    h = await serve(max_per_ip=10, max_connections=2)
    held = [await h.connect() for _ in range(2)]
    for r, w in held:
        assert await h.ask(r, w) == wire.Ok("Cancel")
    for _ in range(3):
        reader, _ = await h.connect()
        assert await closed(reader) == b""
    assert h.counts == {"tcp_refused_busy": 3}
    assert h.server.connections == 2


# --- deadlines --------------------------------------------------------------------------


async def test_a_silent_connection_is_closed_at_the_header_timeout(
        serve: Callable[..., Awaitable[Harness]]) -> None:
    h = await serve(header_timeout=0.05)
    reader, _ = await h.connect()
    assert await closed(reader) == b""
    await until(lambda: h.server.connections == 0)
    assert h.counts == {"tcp_header_timeouts": 1}


async def test_a_body_that_does_not_come_is_closed_at_its_deadline(
        serve: Callable[..., Awaitable[Harness]]) -> None:
    h = await serve(body_timeout=0.05, body_rate=10**9)
    reader, writer = await h.connect()
    writer.write(header(1000) + bytes(10))
    assert await closed(reader) == b""
    await until(lambda: h.server.connections == 0)
    assert h.counts == {"tcp_body_timeouts": 1}
    assert h.server.budget.used == 0 and h.server.budget.peak == 1000


async def test_an_idle_connection_is_closed_without_a_count(
        serve: Callable[..., Awaitable[Harness]]) -> None:
    h = await serve(idle_timeout=0.05)
    reader, writer = await h.connect()
    assert await h.ask(reader, writer) == wire.Ok("Cancel")
    assert await closed(reader) == b""
    assert not h.counts


def test_body_deadline_allows_a_slow_link() -> None:
    limits = rpc.Limits()
    assert limits.body_deadline(wire.MAX_FRAME) == 10.0 + 128.0  # 8 MiB at 64 KiB/s


# --- the runtime's side -----------------------------------------------------------------


def test_the_settings_defaults_are_the_limits_defaults() -> None:
    assert tcp_limits(Settings()) == rpc.Limits()


def test_memory_is_handed_back_where_the_c_library_allows() -> None:
    fixed = memory.fix_mmap_threshold()  # never raises; True on glibc
    assert fixed == (memory._glibc() is not None)
    memory.trim()


async def test_trim_is_called_once_large_bodies_are_gone(
        serve: Callable[..., Awaitable[Harness]]) -> None:
    h = await serve()
    trims: list[int] = []
    h.server.trim = lambda: trims.append(h.server.budget.used)
    assert await rpc.call(h.addr, wire.Cancel("j", "x"), 10, h.codec) == wire.Ok("Cancel")
    await until(lambda: h.server.connections == 0)
    assert trims == []  # a small frame is not worth it
    with contextlib.suppress(rpc.CallError):
        await rpc.call(h.addr, pushpull(2 * rpc.TRIM_AFTER), 10, h.codec)
    await until(lambda: h.server.connections == 0)
    assert trims == [0]
