"""Review 34 (streamed bulk fetches, AES-GCM bulk frames): repro tests of findings. Each
test fails on 8c38b58 and states the behaviour the review asks for."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flexmesh.agent import bundlefetch, rpc
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


@pytest.mark.filterwarnings("ignore::ResourceWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_read_ahead_never_runs_on_a_closed_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bundlefetch.chunks: the thread reads by fd number; a cancel that lands while the
    finally waits for that read skips f.close(), and the file object, no longer held,
    closes the fd under the read (which may read another file that took the number)."""
    path = tmp_path / "b"
    path.write_bytes(os.urandom(SIZE))
    real, go, fds_ok = os.pread, threading.Event(), []
    calls = 0

    def pread(fd: int, n: int, pos: int) -> bytes:
        nonlocal calls
        calls += 1
        if calls > 1:  # the read-ahead: held until the stream was torn down
            go.wait(10)
            try:
                os.fstat(fd)
                fds_ok.append(True)
            except OSError:
                fds_ok.append(False)
        return real(fd, n, pos)

    monkeypatch.setattr(bundlefetch.os, "pread", pread)
    gen = bundlefetch.chunks(open(path, "rb"), "b", 0, SIZE, 1000)  # noqa: SIM115
    await anext(gen)  # (the next chunk is being read ahead now)
    closing = asyncio.ensure_future(gen.aclose())
    await asyncio.sleep(0.05)  # (aclose waits for the read-ahead in the finally)
    assert not closing.done() and calls == 2
    closing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await closing
    del gen, closing
    for _ in range(3):
        await asyncio.sleep(0)
        gc.collect()
    go.set()
    while not fds_ok:
        await asyncio.sleep(0.01)
    assert fds_ok == [True], "the file was closed while a thread still read from it"
