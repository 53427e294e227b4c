"""The caller's end of a call answered by a stream of frames: one request, then replies
until the caller has what it asked for (bulk transfers: a bundle or a results archive,
chunk after chunk; see ``wire.FetchBundle``).

A chunk per call costs a connection, a request and a round trip for every megabyte and
leaves both sides waiting on each other between chunks; a stream keeps one connection and
lets TCP's flow control pace the answerer, which makes its next frame only once the last
was taken by the socket (``rpc._send_all``). Each frame is received straight into a buffer
of its size (``_Frames``, a buffered protocol: no stream buffer to copy through) and
opened as soon as it is whole; at most ``AHEAD`` opened replies wait for the caller before
reading pauses, and each ``next()`` waits at most the call's timeout. Which reply is the
last is the messages' business, not this module's: the caller leaves the ``stream`` block
when it has what it wanted, and that closes the connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import cast

from flexmesh.agent import rpc
from flexmesh.protocol import wire

AHEAD = 2  # opened replies that may wait for the caller before reading pauses


class _Frames(asyncio.BufferedProtocol):
    """Frames read into one reused buffer and opened (``decode``) as each completes."""

    def __init__(self, decode: Callable[[memoryview], wire.Message]) -> None:
        self.decode = decode
        self.header = bytearray(wire.FRAME_HEADER.size)
        self.body = bytearray()
        self.size = 0  # the body's length; 0 while a header is read
        self.pos = 0  # bytes of the header or body read so far
        self.replies: collections.deque[wire.Message] = collections.deque()
        self.failed: Exception | None = None  # a bad frame, or the connection's error
        self.ended = False  # the answerer closed the connection
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self.size:
            return memoryview(self.header)[self.pos:]
        return memoryview(self.body)[self.pos:self.size]

    def buffer_updated(self, nbytes: int) -> None:
        self.pos += nbytes
        if not self.size:
            if self.pos == len(self.header):
                self._begin_body()
            return
        if self.pos < self.size:
            return
        try:
            reply = self.decode(memoryview(self.body)[:self.size])
        except rpc.RemoteError as exc:
            self._fail(exc)
            return
        self.size = self.pos = 0
        self.replies.append(reply)
        if len(self.replies) >= AHEAD and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def _begin_body(self) -> None:
        try:
            n = wire.frame_length(bytes(self.header))
        except wire.DecodeError as exc:
            self._fail(rpc.RemoteError(str(exc)))
            return
        if len(self.body) < n:
            self.body = bytearray(n)  # (kept for the frames after: they are alike)
        self.size, self.pos = n, 0

    def eof_received(self) -> bool:
        if (self.size or self.pos) and self.failed is None:  # (inside a frame)
            self.failed = rpc.RemoteError("connection closed inside a frame")
        self.ended = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        if exc is not None and self.failed is None:
            self.failed = exc
        self._wake()

    def _fail(self, exc: Exception) -> None:
        self.failed = exc
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> wire.Message:
        """The next reply (``EOFError`` where the answerer ended without one)."""
        while not self.replies:
            if self.failed is not None:
                raise self.failed
            if self.ended:
                raise EOFError
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        reply = self.replies.popleft()
        if self.paused and len(self.replies) < AHEAD and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return reply


class Stream:
    """An open stream: ``next()`` is its next reply."""

    def __init__(self, addr: str, frames: _Frames, timeout: float) -> None:
        self.addr = addr
        self.frames = frames
        self.timeout = timeout

    async def next(self) -> wire.Message:
        """The next reply; ``rpc.CallError`` if none comes within the timeout, the
        answerer closed the connection, or what came is not a frame."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self.frames.take()
        except (TimeoutError, EOFError, OSError, ValueError, rpc.RemoteError) as exc:
            raise rpc.failure(self.addr, exc, self.timeout) from None


@contextlib.asynccontextmanager
async def stream(addr: str, msg: wire.Message, timeout: float, codec: rpc.Codec = rpc.PLAIN,
                 source: str = "", to: str = "") -> AsyncIterator[Stream]:
    """Send ``msg`` to the agent at ``addr`` (named ``to``: sealed for it, where known) and
    take its replies from the ``Stream`` given; the connection closes when the block is
    left. ``rpc.CallError`` if the connection cannot be made within ``timeout``."""
    frames = _Frames(lambda body: codec.decode(body, request=False, bulk=True))
    loop = asyncio.get_running_loop()
    try:
        host, port = rpc.split_addr(addr)
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: frames, host, port)
    except (TimeoutError, OSError, ValueError) as exc:
        raise rpc.failure(addr, exc, timeout) from None
    try:
        frame = codec.encode(msg, to)
        if len(frame) - wire.FRAME_HEADER.size > wire.FIRST_FRAME:
            transport.write(codec.encode(wire.Hello(source), to))  # unanswered
        transport.write(frame)
        yield Stream(addr, frames, timeout)
    finally:
        transport.close()
