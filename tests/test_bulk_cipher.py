"""Bulk frames under AES-256-GCM: sealed only for a caller that opens them, by an answerer
with AES instructions; opened by every agent of this version; refused as ChaCha20 frames
are when changed, replayed or under another key. And streams over uvloop's transports,
which the agent runs on (its buffered protocol is not asyncio's own class there)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest
import uvloop
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from flexmesh.agent import rpc, rpcstream
from flexmesh.agent.runtime.keys import cpu_has_aes
from flexmesh.protocol import compress, crypto, wire
from flexmesh.protocol.crypto import CryptoError, Keyring, Sealer

KEY = bytes(range(32))
CLUSTER = b"flexmesh-test"
T0 = 1_700_000_000.0


def _pair() -> tuple[Sealer, Sealer]:
    return Sealer(Keyring([KEY])), Sealer(Keyring([KEY]))


def _reason(sealer: Sealer, packet: bytes | bytearray, bulk: bool = False) -> str:
    with pytest.raises(CryptoError) as info:
        sealer.open(packet, CLUSTER, T0, bulk=bulk)
    return info.value.reason


def test_a_bulk_frame_is_sealed_with_the_aes_subkey_and_opens_anywhere() -> None:
    a, b = _pair()
    frame = a.seal_after(4, b"chunk" * 1000, CLUSTER, T0, bulk=True)
    packet = bytes(frame[4:])
    assert packet[0] == crypto.SEAL_BULK and len(packet) == 5000 + crypto.OVERHEAD
    assert _reason(b, packet) == "version"  # (only where a stream's reply is expected)
    assert b.open(packet, CLUSTER, T0, bulk=True) == b"chunk" * 1000
    plain = a.seal_after(0, b"chunk", CLUSTER, T0)
    assert plain[0] == crypto.SEAL_VERSION and b.open(plain, CLUSTER, T0) == b"chunk"
    # The subkey is not the key: AES-GCM under the key itself does not open it.
    header = packet[:crypto.HEADER_SIZE]
    with pytest.raises(InvalidTag):
        AESGCM(KEY).decrypt(header[5:], packet[crypto.HEADER_SIZE:], header + CLUSTER)


def test_a_bulk_frame_changed_replayed_or_relabelled_does_not_open() -> None:
    a, b = _pair()
    packet = bytearray(a.seal_after(0, b"x" * 100, CLUSTER, T0, bulk=True))
    assert b.open(packet, CLUSTER, T0, bulk=True) == b"x" * 100
    assert _reason(b, packet, bulk=True) == "replayed"
    relabelled = bytearray(a.seal_after(0, b"x" * 100, CLUSTER, T0, bulk=True))
    relabelled[0] = crypto.SEAL_VERSION  # (as if a ChaCha20 frame: it is not one)
    assert _reason(b, relabelled, bulk=True) == "tampered"
    chacha = bytearray(a.seal(b"x" * 100, CLUSTER, T0))
    chacha[0] = crypto.SEAL_BULK
    assert _reason(b, chacha, bulk=True) == "tampered"
    flipped = bytearray(a.seal_after(0, b"x" * 100, CLUSTER, T0, bulk=True))
    flipped[40] ^= 1
    assert _reason(b, flipped, bulk=True) == "tampered"
    other = Sealer(Keyring([bytes(32)]))
    assert _reason(other, a.seal_after(0, b"x", CLUSTER, T0, bulk=True),
                   bulk=True) == "unknown_key"
    wrong_cluster = a.seal_after(0, b"x", b"other", T0, bulk=True)
    assert _reason(b, wrong_cluster, bulk=True) == "tampered"


def test_one_nonce_sequence_serves_both_ciphers() -> None:
    a, _ = _pair()
    nonces = [bytes(a.seal_after(0, b"x", CLUSTER, T0, bulk=i % 2 == 0)[5:17])
              for i in range(100)]
    assert len(set(nonces)) == 100


@pytest.mark.parametrize(("text", "has"), [
    ("processor\t: 0\nflags\t\t: fpu sse2 aes avx2 sha_ni\n", True),  # x86
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n", True),  # ARM
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n", False),  # a Raspberry Pi 4
    ("flags\t\t: fpu vaes sse2\nmodel name\t: aes\n", False),  # (only the flag itself counts)
    ("", False),
])
def test_aes_instructions_are_read_from_cpuinfo(tmp_path: Path, text: str, has: bool) -> None:
    (tmp_path / "cpuinfo").write_text(text)
    assert cpu_has_aes(tmp_path / "cpuinfo") is has
    assert cpu_has_aes(tmp_path / "missing") is False


def test_a_caller_offers_what_it_takes_once_each() -> None:
    ask = wire.FetchBundle("b" * 64, 0, 10, "j", through=100)
    both = compress.offer(compress.offer(ask), compress.AES)
    assert isinstance(both, wire.FetchBundle) and both.accept == "zlib,aes-gcm"
    assert compress.offer(both, compress.AES) == both and compress.offer(both) == both
    assert compress.accepts(both) and compress.accepts(both, compress.AES)
    assert not compress.accepts(compress.offer(ask), compress.AES)
    assert compress.offer(wire.Cancel("j", "x"), compress.AES) == wire.Cancel("j", "x")


# --- over sockets: which cipher a stream's frames come under --------------------------------


class Recording(rpc.Codec):
    """A caller's codec that notes the first byte of every sealed frame it opens."""

    def __init__(self, sealer: Sealer, me: str) -> None:
        super().__init__(sealer, CLUSTER, me=me)
        self.firsts: list[int] = []

    def decode(self, body: bytes | bytearray | memoryview, request: bool = True,
               bulk: bool = False) -> wire.Message:
        self.firsts.append(body[0])
        return super().decode(body, request, bulk)


@contextlib.asynccontextmanager
async def answerer(codec: rpc.Codec, count: int) -> AsyncIterator[str]:
    data = os.urandom(64 * 1024)

    async def replies(msg: wire.FetchBundle) -> AsyncGenerator[wire.Message, None]:
        for i in range(count):
            yield wire.BundleChunk(msg.bundle, i, data, count, more=i < count - 1)

    async def handler(msg: wire.Message) -> wire.Message | rpc.Replies:
        assert isinstance(msg, wire.FetchBundle)
        return replies(msg)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await rpc.serve_connection(reader, writer, handler, codec)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def _firsts(answerer_aes: bool, offer: bool, count: int = 3) -> list[int]:
    codec = rpc.Codec(Sealer(Keyring([KEY])), CLUSTER, me="server", aes=answerer_aes)
    caller = Recording(Sealer(Keyring([KEY])), "client")
    ask: wire.Message = wire.FetchBundle("b" * 64, 0, 64 * 1024, "j", through=1 << 30)
    if offer:
        ask = compress.offer(ask, compress.AES)
    async with answerer(codec, count) as addr, \
            rpcstream.stream(addr, ask, 5, caller, "client", "server") as s:
        replies = [await s.next() for _ in range(count)]
    assert [r.offset for r in replies if isinstance(r, wire.BundleChunk)] == [0, 1, 2]
    return caller.firsts


@pytest.mark.parametrize(("answerer_aes", "offer", "first"), [
    (True, True, crypto.SEAL_BULK),
    (True, False, crypto.SEAL_VERSION),  # (a caller without AES instructions)
    (False, True, crypto.SEAL_VERSION),  # (an answerer without them)
])
async def test_a_stream_goes_under_aes_only_where_both_ends_have_it(
        answerer_aes: bool, offer: bool, first: int) -> None:
    assert await _firsts(answerer_aes, offer) == [first] * 3


def test_a_stream_works_on_uvloop() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(_firsts(True, True)) == [crypto.SEAL_BULK] * 3
