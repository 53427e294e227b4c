"""The caller's end of a call answered by a stream of frames: one request, then replies
until the caller has what it asked for (bulk transfers: a bundle or a results archive,
chunk after chunk; see ``wire.FetchBundle``).

A chunk per call costs a connection, a request and a round trip for every megabyte and
leaves both sides waiting on each other between chunks; a stream keeps one connection and
lets TCP's flow control pace the answerer, which makes its next frame only once the last
was taken by the socket (``rpc._send_all``). The caller reads one frame at a time, each
under the call's timeout, and buffers at most ``READ_LIMIT`` bytes ahead of what it took.
Which reply is the last is the messages' business, not this module's: the caller leaves
the ``stream`` block when it has what it wanted, and that closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from flexmesh.agent import rpc
from flexmesh.protocol import wire

# Bytes read ahead of the caller before reading pauses (twice this): the buffer stays
# under the allocator's mmap threshold (runtime/memory.py), so its pages are reused.
READ_LIMIT = 512 * 1024


class Stream:
    """An open stream: ``next()`` is its next reply."""

    def __init__(self, addr: str, reader: asyncio.StreamReader, codec: rpc.Codec,
                 timeout: float) -> None:
        self.addr = addr
        self.reader = reader
        self.codec = codec
        self.timeout = timeout

    async def next(self) -> wire.Message:
        """The next reply; ``rpc.CallError`` if none comes within the timeout, the
        answerer closed the connection, or what came is not a frame."""
        try:
            async with asyncio.timeout(self.timeout):
                return await rpc.read_frame(self.reader, self.codec)
        except (TimeoutError, EOFError, OSError, ValueError, rpc.RemoteError) as exc:
            raise rpc.failure(self.addr, exc, self.timeout) from None


@contextlib.asynccontextmanager
async def stream(addr: str, msg: wire.Message, timeout: float, codec: rpc.Codec = rpc.PLAIN,
                 source: str = "", to: str = "") -> AsyncIterator[Stream]:
    """Send ``msg`` to the agent at ``addr`` (named ``to``: sealed for it, where known) and
    take its replies from the ``Stream`` given; the connection closes when the block is
    left. ``rpc.CallError`` if the request cannot be sent within ``timeout``."""
    try:
        host, port = rpc.split_addr(addr)
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=READ_LIMIT)
    except (TimeoutError, OSError, ValueError) as exc:
        raise rpc.failure(addr, exc, timeout) from None
    try:
        frame = codec.encode(msg, to)
        if len(frame) - wire.FRAME_HEADER.size > wire.FIRST_FRAME:
            writer.write(codec.encode(wire.Hello(source), to))  # unanswered
        writer.write(frame)
        try:
            async with asyncio.timeout(timeout):
                await writer.drain()
        except (TimeoutError, OSError) as exc:
            raise rpc.failure(addr, exc, timeout) from None
        yield Stream(addr, reader, codec, timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
