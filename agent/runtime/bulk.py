"""Bulk transfers on narrow links: compressed where that saves, and paced to a share.

Bulk is what a reply of ``compress.BULK`` carries: bundle chunks (and, built the same way,
result chunks) and job output. This agent sends it at most at ``[network] bulk_rate``
(all bulk replies together, through one token bucket on the loop's clock), in slices of a
few tens of milliseconds of that rate, so the link's queue never holds more than a slice
of bulk ahead of a gossip datagram or a small call: those are never paced. A served chunk
is also kept small enough to go out at that rate well within the caller's timeout.

Compression (``protocol/compress.py``) is applied to a reply before it is sealed, for a
caller that asked for it, and undone on a reply before the node or a fetch sees it; a
reply that does not inflate within what was asked for is dropped and counted, and the
call fails as one that got a malformed reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol

from flexmesh.agent.node.follow import SYNC_CHUNK
from flexmesh.protocol import compress, wire

log = logging.getLogger("flexmesh.agent")

SLICE_SECONDS = 0.02  # of the rate written at a time: what a gossip packet may wait behind
MIN_SLICE = 1400  # bytes: at least one packet's worth per write
MAX_SLICE = 64 * 1024
CHUNK_SECONDS = 2.0  # a served chunk goes out at the rate in at most about this long
MIN_CHUNK = 16 * 1024  # bytes: a chunk is never cut below this (very low rates)
OFF_LOOP = 64 * 1024  # bytes: compressing or inflating more than this runs on a thread
MAX_SKIP = 15  # a stream's replies sent untried after some that did not compress
MAX_STREAMS = 4  # streams served at once; a caller beyond gets one chunk per call


class TokenBucket:
    """At most ``rate`` bytes per second on average, in bursts of at most ``burst``
    bytes; ``rate`` 0: no limit. ``reserve`` takes the bytes at once (the bucket may go
    into debt) and says how long to wait before sending them, so concurrent senders are
    served in the order they asked and together never exceed the rate."""

    def __init__(self, rate: int, clock: Callable[[], float], burst: int = 0) -> None:
        self.clock = clock
        self.rate = 0
        self.burst = 0
        self.tokens = 0.0
        self.stamp = clock()
        self.set_rate(rate, burst)

    def set_rate(self, rate: int, burst: int = 0) -> None:
        self._refill()
        unlimited = self.rate == 0
        self.rate = max(rate, 0)
        self.burst = burst or slice_size(self.rate)
        # From no limit, a full bucket; else what was left (a debt stays owed).
        self.tokens = float(self.burst) if unlimited else min(self.tokens, float(self.burst))

    def _refill(self) -> None:
        now = self.clock()
        if self.rate:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes; the seconds to wait before sending them (0: at once)."""
        if self.rate <= 0:
            return 0.0
        self._refill()
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def slice_size(rate: int) -> int:
    """Bytes written at a time at ``rate`` (a whole frame where there is no limit)."""
    if rate <= 0:
        return MAX_SLICE
    return max(MIN_SLICE, min(MAX_SLICE, int(rate * SLICE_SECONDS)))


class Writer(Protocol):
    def write(self, data: bytes | bytearray) -> None: ...

    def drain(self) -> Awaitable[None]: ...


async def paced_write(writer: Writer, frame: bytes | bytearray, bucket: TokenBucket,
                      sleep: Callable[[float], Awaitable[None]]) -> float:
    """Write ``frame`` a slice at a time as ``bucket`` allows; the seconds waited."""
    view = memoryview(frame)
    step = slice_size(bucket.rate)
    waited = 0.0
    for start in range(0, len(frame), step):
        piece = view[start:start + step]
        delay = bucket.reserve(len(piece))
        if delay > 0:
            waited += delay
            await sleep(delay)
        writer.write(bytes(piece))
        await writer.drain()
    return waited


def inflate_limit(request: wire.Message) -> int:
    """The most bytes one bulk field of the reply to ``request`` may inflate to: the chunk
    asked for (a request with a ``length``), the output an answer carries, else a frame."""
    if isinstance(request, wire.JobSync):
        return SYNC_CHUNK
    length = getattr(request, "length", None)
    return length if isinstance(length, int) and length >= 0 else wire.MAX_FRAME


class Bulk:
    """One agent's bulk traffic: ``rate`` and ``compressing`` are read at each use (a
    reload applies at once); ``count`` adds to the agent's counters."""

    def __init__(self, rate: Callable[[], int], compressing: Callable[[], bool],
                 count: Callable[[str, int], None], clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rate = rate
        self.compressing = compressing
        self.count = count
        self.sleep = sleep
        self.bucket = TokenBucket(rate(), clock)
        self.streams = 0  # streams being served

    def chunk_cap(self, seconds: float = CHUNK_SECONDS) -> int:
        """The most bytes one bulk reply should carry (0: no cap beyond the asker's)."""
        rate = self.rate()
        return 0 if rate <= 0 else max(MIN_CHUNK, int(rate * seconds))

    def offer(self, request: wire.Message) -> wire.Message:
        return compress.offer(request) if self.compressing() else request

    async def answer(self, request: wire.Message, reply: wire.Message) -> wire.Message:
        """``reply``, compressed for ``request``'s caller where that saves."""
        if not (compress.is_bulk(reply) and compress.accepts(request) and self.compressing()):
            return reply
        raw = compress.raw_size(reply)
        if raw > OFF_LOOP:
            packed = await asyncio.to_thread(compress.deflate_reply, reply)
        else:
            packed = compress.deflate_reply(reply)
        self.count("bulk_raw_bytes", raw)
        self.count("bulk_packed_bytes", compress.raw_size(packed))
        return packed

    async def answers(self, request: wire.Message,
                      replies: AsyncGenerator[wire.Message, None],
                      ) -> AsyncGenerator[wire.Message, None]:
        """A stream's ``replies`` (counted by ``reserve_stream``; the count is given back
        when it ends), each compressed as ``answer`` would. After a reply that
        did not compress, the next 1, then 3, 7, ... (at most ``MAX_SKIP``) go as they are
        untried: a stream of incompressible chunks pays the sample of one in 16."""
        skip = misses = 0
        try:
            async for reply in replies:
                if skip:
                    skip -= 1
                    yield reply
                    continue
                packed = await self.answer(request, reply)
                misses = misses + 1 if packed is reply else 0
                skip = min(2 ** misses - 1, MAX_SKIP)
                yield packed
        finally:
            self.streams = max(0, self.streams - 1)  # (one not reserved must not go below)
            await replies.aclose()

    def reserve_stream(self, length: int) -> bool:
        """Whether one more stream of chunks of ``length`` bytes may be served, and if so
        it is counted until ``answers`` for it ends (the caller hands it over at once,
        with no await between). No: a chunk per call instead, for a caller over
        ``MAX_STREAMS`` (each stream holds a few megabytes going out) or one asking for
        chunks under ``MIN_CHUNK`` (a frame per few bytes would be all CPU)."""
        if self.streams >= MAX_STREAMS or length < MIN_CHUNK:
            return False
        self.streams += 1
        return True

    async def inflate(self, request: wire.Message,
                      reply: wire.Message) -> tuple[wire.Message | None, str]:
        """``reply`` as it was before compression, or (None, why) for one that does not
        inflate within what ``request`` asked for (dropped and counted)."""
        if not compress.is_bulk(reply) or not getattr(reply, "encoding", ""):
            return reply, ""
        limit = inflate_limit(request)
        try:
            if compress.raw_size(reply) > OFF_LOOP // 8:
                return await asyncio.to_thread(compress.inflate_reply, reply, limit), ""
            return compress.inflate_reply(reply, limit), ""
        except compress.InflateError as exc:
            self.count(f"bulk_dropped_{exc.reason}", 1)
            return None, f"bad reply: {exc}"

    async def send(self, writer: Writer, reply: wire.Message, frame: bytes | bytearray) -> None:
        """Write a reply's frame: bulk at the rate, anything else at once. A bulk reply
        of one slice or less (an answer about a job's state, a few lines of output) goes
        at once too, but its bytes count against the rate."""
        rate = self.rate()
        if rate != self.bucket.rate:
            self.bucket.set_rate(rate)
        if not compress.is_bulk(reply) or rate <= 0 or len(frame) <= slice_size(rate):
            if compress.is_bulk(reply):
                self.bucket.reserve(len(frame))  # at once (a job's state), but it counts
            writer.write(frame)
            await writer.drain()
            return
        waited = await paced_write(writer, frame, self.bucket, self.sleep)
        self.count("bulk_paced_bytes", len(frame))
        self.count("bulk_paced_ms", int(waited * 1000))
