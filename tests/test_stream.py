"""Streamed bundle and results fetches: one request, consecutive chunks on one connection.

The owner's side (``bundlefetch.fetch`` with an ``opener``) against an origin in memory;
the origin's side (``bundlefetch.chunks``); streams of frames over real sockets on
127.0.0.1 (``rpc.serve_connection`` and ``rpcstream.stream``), plain and sealed; a
stream's compression (``Bulk.answers``); and the fields the wire grew for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

import msgpack
import pytest

from flexmesh.agent import bundlefetch, rpc, rpcstream
from flexmesh.agent.bundlefetch import FetchError, Want, chunks, fetch, read_chunk
from flexmesh.agent.runtime.bulk import MAX_SKIP, Bulk
from flexmesh.protocol import compress, wire
from flexmesh.protocol.crypto import Keyring, Sealer

KEY = os.urandom(32)
SIZE = 10_000
STEP = 3000  # bytes asked for per chunk in the fetches below


def _bundle(tmp_path: Path, size: int = SIZE) -> tuple[Path, Want, Path, Path]:
    """The origin's file, what is wanted of it, the partial file and where it goes."""
    path = tmp_path / "origin.tar"
    path.write_bytes(os.urandom(size))
    want = Want(hashlib.sha256(path.read_bytes()).hexdigest(), size, "job1")
    return path, want, tmp_path / "p.part", tmp_path / "b.tar"


class Origin:
    """An origin in memory. Its streams are what an agent serves (``chunks``), or with
    ``behind`` what a peer one version behind answers (one chunk, no ``more``), or with
    ``refuse`` an ``Error``; its first stream breaks after ``break_after`` replies."""

    def __init__(self, path: Path, partial: Path, behind: bool = False, refuse: str = "",
                 break_after: int | None = None) -> None:
        self.path, self.partial, self.behind, self.refuse = path, partial, behind, refuse
        self.break_after = break_after
        self.requests: list[wire.FetchBundle] = []
        self.held: list[int] = []  # the partial file's size as each stream opened
        self.asked: list[int] = []  # offsets asked for a call each

    async def call(self, msg: wire.Message) -> tuple[wire.Message | None, str]:
        assert isinstance(msg, wire.FetchBundle) and not msg.through
        return self._chunk(msg), ""

    def _chunk(self, msg: wire.FetchBundle) -> wire.BundleChunk:
        self.asked.append(msg.offset)
        data, total = read_chunk(self.path, msg.offset, msg.length)
        return wire.BundleChunk(msg.bundle, msg.offset, data, total)

    def _replies(self, msg: wire.FetchBundle) -> AsyncGenerator[wire.Message, None]:
        if self.refuse:
            return one(wire.Error(self.refuse))
        if self.behind:  # (it reads no 'through')
            return one(self._chunk(msg))
        return chunks(reading(self.path), msg.bundle, msg.offset, msg.through, msg.length)

    @contextlib.asynccontextmanager
    async def open(self, msg: wire.Message) -> AsyncIterator[bundlefetch.Receive]:
        assert isinstance(msg, wire.FetchBundle)
        self.requests.append(msg)
        self.held.append(self.partial.stat().st_size if self.partial.exists() else 0)
        replies, n, first = self._replies(msg), 0, len(self.requests) == 1

        async def receive() -> tuple[wire.Message | None, str]:
            nonlocal n
            n += 1
            if first and self.break_after is not None and n > self.break_after:
                return None, "connection reset by peer"
            try:
                return await anext(replies), ""
            except StopAsyncIteration:
                return None, "the origin closed the connection"

        try:
            yield receive
        finally:
            await replies.aclose()


async def one(msg: wire.Message) -> AsyncGenerator[wire.Message, None]:
    yield msg


async def no_call(msg: wire.Message) -> tuple[wire.Message | None, str]:
    raise AssertionError(f"a call per chunk where a stream was served: {msg}")


# --- the owner's side: fetch with an opener ----------------------------------------------


async def test_a_whole_bundle_comes_in_one_stream(tmp_path: Path) -> None:
    path, want, partial, dest = _bundle(tmp_path)
    origin = Origin(path, partial)
    got = await fetch(no_call, want, partial, dest, chunk=STEP, pause=0, opener=origin.open)
    assert dest.read_bytes() == path.read_bytes() and not partial.exists()
    assert origin.requests == [wire.FetchBundle(want.sha, 0, STEP, "job1", through=SIZE)]
    assert (got.chunks, got.bytes, got.retries, got.resumed_at) == (4, SIZE, 0, 0)


async def test_a_broken_stream_is_reopened_from_what_the_partial_holds(tmp_path: Path) -> None:
    path, want, partial, dest = _bundle(tmp_path)
    origin = Origin(path, partial, break_after=2)
    got = await fetch(no_call, want, partial, dest, chunk=STEP, pause=0, opener=origin.open)
    assert [(r.offset, r.through) for r in origin.requests] == [(0, SIZE), (6000, SIZE)]
    assert origin.held == [0, 6000]  # the two chunks that came were written before
    assert got.retries == 1 and got.bytes == SIZE
    assert dest.read_bytes() == path.read_bytes()


async def test_a_fetch_given_up_resumes_by_stream_from_the_partial(tmp_path: Path) -> None:
    path, want, partial, dest = _bundle(tmp_path)
    with pytest.raises(FetchError, match=r"gave up after 0 retries in [0-9.]+ s at byte 3000"):
        await fetch(no_call, want, partial, dest, chunk=STEP, retries=0, pause=0,
                    opener=Origin(path, partial, break_after=1).open)
    assert partial.read_bytes() == path.read_bytes()[:3000] and not dest.exists()
    back = Origin(path, partial)
    got = await fetch(no_call, want, partial, dest, chunk=STEP, pause=0, opener=back.open)
    assert [r.offset for r in back.requests] == [3000]
    assert (got.resumed_at, got.bytes) == (3000, SIZE - 3000)
    assert dest.read_bytes() == path.read_bytes()


async def test_an_answerer_one_version_behind_is_asked_chunk_by_chunk(tmp_path: Path) -> None:
    path, want, partial, dest = _bundle(tmp_path)
    origin = Origin(path, partial, behind=True)
    got = await fetch(origin.call, want, partial, dest, chunk=STEP, pause=0,
                      opener=origin.open)
    assert len(origin.requests) == 1  # the stream is not tried again
    assert origin.asked == [0, 3000, 6000, 9000]  # (its one reply, then calls from 3000)
    assert got.retries == 0 and dest.read_bytes() == path.read_bytes()


async def test_a_refusal_or_a_stopped_job_ends_a_streamed_fetch(tmp_path: Path) -> None:
    path, want, partial, dest = _bundle(tmp_path)
    refusing = Origin(path, partial, refuse="no job here carries it")
    with pytest.raises(FetchError, match="refused: no job here carries it") as info:
        await fetch(no_call, want, partial, dest, chunk=STEP, pause=0, opener=refusing.open)
    assert info.value.refused and len(refusing.requests) == 1
    asked: list[int] = []

    def alive() -> bool:  # the job stops once the first chunk came
        asked.append(1)
        return len(asked) < 2

    origin = Origin(path, partial)
    with pytest.raises(FetchError, match="job stopped"):
        await fetch(no_call, want, partial, dest, chunk=STEP, pause=0, alive=alive,
                    opener=origin.open)
    assert len(origin.requests) == 1 and partial.stat().st_size == 3000
    assert not dest.exists()


class FailingFile(io.FileIO):
    """A partial file whose second write fails as on a full disk."""

    writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        if self.writes == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


async def test_a_failed_write_ends_the_fetch_and_removes_the_partial(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, want, partial, dest = _bundle(tmp_path)
    opened: list[FailingFile] = []

    def failing_open(name: Any, mode: str = "r", *args: Any) -> Any:
        if mode != "ab":
            return open(name, mode, *args)
        opened.append(FailingFile(name, mode))
        return opened[-1]

    monkeypatch.setattr(bundlefetch, "open", failing_open, raising=False)
    with pytest.raises(OSError, match="No space left"):
        await fetch(no_call, want, partial, dest, chunk=1000, pause=0,
                    opener=Origin(path, partial).open)
    assert opened[0].writes == 2  # nothing written after the write that failed
    assert not partial.exists() and not dest.exists()  # (what came must not fill the disk)


# --- the origin's side: chunks() -----------------------------------------------------------


def reading(path: Path) -> IO[bytes]:
    """A file for ``chunks``, which closes it."""
    return open(path, "rb")


async def _all(gen: AsyncGenerator[wire.Message, None]) -> list[wire.Message]:
    return [reply async for reply in gen]


def _chunked(replies: list[wire.Message]) -> list[wire.BundleChunk]:
    return [r for r in replies if isinstance(r, wire.BundleChunk)]


def _spans(replies: list[wire.Message]) -> list[tuple[int, int, bool, int]]:
    return [(r.offset, len(r.data), r.more, r.total) for r in _chunked(replies)]


async def test_chunks_cover_the_span_asked_for(tmp_path: Path) -> None:
    path, *_ = _bundle(tmp_path)
    data = path.read_bytes()
    served: list[int] = []
    whole = await _all(chunks(reading(path), "n", 0, SIZE, STEP, lambda: served.append(1)))
    assert _spans(whole) == [(0, 3000, True, SIZE), (3000, 3000, True, SIZE),
                             (6000, 3000, True, SIZE), (9000, 1000, False, SIZE)]
    assert b"".join(r.data for r in _chunked(whole)) == data and len(served) == 4
    part = await _all(chunks(reading(path), "n", 2000, 7000, STEP))
    assert _spans(part) == [(2000, 3000, True, SIZE), (5000, 2000, False, SIZE)]
    past = await _all(chunks(reading(path), "n", 9500, 50 * SIZE, STEP))
    assert _spans(past) == [(9500, 500, False, SIZE)]
    assert await _all(chunks(reading(path), "n", SIZE, SIZE, STEP)) == [
        wire.BundleChunk("n", SIZE, b"", SIZE, more=False)]
    big = tmp_path / "big"  # (however much is asked, at most a CHUNK a reply)
    big.write_bytes(b"x" * (bundlefetch.CHUNK + 10))
    replies = await _all(chunks(reading(big), "n", 0, 1 << 40, 1 << 30))
    assert [n for _, n, _, _ in _spans(replies)] == [bundlefetch.CHUNK, 10]


async def test_a_read_error_ends_the_stream_with_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, *_ = _bundle(tmp_path)
    real = os.pread

    def pread(fd: int, n: int, pos: int) -> bytes:
        if pos >= STEP:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, n, pos)

    monkeypatch.setattr(os, "pread", pread)
    f = reading(path)
    replies = await _all(chunks(f, "n", 0, SIZE, STEP))
    assert _spans(replies) == [(0, STEP, True, SIZE)]
    assert replies[1:] == [wire.Error("cannot read n: Input/output error")]
    assert f.closed


async def test_a_stream_left_early_closes_its_file(tmp_path: Path) -> None:
    path, *_ = _bundle(tmp_path)
    f = reading(path)
    gen = chunks(f, "n", 0, SIZE, STEP)
    first = await anext(gen)
    assert isinstance(first, wire.BundleChunk) and first.more and not f.closed
    await gen.aclose()  # (the next chunk was being read on a thread: closed after it)
    for _ in range(1000):
        if f.closed:
            break
        await asyncio.sleep(0.01)
    assert f.closed


# --- streams of frames over real sockets ---------------------------------------------------


def keyed(me: str) -> rpc.Codec:
    """A codec of its own (its own nonces and replay window), as another agent has."""
    return rpc.Codec(Sealer(Keyring([KEY])), b"test", me=me)


CODECS: dict[str, Callable[[str], rpc.Codec]] = {"plain": lambda me: rpc.PLAIN,
                                                 "sealed": keyed}


class Answerer:
    """An agent's TCP end: a ``FetchBundle`` is answered by a stream of ``count`` chunks
    of ``size`` bytes, anything else by one ``Error``; ``ended``: how the first
    connection ended (None, or what serve_connection raised)."""

    def __init__(self, codec: rpc.Codec, count: int, size: int,
                 limits: rpc.Limits = rpc.DEFAULT_LIMITS) -> None:
        self.codec, self.count, self.limits = codec, count, limits
        self.data = os.urandom(size)
        self.made = 0  # replies made
        self.closed = asyncio.Event()  # the stream's generator ran its finally
        self.ended: asyncio.Future[BaseException | None] = asyncio.Future()
        self.addr = ""

    async def handler(self, msg: wire.Message) -> wire.Message | rpc.Replies:
        if isinstance(msg, wire.FetchBundle):
            return self.replies(msg)
        return wire.Error(f"not a stream: {type(msg).__name__}")

    async def replies(self, msg: wire.FetchBundle) -> AsyncGenerator[wire.Message, None]:
        try:
            for i in range(self.count):
                self.made += 1
                yield wire.BundleChunk(msg.bundle, i, self.data, self.count,
                                       more=i < self.count - 1)
        finally:
            self.closed.set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outcome: BaseException | None = None
        try:
            await rpc.serve_connection(reader, writer, self.handler, self.codec, self.limits)
        except (rpc.LimitError, rpc.RemoteError) as exc:
            outcome = exc
        if not self.ended.done():
            self.ended.set_result(outcome)


@contextlib.asynccontextmanager
async def answering(answerer: Answerer) -> AsyncIterator[Answerer]:
    server = await asyncio.start_server(answerer.serve, "127.0.0.1", 0)
    answerer.addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield answerer
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("kind", list(CODECS))
async def test_a_stream_brings_every_frame_and_a_call_still_one(kind: str) -> None:
    async with answering(Answerer(CODECS[kind]("server"), count=5, size=100_000)) as a:
        codec = CODECS[kind]("client")
        ask = wire.FetchBundle("b" * 64, 0, 100_000, "j", through=500_000)
        async with rpcstream.stream(a.addr, ask, 5, codec, "client", "server") as s:
            got = _chunked([await s.next() for _ in range(5)])
        assert [(r.offset, r.more) for r in got] == [(i, i < 4) for i in range(5)]
        assert all(r.data == a.data for r in got)
        await asyncio.wait_for(a.closed.wait(), 5)
        reply = await rpc.call(a.addr, wire.Cancel("j", "x"), 5, codec, "client", "server")
        assert reply == wire.Error("not a stream: Cancel")


async def test_a_caller_that_leaves_early_closes_the_answerers_stream() -> None:
    async with answering(Answerer(rpc.PLAIN, count=10_000, size=64 * 1024)) as a:
        ask = wire.FetchBundle("b" * 64, 0, 64 * 1024, "j", through=1 << 40)
        async with rpcstream.stream(a.addr, ask, 5) as s:
            first = await s.next()
            assert isinstance(first, wire.BundleChunk) and first.more
        await asyncio.wait_for(a.closed.wait(), 5)  # (its finally ran: its file is closed)
        assert a.made < 10_000
        assert await asyncio.wait_for(a.ended, 5) is None


async def test_a_caller_that_stops_reading_is_dropped() -> None:
    limits = rpc.Limits(idle_timeout=0.2, body_timeout=0.2, body_rate=1 << 30)
    size = 1 << 20  # (socket buffers on both sides fill within a few dozen of these)
    async with answering(Answerer(rpc.PLAIN, count=500, size=size, limits=limits)) as a:
        ask = wire.FetchBundle("b" * 64, 0, size, "j", through=1 << 40)
        async with rpcstream.stream(a.addr, ask, 5):
            ended = await asyncio.wait_for(a.ended, 10)  # (nothing read meanwhile)
        assert isinstance(ended, rpc.LimitError) and ended.counter == "tcp_stream_stalls"
        assert a.closed.is_set() and a.made < 500


# --- a stream's compression ----------------------------------------------------------------


async def test_a_streams_incompressible_chunks_are_sampled_ever_more_rarely(
        monkeypatch: pytest.MonkeyPatch) -> None:
    texts = {i for i in range(62, 70)}  # compressible; the rest random
    n, size = 73, 4096
    random_bytes = [os.urandom(size) for _ in range(n)]
    tried: list[int] = []
    deflate = compress.deflate_reply

    def counted(reply: wire.Message, *args: Any) -> wire.Message:
        assert isinstance(reply, wire.BundleChunk)
        tried.append(reply.offset)
        return deflate(reply, *args)

    monkeypatch.setattr(compress, "deflate_reply", counted)
    counts: list[tuple[str, int]] = []
    bulk = Bulk(lambda: 0, lambda: True, lambda name, k: counts.append((name, k)),
                asyncio.get_running_loop().time)
    closed = asyncio.Event()

    async def replies() -> AsyncGenerator[wire.Message, None]:
        try:
            for i in range(n):
                data = b"a" * size if i in texts else random_bytes[i]
                yield wire.BundleChunk("s", i, data, n, more=i < n - 1)
        finally:
            closed.set()

    request = wire.FetchBundle("s", 0, size, accept="zlib", through=n * size)
    out = _chunked(await _all(bulk.answers(request, replies())))
    # After misses the next 1, 3, 7, 15, 15 go untried; a chunk that compressed resets
    # that, so the random one after it is tried and only the one after that is skipped.
    assert tried == [0, 2, 6, 14, 30, 46, 62, 63, 64, 65, 66, 67, 68, 69, 70, 72]
    assert MAX_SKIP == 46 - 30 - 1
    assert [r.offset for r in out if r.encoding] == sorted(texts)
    assert [r.offset for r in out] == list(range(n)) and closed.is_set()
    assert sum(1 for name, _ in counts if name == "bulk_raw_bytes") == len(tried)
    closed.clear()
    early = bulk.answers(request, replies())
    await anext(early)
    await early.aclose()
    assert closed.is_set()  # (the stream under it is closed too: it may hold a file)


# --- the wire ------------------------------------------------------------------------------


def _old(cls: type[wire.Message], fields: list[Any]) -> wire.Message:
    """A message as a peer one version behind encodes it (the new last field left out)."""
    body = msgpack.packb([cls.TYPE_ID, fields], use_bin_type=True)
    return wire.decode_frame_body(bytes([wire.PROTOCOL_VERSION]) + body)


def test_requests_and_chunks_of_the_previous_layout_do_not_stream() -> None:
    sha = "c" * 64
    assert _old(wire.FetchBundle, [sha, 10, 100, "j", "zlib"]) == wire.FetchBundle(
        sha, 10, 100, "j", "zlib", through=0)
    assert _old(wire.FetchResults, ["j", sha, 10, 100, ""]) == wire.FetchResults(
        "j", sha, 10, 100, "", through=0)
    old = _old(wire.BundleChunk, [sha, 10, b"xy", 12, ""])
    assert isinstance(old, wire.BundleChunk) and old.more is False
    for msg in (wire.FetchBundle(sha, 10, 100, "j", "zlib", through=1 << 40),
                wire.FetchResults("j", sha, 10, 100, through=110),
                wire.BundleChunk(sha, 10, b"xy", 12, more=True)):
        assert wire.decode_frame_body(wire.encode_frame(msg)[wire.FRAME_HEADER.size:]) == msg


@pytest.mark.parametrize("through", [-1, wire.MAX_OFFSET + 1])
def test_a_through_out_of_range_is_refused(through: int) -> None:
    with pytest.raises(wire.DecodeError):
        _old(wire.FetchBundle, ["c" * 64, 0, 100, "j", "", through])
    with pytest.raises(wire.DecodeError):
        _old(wire.FetchResults, ["j", "c" * 64, 0, 100, "", through])


async def test_tries_that_bring_bytes_start_the_count_of_failures_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An outage runs the count of failed tries past ``retries`` (within the patience);
    once the origin serves again, tries that end well, bringing bytes, start the count
    again, so one failure later is retried rather than the end of the fetch."""
    monkeypatch.setattr(bundlefetch, "STREAM_AGAIN", 2 * STEP)
    path, want, partial, dest = _bundle(tmp_path, 30_000)
    origin = Origin(path, partial, behind=True)  # a stream: one chunk, then calls
    opened = 0
    failing = {1, 2, 3, 4, 5, 8}  # stream opens that fail: five at first, one later

    @contextlib.asynccontextmanager
    async def flaky(msg: wire.Message) -> AsyncIterator[bundlefetch.Receive]:
        nonlocal opened
        opened += 1
        if opened in failing:
            async def refused() -> tuple[wire.Message | None, str]:
                return None, "connection refused"

            yield refused
            return
        async with origin.open(msg) as receive:
            yield receive

    got = await fetch(origin.call, want, partial, dest, chunk=STEP, retries=2, pause=0,
                      opener=flaky, patience=lambda: 3600.0 if opened <= 5 else 0.0)
    assert dest.read_bytes() == path.read_bytes()
    assert got.retries == 6 and opened > 8
