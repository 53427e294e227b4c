"""Narrow links: bulk replies compressed where that saves (and inflated within bounds), and
paced through one token bucket on an injected clock (no sleeps)."""

from __future__ import annotations

import asyncio
import os
import zlib
from pathlib import Path

import msgpack
import pytest

from flexmesh.agent import config, rpc
from flexmesh.agent.config import ConfigError
from flexmesh.agent.configcheck import bulk_rate_bytes
from flexmesh.agent.node.follow import SYNC_CHUNK
from flexmesh.agent.runtime.bulk import (
    MIN_SLICE,
    Bulk,
    TokenBucket,
    inflate_limit,
    paced_write,
    slice_size,
)
from flexmesh.agent.units import parse_rate
from flexmesh.protocol import compress, wire
from flexmesh.protocol.compress import InflateError

SHA = "a" * 64
TEXT = b"".join(b"step %d loss=0.%04d lr=3e-4 ok\n" % (i, i % 997) for i in range(4000))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


class Sink:
    """A stream writer that records what it was given, and when."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.writes: list[tuple[float, bytes]] = []

    def write(self, data: bytes) -> None:
        self.writes.append((self.clock.t, data))

    async def drain(self) -> None:
        return None


def counting() -> tuple[dict[str, int], Bulk, Clock]:
    counts: dict[str, int] = {}
    clock = Clock()

    def count(key: str, n: int = 1) -> None:
        counts[key] = counts.get(key, 0) + n

    return counts, Bulk(lambda: 0, lambda: True, count, clock, clock.sleep), clock


# --- compression -------------------------------------------------------------------------


def test_compressible_chunk_goes_compressed_and_comes_back_the_same() -> None:
    chunk = wire.BundleChunk(SHA, 0, TEXT, len(TEXT))
    packed = compress.deflate_reply(chunk)
    assert isinstance(packed, wire.BundleChunk) and packed.encoding == "zlib"
    assert len(packed.data) < 0.2 * len(TEXT)
    assert compress.inflate_reply(packed, len(TEXT)) == chunk


def test_incompressible_or_small_chunks_go_as_they_are() -> None:
    noise = os.urandom(256 * 1024)
    assert compress.deflate_reply(wire.BundleChunk(SHA, 0, noise, 1 << 20)).encoding == ""
    small = wire.BundleChunk(SHA, 0, b"a" * 100, 100)
    assert compress.deflate_reply(small) is small


def test_a_large_incompressible_chunk_is_judged_on_a_sample(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A megabyte of random bytes costs the deflate of a sample, not of the whole; a
    chunk whose middle compresses is compressed whole."""
    calls: list[int] = []
    real = compress.zlib.compress

    def counted(data: bytes, level: int = -1) -> bytes:
        calls.append(len(data))
        return real(data, level)

    monkeypatch.setattr(compress.zlib, "compress", counted)
    noise = os.urandom(1 << 20)
    assert compress.deflate_reply(wire.BundleChunk(SHA, 0, noise, 1 << 20)).encoding == ""
    assert calls == [compress.SAMPLE]
    calls.clear()
    mixed = noise[:300_000] + (TEXT * 4)[:400_000] + noise[:300_000]
    packed = compress.deflate_reply(wire.BundleChunk(SHA, 0, mixed, len(mixed)))
    assert calls == [compress.SAMPLE, len(mixed)] and packed.encoding == "zlib"
    assert compress.inflate_reply(packed, len(mixed)).data == mixed


def test_output_streams_are_compressed_together_and_an_empty_one_stays_empty() -> None:
    reply = wire.JobSyncReply("running", "", None, TEXT[:SYNC_CHUNK], b"", False)
    packed = compress.deflate_reply(reply)
    assert isinstance(packed, wire.JobSyncReply)
    assert packed.encoding == "zlib" and packed.stderr == b""
    assert compress.inflate_reply(packed, SYNC_CHUNK) == reply


def test_a_bomb_is_refused_before_it_inflates_past_the_limit() -> None:
    bomb = zlib.compress(b"\0" * (64 << 20), 9)  # 64 MiB of zeros in ~64 KiB
    reply = wire.BundleChunk(SHA, 0, bomb, 1 << 30, "zlib")
    with pytest.raises(InflateError) as err:
        compress.inflate_reply(reply, 1 << 20)
    assert err.value.reason == "bomb"
    exact = wire.BundleChunk(SHA, 0, zlib.compress(b"x" * 1000), 1000, "zlib")
    assert len(compress.inflate_reply(exact, 1000).data) == 1000  # type: ignore[attr-defined]
    with pytest.raises(InflateError):
        compress.inflate_reply(exact, 999)


@pytest.mark.parametrize("data, encoding, reason", [
    (b"not zlib at all", "zlib", "corrupt"),
    (zlib.compress(TEXT)[:-9], "zlib", "corrupt"),  # cut short
    (zlib.compress(TEXT) + b"junk", "zlib", "corrupt"),  # bytes after the end
    (zlib.compress(TEXT), "brotli", "encoding"),
])
def test_a_bad_compressed_reply_is_one_error(data: bytes, encoding: str, reason: str) -> None:
    with pytest.raises(InflateError) as err:
        compress.inflate_reply(wire.BundleChunk(SHA, 0, data, 1, encoding), 1 << 20)
    assert err.value.reason == reason


def test_older_peers_neither_ask_for_nor_send_compressed_bytes() -> None:
    # A peer one version behind sends the fields it knows: the new ones read "".
    old_ask = msgpack.packb([wire.FetchBundle.TYPE_ID, [SHA, 0, 1024, "job"]])
    ask = wire.decode_frame_body(bytes([wire.PROTOCOL_VERSION]) + old_ask)
    assert isinstance(ask, wire.FetchBundle) and ask.accept == ""
    assert not compress.accepts(ask)
    old_chunk = msgpack.packb([wire.BundleChunk.TYPE_ID, [SHA, 0, TEXT[:1024], 1024]])
    chunk = wire.decode_frame_body(bytes([wire.PROTOCOL_VERSION]) + old_chunk)
    assert compress.inflate_reply(chunk, 1024) is chunk  # uncompressed as it is
    # And an older peer reading ours takes the fields it knows (they are appended).
    new = wire.encode_message(compress.offer(wire.JobSync("j", 0, 0, 1000)))
    assert msgpack.unpackb(new)[1][:4] == ["j", 0, 0, 1000]


async def test_the_runtime_compresses_only_for_a_caller_that_asked() -> None:
    counts, bulk, _ = counting()
    chunk = wire.BundleChunk(SHA, 0, TEXT, len(TEXT))
    old_ask = wire.FetchBundle(SHA, 0, len(TEXT), "job")
    assert await bulk.answer(old_ask, chunk) is chunk
    ask = bulk.offer(old_ask)
    assert isinstance(ask, wire.FetchBundle) and ask.accept == "zlib"
    packed = await bulk.answer(ask, chunk)
    assert packed.encoding == "zlib"  # type: ignore[attr-defined]
    assert counts["bulk_raw_bytes"] == len(TEXT)
    assert counts["bulk_packed_bytes"] == len(packed.data)  # type: ignore[attr-defined]
    assert await bulk.inflate(ask, packed) == (chunk, "")
    off = Bulk(lambda: 0, lambda: False, lambda k, n: None, Clock())
    assert off.offer(old_ask) is old_ask and await off.answer(ask, chunk) is chunk


async def test_a_bomb_reply_fails_the_call_and_is_counted() -> None:
    counts, bulk, _ = counting()
    ask = wire.FetchBundle(SHA, 0, 1 << 20, "job", "zlib")
    bomb = wire.BundleChunk(SHA, 0, zlib.compress(b"\0" * (8 << 20)), 1 << 30, "zlib")
    reply, error = await bulk.inflate(ask, bomb)
    assert reply is None and "inflate past" in error
    assert counts == {"bulk_dropped_bomb": 1}


def test_inflate_limits_are_what_was_asked_for() -> None:
    assert inflate_limit(wire.FetchBundle(SHA, 0, 4096)) == 4096
    assert inflate_limit(wire.JobSync("j", 0, 0, 1000)) == SYNC_CHUNK
    assert inflate_limit(wire.Ok("")) == wire.MAX_FRAME


async def test_compressed_chunks_cross_a_real_connection() -> None:
    _, bulk, _ = counting()
    sent: list[int] = []

    async def handler(msg: wire.Message) -> wire.Message:
        assert isinstance(msg, wire.FetchBundle)
        return await bulk.answer(msg, wire.BundleChunk(SHA, msg.offset, TEXT, len(TEXT)))

    async def send(writer: asyncio.StreamWriter, reply: wire.Message, frame: bytes) -> None:
        sent.append(len(frame))
        await bulk.send(writer, reply, frame)

    server = await asyncio.start_server(
        lambda r, w: rpc.serve_connection(r, w, handler, send=send), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for ask in (wire.FetchBundle(SHA, 0, len(TEXT)), bulk.offer(wire.FetchBundle(SHA, 0,
                                                                                     len(TEXT)))):
            reply = await rpc.call(f"127.0.0.1:{port}", ask, 5.0)
            got, error = await bulk.inflate(ask, reply)
            assert got == wire.BundleChunk(SHA, 0, TEXT, len(TEXT)), error
    finally:
        server.close()
        await server.wait_closed()
    assert sent[0] > len(TEXT) > 5 * sent[1]  # as it is, then compressed


# --- pacing --------------------------------------------------------------------------------


def test_the_bucket_lets_a_burst_through_then_holds_to_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(1000, clock, burst=100)
    assert bucket.reserve(100) == 0.0
    assert bucket.reserve(100) == pytest.approx(0.1)  # in debt: wait for it
    assert bucket.reserve(50) == pytest.approx(0.15)  # queued behind the first
    clock.t += 1.0  # debt 150 paid, refilled to the burst at most
    assert bucket.reserve(100) == 0.0
    assert bucket.reserve(1) == pytest.approx(0.001)


def test_no_rate_is_no_limit_and_a_new_rate_applies_at_once() -> None:
    clock = Clock()
    bucket = TokenBucket(0, clock)
    assert all(bucket.reserve(1 << 30) == 0.0 for _ in range(3))
    bucket.set_rate(10_000, burst=1000)
    assert bucket.reserve(1000) == 0.0
    assert bucket.reserve(1000) == pytest.approx(0.1)


async def test_a_frame_goes_out_in_slices_at_the_rate() -> None:
    clock = Clock()
    rate = 250_000  # 2 Mbit/s
    bucket = TokenBucket(rate, clock)
    sink = Sink(clock)
    frame = os.urandom(1 << 20)
    start = clock.t
    waited = await paced_write(sink, frame, bucket, clock.sleep)
    assert b"".join(d for _, d in sink.writes) == frame
    assert max(len(d) for _, d in sink.writes) == slice_size(rate) == 5000
    # One burst of one slice, the rest at the rate: never ahead of it.
    assert waited == pytest.approx((len(frame) - 5000) / rate)
    sent = 0
    for at, data in sink.writes:
        sent += len(data)
        assert sent <= 5000 + (at - start) * rate + 1e-6
    assert slice_size(0) > slice_size(10_000) == MIN_SLICE


async def test_bulk_replies_are_paced_and_small_ones_are_not() -> None:
    counts: dict[str, int] = {}
    clock = Clock()
    rate = [100_000]
    bulk = Bulk(lambda: rate[0], lambda: True,
                lambda k, n: counts.__setitem__(k, counts.get(k, 0) + n), clock, clock.sleep)
    sink = Sink(clock)
    await bulk.send(sink, wire.Ok("x"), b"x" * 300_000)  # not bulk: at once, whole
    assert sink.writes == [(100.0, b"x" * 300_000)]
    chunk = wire.BundleChunk(SHA, 0, b"", 0)
    await bulk.send(sink, chunk, b"y" * 300_000)
    assert clock.t == pytest.approx(100.0 + (300_000 - 2000) / 100_000)
    assert counts["bulk_paced_bytes"] == 300_000
    small = wire.JobSyncReply("running", "", None, b"", b"", False)
    before = clock.t
    await bulk.send(sink, small, b"s" * 1000)  # a job's state: at once, though in debt
    assert clock.t == before and sink.writes[-1][1] == b"s" * 1000
    await bulk.send(sink, chunk, b"y" * 3000)  # ... and what it sent counts
    assert clock.t == pytest.approx(before + 4000 / 100_000)
    rate[0] = 0  # a reload to no limit: at once
    before = clock.t
    await bulk.send(sink, chunk, b"z" * 300_000)
    assert clock.t == before and sink.writes[-1][1] == b"z" * 300_000


def test_a_served_chunk_is_cut_to_go_out_at_the_rate_in_time() -> None:
    assert Bulk(lambda: 0, lambda: True, lambda k, n: None, Clock()).chunk_cap() == 0
    assert Bulk(lambda: 125_000, lambda: True, lambda k, n: None, Clock()).chunk_cap() == 250_000
    assert Bulk(lambda: 1000, lambda: True, lambda k, n: None, Clock()).chunk_cap() == 16 * 1024


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, rate", [
    ("2Mbit", 250_000), ("500kbit", 62_500), ("1gbit", 125_000_000), ("8mbps", 1_000_000),
    ("300KB/s", 300_000), ("1MiB/s", 1 << 20), ("4096", 4096), ("0", 0), (" 1.5Mbit ", 187_500),
])
def test_rates_parse_as_tc_writes_them(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "2M", "-1", "1iB/s", "2 Tbit", "1e6"])
def test_a_rate_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


def write(tmp_path: Path, body: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(body)
    return str(path)


def test_bulk_rate_takes_the_profile_default_or_the_file(tmp_path: Path) -> None:
    assert bulk_rate_bytes(config.load(None, {"profile": "edge"}, env={})) == 250_000
    assert bulk_rate_bytes(config.load(None, {"profile": "lan"}, env={})) == 0
    s = config.load(write(tmp_path, '[network]\nbulk_rate = "1Mbit"\ncompress = false\n'),
                    {"profile": "lan"}, env={})
    assert bulk_rate_bytes(s) == 125_000 and s.compress is False
    s = config.load(write(tmp_path, "[network]\nbulk_rate = 0\n"), {"profile": "edge"}, env={})
    assert bulk_rate_bytes(s) == 0  # an explicit 0: no limit, whatever the profile
    s = config.load(None, {}, env={"FLEXMESH_BULK_RATE": "64KB/s"})
    assert bulk_rate_bytes(s) == 64_000


@pytest.mark.parametrize("value, message", [
    ('"fast"', "invalid rate 'fast'"),
    ("100", "below 1000 bytes/s"),
    ("true", "must be a str"),
])
def test_a_bad_bulk_rate_is_one_clear_error(tmp_path: Path, value: str, message: str) -> None:
    path = write(tmp_path, f"[network]\nbulk_rate = {value}\n")
    with pytest.raises(ConfigError, match="bulk_rate") as err:
        config.load(path, {}, env={})
    assert message in str(err.value) and path in str(err.value)
