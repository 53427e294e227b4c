"""An owner fetching a bundle from a job's origin: chunk by chunk, to a file, resumable.

Where the answerer can (``opener`` given, and it streams), one call brings the whole:
a ``FetchBundle`` with ``through`` is answered by consecutive chunks on one connection,
each written (and hashed) on a thread while the next one comes. Otherwise (a peer one
version behind, which answers one chunk without ``more``) ``FetchBundle`` calls ask for
consecutive chunks from what the partial file already holds, ``DEPTH`` of them in flight
at once and their replies written in order. Either way a dropped connection (or an agent
restarted half-way) costs only the chunks in flight, neither side holds more than a few
chunks of the bundle in memory, and the next try starts from what the partial file holds.
The whole is checked against its SHA-256 before it takes its place in the store; a
mismatch deletes what came. A try that brings nothing is retried with a growing pause, a
few times in a row and for at least ``patience`` seconds without a byte (a radio shadow
should not fail a job), then the fetch fails: it never waits forever. The caller gives ``call``
(one request, one reply or None and why), ``opener`` (a stream: its replies one by one,
likewise) and ``alive`` (whether the job still wants the bundle).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flexmesh.protocol import wire

CHUNK = 1 << 20  # bytes asked for per call: far below wire.MAX_FRAME
RETRIES = 5  # failed calls in a row before the fetch gives up (and ``patience`` has run)
PAUSE = 0.2  # seconds before the first retry; doubled for each one after ...
MAX_PAUSE = 5.0  # ... up to this
AHEAD = 4  # chunks of a stream that may wait to be written and hashed
STREAM_AGAIN = 32 * CHUNK  # bytes fetched a call per chunk before a stream is asked again
DEPTH = 4  # calls in flight at once: the origin reads and seals the next chunks while this
# node opens, hashes and writes one (a single call at a time left both sides mostly waiting)

Caller = Callable[[wire.Message], Awaitable[tuple[wire.Message | None, str]]]


class FetchError(Exception):
    """The bundle could not be fetched; the message says why, for a person. ``refused``:
    the other side answered that it will not serve it (asking again cannot help);
    ``stopped``: the caller's ``alive()`` said the bundle is no longer wanted."""

    def __init__(self, message: str, refused: bool = False, stopped: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.stopped = stopped


@dataclass(slots=True)
class Fetched:
    bytes: int = 0  # bytes that came over the network (a resumed fetch: only the rest)
    chunks: int = 0  # chunks that came (in streams or a call each)
    retries: int = 0
    resumed_at: int = 0  # bytes the partial file held when this fetch began


@dataclass(frozen=True, slots=True)
class Want:
    sha: str
    size: int
    job_id: str = ""
    peer: str = "origin"  # who serves it, as the errors name it


Asker = Callable[[int, int], wire.Message]  # (offset, length) -> the request for them
Receive = Callable[[], Awaitable[tuple[wire.Message | None, str]]]  # a stream's next reply
Opener = Callable[[wire.Message], AbstractAsyncContextManager[Receive]]  # a stream, open
Retrying = Callable[[int, str, float], None]  # (at byte, why the try failed, pause before next)


async def fetch(call: Caller, want: Want, partial: Path, dest: Path,
                alive: Callable[[], bool] = lambda: True, chunk: int = CHUNK,
                retries: int = RETRIES, pause: float = PAUSE, depth: int = DEPTH,
                ask: Asker | None = None, opener: Opener | None = None,
                patience: float | Callable[[], float] = 0.0,
                retrying: Retrying | None = None) -> Fetched:
    """Bring bundle ``want`` to ``dest`` through ``partial``; FetchError if it cannot.
    ``ask`` makes each request (default: a ``FetchBundle`` of ``want``); the answers are
    ``BundleChunk``s of ``want.sha``. With ``opener``, a stream is tried first; else (or
    from an answerer that does not stream) up to ``depth`` requests are in flight at once.
    Tries that bring nothing are retried until there were more than ``retries`` in a row
    and ``patience`` seconds (or what it returns, asked each time) passed since the first
    of them; ``retrying`` hears of each. Cancelling the fetch leaves the partial file, to
    be taken up again."""
    ask = ask or (lambda offset, length: wire.FetchBundle(want.sha, offset, length,
                                                          want.job_id))
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        return await _fetch(call, want, partial, dest, alive, chunk,
                            _Retries(retries, pause, patience, retrying), depth, ask, opener)
    except OSError:  # (a full disk, say: what came must not stay to fill it)
        partial.unlink(missing_ok=True)
        raise


async def _fetch(call: Caller, want: Want, partial: Path, dest: Path,
                 alive: Callable[[], bool], chunk: int, retries: _Retries,
                 depth: int, ask: Asker, opener: Opener | None) -> Fetched:
    h, have = await asyncio.to_thread(_resume, partial, want.size)
    stats = Fetched(resumed_at=have)
    streams = opener is not None  # (until the answerer shows it does not, for a while)
    with open(partial, "ab") as f:
        sink = _Sink(f, h, have, stats)
        try:
            while sink.have < want.size:
                start = sink.have
                if opener is not None and streams:
                    error, streams = await _by_stream(opener, ask, want, sink, chunk, alive)
                else:  # (an answerer at its cap of streams is asked for one again later)
                    until = want.size if opener is None else sink.have + STREAM_AGAIN
                    window = _Window(call, ask, min(until, want.size), chunk, depth)
                    error = await _by_calls(window, want, sink, alive)
                    chunk, streams = window.chunk, opener is not None  # (a cap: kept)
                await sink.written()
                if error is None:
                    if sink.have > start:
                        retries.progressed()
                    continue
                stats.retries += 1
                await retries.after(error, sink.have > start, sink.have, want.size, alive)
        finally:
            await sink.written(quiet=True)  # (no thread writes to the file once it closes)
            sink.close()
    if h.hexdigest() != want.sha:
        partial.unlink(missing_ok=True)
        raise FetchError(f"the bundle that came does not match its SHA-256 {want.sha}")
    os.replace(partial, dest)
    return stats


class _Retries:
    """When a fetch tries again, and when it gives up (``after`` raises FetchError)."""

    def __init__(self, retries: int, pause: float, patience: float | Callable[[], float],
                 retrying: Retrying | None) -> None:
        self.retries, self.pause, self.patience = retries, pause, patience
        self.retrying = retrying
        self.failures = 0  # tries in a row that brought nothing
        self.since = 0.0  # (loop time) when the first of them ended

    def progressed(self) -> None:
        """A try brought bytes and ended well: the count starts again."""
        self.failures = 0

    async def after(self, error: str, progressed: bool, have: int, size: int,
                    alive: Callable[[], bool]) -> None:
        """A try failed with ``error`` (having brought bytes, or not): pause, or give up."""
        if not alive():
            raise FetchError("the job stopped while its bundle was fetched", stopped=True)
        now = asyncio.get_running_loop().time()
        if progressed or not self.failures:
            self.since = now
        self.failures = 1 if progressed else self.failures + 1
        patience = self.patience() if callable(self.patience) else self.patience
        if self.failures > self.retries and now - self.since >= patience:
            raise FetchError(f"gave up after {self.failures - 1} retries in "
                             f"{now - self.since:.1f} s at byte {have} of {size}: {error}")
        pause = min(self.pause * 2 ** min(self.failures - 1, 16), MAX_PAUSE)
        if self.retrying is not None:
            self.retrying(have, error, pause)
        await asyncio.sleep(pause)
        if not alive():
            raise FetchError("the job stopped while its bundle was fetched", stopped=True)


class _Sink:
    """The partial file and the hash of what it holds. Each chunk is written on one
    thread and hashed on another, in order, while the next ones come; up to ``AHEAD``
    chunks may wait for them (so a slow write does not stop the stream at once, and
    memory stays bounded). ``have`` counts a chunk as soon as it is handed over. Once a
    write fails, the chunks behind it are not written (the partial stays a prefix)."""

    def __init__(self, f: IO[bytes], h: hashlib._Hash, have: int, stats: Fetched) -> None:
        self.f, self.h, self.have, self.stats = f, h, have, stats
        self.pending: collections.deque[asyncio.Future[None]] = collections.deque()
        self.writer = ThreadPoolExecutor(1, "fetch-write")
        self.hasher = ThreadPoolExecutor(1, "fetch-hash")
        self.failed = False

    async def add(self, data: bytes) -> None:
        while len(self.pending) >= 2 * AHEAD:
            await self._oldest()
        loop = asyncio.get_running_loop()  # (on their threads at once, not at the next await)
        self.pending.append(loop.run_in_executor(self.writer, self._write, data))
        self.pending.append(loop.run_in_executor(self.hasher, self.h.update, data))
        self.have += len(data)
        self.stats.bytes += len(data)
        self.stats.chunks += 1

    def _write(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            self.f.write(data)
            self.f.flush()
        except BaseException:
            self.failed = True
            raise

    async def _oldest(self) -> None:
        oldest = self.pending.popleft()
        await asyncio.wait([oldest])  # (a cancel here must not cancel a queued write:
        oldest.result()  # the ones behind it would leave a gap in the partial file)

    async def written(self, quiet: bool = False) -> None:
        """Wait for the chunks being written (the first OSError raised, unless
        ``quiet``)."""
        pending, self.pending = list(self.pending), collections.deque()
        if pending:
            await asyncio.wait(pending)
        for future in pending:
            error = None if future.cancelled() else future.exception()
            if error is not None and not quiet:
                raise error

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        self.hasher.shutdown(wait=True)


async def _by_stream(opener: Opener, ask: Asker, want: Want, sink: _Sink, chunk: int,
                     alive: Callable[[], bool]) -> tuple[str | None, bool]:
    """Take the rest of the bundle from one stream: (None, or why it broke off; whether
    the answerer streams)."""
    request = dataclasses.replace(ask(sink.have, chunk),  # type: ignore[type-var]
                                  through=want.size)
    async with opener(request) as receive:
        while sink.have < want.size:
            if not alive():
                raise FetchError("the job stopped while its bundle was fetched", stopped=True)
            reply, error = await receive()
            data = _chunk(reply, sink.have, chunk, want)
            if data is None:
                return error or f"an unexpected {type(reply).__name__} at byte {sink.have}", True
            await sink.add(data)
            if sink.have < want.size and not getattr(reply, "more", False):
                return None, False  # (one version behind: chunk by chunk from here)
    return None, True


async def _by_calls(window: _Window, want: Want, sink: _Sink,
                    alive: Callable[[], bool]) -> str | None:
    """Take the bundle up to ``window.size`` a call per chunk: None, or why a call
    failed."""
    try:
        while sink.have < window.size:
            if not alive():
                raise FetchError("the job stopped while its bundle was fetched", stopped=True)
            (offset, length), reply, error = await window.next(sink.have)
            data = _chunk(reply, offset, length, want)
            if data is None:
                return str(error or reply)
            if len(data) != length:  # the server's cap (its bulk_rate): ask that much
                window.chunk = len(data)  # from now on, so the window stays in line
                window.drop()  # (what is in flight asks from the wrong offsets)
            await sink.add(data)
    finally:
        window.drop()
    return None


Reply = tuple[wire.Message | None, str]
Span = tuple[int, int]  # (offset, length) of an ask


class _Window:
    """The calls in flight: up to ``depth`` consecutive chunks asked for at once, their
    replies taken in order."""

    def __init__(self, call: Caller, ask: Asker, size: int, chunk: int, depth: int) -> None:
        self.call, self.ask, self.size = call, ask, size
        self.chunk, self.depth = chunk, max(1, depth)
        self.asks: collections.deque[tuple[Span, asyncio.Task[Reply]]] = collections.deque()
        self.end = 0  # where the next ask starts

    async def next(self, have: int) -> tuple[Span, wire.Message | None, str]:
        """The reply to the ask for the bytes from ``have`` (asked now if it is not in
        flight), the window topped up behind it."""
        if not self.asks:
            self.end = have
        while len(self.asks) < self.depth and self.end < self.size:
            length = min(self.chunk, self.size - self.end)
            task = asyncio.ensure_future(self.call(self.ask(self.end, length)))
            self.asks.append(((self.end, length), task))
            self.end += length
        span, task = self.asks.popleft()
        reply, error = await task
        return span, reply, error

    def drop(self) -> None:
        """Forget what is in flight (cancelled; its replies are not waited for)."""
        while self.asks:
            self.asks.popleft()[1].cancel()


def _chunk(reply: wire.Message | None, offset: int, length: int, want: Want) -> bytes | None:
    """The bytes a reply brings, None if it brings none (to retry); FetchError where
    retrying cannot help."""
    if isinstance(reply, wire.Error):
        raise FetchError(f"the {want.peer} refused: {reply.reason}", refused=True)
    if not isinstance(reply, wire.BundleChunk):
        return None
    if reply.bundle != want.sha or reply.total != want.size:
        raise FetchError(f"the {want.peer} holds {reply.total} bytes of {reply.bundle[:16]}, "
                         f"not {want.size} of {want.sha[:16]}", refused=True)
    if reply.offset != offset or not 0 < len(reply.data) <= length:
        return None
    return reply.data


def _resume(partial: Path, size: int) -> tuple[hashlib._Hash, int]:
    """The hash of what a partial file already holds, and its length (a partial longer
    than the bundle is garbage and starts over)."""
    h = hashlib.sha256()
    have = 0
    if partial.exists() and partial.stat().st_size <= size:
        os.utime(partial)  # (in use again: not one to drop as stale)
        with open(partial, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
                have += len(block)
    else:
        partial.unlink(missing_ok=True)
    return h, have


def read_chunk(path: Path, offset: int, length: int) -> tuple[bytes, int]:
    """The origin's side: at most ``length`` bytes (and at most ``CHUNK``) of ``path``
    from ``offset``, and the file's size."""
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        f.seek(min(offset, total))
        return f.read(min(length, CHUNK)), total


async def chunks(f: IO[bytes], name: str, offset: int, through: int, length: int,
                 served: Callable[[], None] = lambda: None,
                 ) -> AsyncGenerator[wire.Message, None]:
    """The answering side of a stream: ``BundleChunk``s of ``name`` from open file ``f``,
    from ``offset`` up to ``through`` (or its end), each at most ``length`` (and ``CHUNK``)
    bytes, each but the last with ``more``; the next is read on a thread while the last
    goes out. A read that fails ends the stream with an ``Error``. Closes ``f``."""
    ahead: asyncio.Future[bytes] | None = None
    try:
        total = os.fstat(f.fileno()).st_size
        end, step = min(through, total), max(1, min(length, CHUNK))
        pos = min(offset, end)
        ahead = _read_ahead(f, pos, min(step, end - pos))
        while ahead is not None:
            try:
                data = await ahead
            except OSError as exc:
                ahead = None
                yield wire.Error(f"cannot read {name}: {exc.strerror or exc}")
                return
            after = pos + len(data)
            more = bool(data) and after < end
            ahead = _read_ahead(f, after, min(step, end - after)) if more else None
            served()
            yield wire.BundleChunk(name, pos, data, total, more=more)
            pos = after
    finally:
        if ahead is not None and not ahead.done():  # a thread still reads from the file:
            ahead.add_done_callback(lambda done: _close(f, done))  # closed once it is done
        else:
            f.close()


def _read_ahead(f: IO[bytes], pos: int, n: int) -> asyncio.Future[bytes]:
    """A read started on a thread now (a task would start it only at the next await)."""
    return asyncio.get_running_loop().run_in_executor(None, os.pread, f.fileno(), n, pos)


def _close(f: IO[bytes], done: asyncio.Future[bytes]) -> None:
    if not done.cancelled():
        done.exception()  # (retrieved: nobody reads it any more)
    f.close()
