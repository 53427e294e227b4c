"""Review 34 (streamed bulk fetches, AES-GCM bulk frames): repro tests of findings. Each
test fails on 8c38b58 and states the behaviour the review asks for."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flexmesh.agent import bundlefetch, rpc, rpcstream
from flexmesh.agent.runtime.bulk import MAX_STREAMS, MIN_CHUNK, Bulk
from flexmesh.agent.runtime.payload import Payload
from flexmesh.protocol import wire
from flexmesh.protocol.crypto import CryptoError, Keyring, Sealer

KEY = os.urandom(32)
SIZE = 256 * 1024


def _origin(tmp_path: Path) -> tuple[Payload, Bulk, str]:
    """A Payload serving one bundle of a live job, with the agent's parts it reads."""
    path = tmp_path / "bundle.tar"
    path.write_bytes(os.urandom(SIZE))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    bulk = Bulk(lambda: 0, lambda: False, lambda name, n=1: None, time.monotonic)
    payload = Payload.__new__(Payload)
    payload.agent = SimpleNamespace(  # type: ignore[assignment]
        node=SimpleNamespace(origin=SimpleNamespace(
            jobs={"j": SimpleNamespace(bundle=sha, terminal=False)})),
        transport=SimpleNamespace(bulk=bulk), count=lambda *a: None,
        settings=SimpleNamespace(name="origin"))
    payload.cache = SimpleNamespace(has=lambda s: True,  # type: ignore[assignment]
                                    path=lambda s: path)
    return payload, bulk, sha


async def test_stream_requests_arriving_together_are_held_to_max_streams(
        tmp_path: Path) -> None:
    """bulk.py may_stream / answers: the gate is checked in serve() but the count is
    raised only when the generator first runs, after serve's await (the file's open):
    requests that arrive together all pass it."""
    payload, bulk, sha = _origin(tmp_path)
    msg = wire.FetchBundle(sha, 0, bundlefetch.CHUNK, "j", through=SIZE)
    answers: list[Any] = await asyncio.gather(
        *(payload.serve(msg) for _ in range(2 * MAX_STREAMS)))
    streams = [bulk.answers(msg, a) for a in answers if not isinstance(a, wire.Message)]
    try:
        for s in streams:  # (as serve_connection starts each at once)
            await anext(s)
        assert bulk.streams <= MAX_STREAMS, f"{bulk.streams} streams served at once"
    finally:
        for s in streams:
            await s.aclose()


@pytest.mark.parametrize("length", [0, 1])
async def test_a_stream_is_not_cut_into_tiny_chunks(tmp_path: Path, length: int) -> None:
    """payload.serve -> bundlefetch.chunks: step = max(1, min(length, CHUNK)): one request
    with length 0 or 1 makes the origin read, seal and send a frame per byte (about 80 us
    of its event loop and 54 bytes out each: a day of CPU for a 1 GiB bundle). Either
    floor the step or answer such a request with one chunk (the caller then asks by call)."""
    payload, _, sha = _origin(tmp_path)
    answer = await payload.serve(wire.FetchBundle(sha, 0, length, "j", through=SIZE))
    if isinstance(answer, wire.Message):
        return  # (one chunk: no stream)
    try:
        first = await anext(answer)
    finally:
        await answer.aclose()
    assert isinstance(first, wire.BundleChunk)
    assert len(first.data) >= MIN_CHUNK or not first.more, \
        f"a stream of {len(first.data)}-byte chunks"


def _codec(me: str) -> rpc.Codec:
    return rpc.Codec(Sealer(Keyring([KEY])), b"test", me=me, aes=True)


def test_a_request_sealed_with_the_bulk_cipher_does_not_open() -> None:
    """crypto.Sealer.open opens SEAL_BULK wherever it opens SEAL_VERSION: a request, not
    only a stream's reply. The AES subkey (GCM: a repeated nonce gives away its hash key,
    for every nonce) should be good for nothing but what it was made for."""
    frame = _codec("a").encode(wire.FetchBundle("c" * 64, 0, 10, "j"), to="b", bulk=True)
    assert frame[wire.FRAME_HEADER.size] == 0x82
    with pytest.raises(rpc.RemoteError):
        _codec("b").decode(frame[wire.FRAME_HEADER.size:], request=True)


def test_a_datagram_sealed_with_the_bulk_cipher_does_not_open() -> None:
    """transport.on_datagram opens UDP with Sealer.open: SEAL_BULK opens there too."""
    packet = wire.encode_packet([wire.Hello("a")])
    now = time.time()
    sealed = bytes(Sealer(Keyring([KEY])).seal_after(0, packet, b"test", now, bulk=True))
    with pytest.raises(CryptoError):
        Sealer(Keyring([KEY])).open(sealed, b"test", now)


async def test_a_read_ahead_never_runs_on_a_closed_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bundlefetch.chunks: a stream closed while its next chunk is read on a thread
    leaves its file open until that read is done, then closes it (a cancel can no
    longer skip the close, nor close the fd under the read)."""
    path = tmp_path / "b"
    path.write_bytes(os.urandom(SIZE))
    real, go, fds_ok = os.pread, threading.Event(), []
    calls = 0

    def pread(fd: int, n: int, pos: int) -> bytes:
        nonlocal calls
        calls += 1
        if calls > 1:  # the read-ahead: held until the stream was closed
            go.wait(10)
            try:
                os.fstat(fd)
                fds_ok.append(True)
            except OSError:
                fds_ok.append(False)
        return real(fd, n, pos)

    monkeypatch.setattr(bundlefetch.os, "pread", pread)
    f = open(path, "rb")  # noqa: SIM115
    gen = bundlefetch.chunks(f, "b", 0, SIZE, 1000)
    await anext(gen)  # (the next chunk is being read ahead now)
    await gen.aclose()
    assert not f.closed  # (the read-ahead still has it)
    go.set()
    for _ in range(1000):  # (closed by the read's done callback, on this loop)
        if f.closed:
            break
        await asyncio.sleep(0.01)
    assert f.closed and fds_ok == [True], "the file was closed while a thread read from it"


# --- fixes of the review's risks and nits ------------------------------------------------


async def test_tries_that_bring_something_do_not_count_toward_giving_up(
        tmp_path: Path) -> None:
    """Consecutive failures give a fetch up, not failures in all: a stream that breaks
    after every chunk still brings the whole with retries=1."""
    path = tmp_path / "b"
    data = os.urandom(10 * 3000)
    path.write_bytes(data)
    want = bundlefetch.Want(hashlib.sha256(data).hexdigest(), len(data), "j")
    opened = 0

    @contextlib.asynccontextmanager
    async def opener(msg: wire.Message) -> AsyncIterator[bundlefetch.Receive]:
        nonlocal opened
        opened += 1
        assert isinstance(msg, wire.FetchBundle)
        sent = False

        async def receive() -> tuple[wire.Message | None, str]:
            nonlocal sent
            if sent:
                return None, "connection reset by peer"
            sent = True
            chunk, total = bundlefetch.read_chunk(path, msg.offset, msg.length)
            return wire.BundleChunk(msg.bundle, msg.offset, chunk, total, more=True), ""

        yield receive

    async def no_call(msg: wire.Message) -> tuple[wire.Message | None, str]:
        raise AssertionError("a call per chunk")

    got = await bundlefetch.fetch(no_call, want, tmp_path / "p", tmp_path / "d", chunk=3000,
                                  retries=1, pause=0.0, opener=opener)
    assert (tmp_path / "d").read_bytes() == data
    assert got.retries == 9 and opened == 10


@pytest.mark.parametrize(("rate", "ahead"), [
    ("", rpc.STREAM_AHEAD), ("1Mbit", 4 * 125_000), ("64kbit", 64 * 1024),
    ("1Gbit", rpc.STREAM_AHEAD)])
def test_a_stream_queues_seconds_of_the_bulk_rate_not_more(rate: str, ahead: int) -> None:
    """Frames are sealed before they wait to go out: at a low bulk rate a 2 MiB queue would
    take longer than the replay window (60 s) to drain, and its frames arrive stale."""
    from flexmesh.agent.config import Settings
    from flexmesh.agent.runtime.transport import tcp_limits

    assert tcp_limits(Settings(bulk_rate=rate)).stream_ahead == ahead


async def test_a_stream_cut_inside_a_frame_says_so() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(wire.FRAME_HEADER.pack(1000) + b"\x01" * 10)  # (then gone)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with rpcstream.stream(addr, wire.FetchBundle("b" * 64, 0, 10, "j", through=10),
                                    5) as s:
            with pytest.raises(rpc.CallError, match="inside a frame"):
                await s.next()
    finally:
        server.close()
        await server.wait_closed()
