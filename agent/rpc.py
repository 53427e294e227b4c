"""Agent-to-agent calls over TCP: one length-prefixed msgpack frame each way.

A call opens a connection, writes one request frame and reads one reply frame, all under
one deadline. A peer that sends something that is not a frame of this protocol is
disconnected (``RemoteError``); it cannot crash or stall the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from flexmesh.protocol import wire

READ_TIMEOUT = 30.0  # an idle inbound connection is closed after this long


class CallError(Exception):
    """A call failed: unreachable, timed out, or the reply was not understood."""


class RemoteError(Exception):
    """The peer sent bytes that are not a valid frame."""


async def read_frame(reader: asyncio.StreamReader) -> wire.Message:
    try:
        header = await reader.readexactly(wire.FRAME_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EOFError from None
        raise RemoteError("connection closed inside a frame header") from None
    try:
        n = wire.frame_length(header)
        body = await reader.readexactly(n)
        return wire.decode_frame_body(body)
    except asyncio.IncompleteReadError:
        raise RemoteError("connection closed inside a frame") from None
    except wire.DecodeError as exc:
        raise RemoteError(str(exc)) from None


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def call(addr: str, msg: wire.Message, timeout: float) -> wire.Message:
    async def run() -> wire.Message:
        host, port = _split(addr)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(wire.encode_frame(msg))
            await writer.drain()
            return await read_frame(reader)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    try:
        return await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise CallError(f"call to {addr} timed out after {timeout:g}s") from None
    except (OSError, EOFError, ValueError) as exc:
        raise CallError(f"call to {addr} failed: {exc or type(exc).__name__}") from None
    except RemoteError as exc:
        raise CallError(f"bad reply from {addr}: {exc}") from None


Handler = Callable[[wire.Message], Awaitable[wire.Message]]


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           handler: Handler) -> None:
    """Answer requests on one inbound connection until the peer closes it."""
    try:
        while True:
            try:
                msg = await asyncio.wait_for(read_frame(reader), READ_TIMEOUT)
            except (EOFError, TimeoutError, ConnectionError):
                return
            reply = await handler(msg)
            writer.write(wire.encode_frame(reply))
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
