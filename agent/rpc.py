"""Agent-to-agent calls over TCP: one length-prefixed msgpack frame each way.

A call opens a connection, writes one request frame and reads one reply frame, all under
one deadline. A peer that sends something that is not a frame of this protocol is
disconnected (``RemoteError``); it cannot crash or stall the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from flexmesh.protocol import wire
from flexmesh.protocol.crypto import CryptoError, Sealer

READ_TIMEOUT = 30.0  # an idle inbound connection is closed after this long


class Codec:
    """Frames on the wire, sealed under the cluster keyring when there is one."""

    def __init__(self, sealer: Sealer | None = None, cluster: bytes = b"",
                 now: Callable[[], float] = time.time) -> None:
        self.sealer = sealer
        self.cluster = cluster
        self.now = now

    def encode(self, msg: wire.Message) -> bytes:
        body = wire.encode_frame(msg)[wire.FRAME_HEADER.size:]
        if self.sealer is not None:
            body = self.sealer.seal(body, self.cluster, self.now())
        return wire.FRAME_HEADER.pack(len(body)) + body

    def decode(self, body: bytes) -> wire.Message:
        if self.sealer is not None:
            try:
                body = self.sealer.open(body, self.cluster, self.now())
            except CryptoError as exc:
                raise RemoteError(f"frame dropped: {exc.reason}", exc.reason) from None
        elif body[:1] != bytes([wire.PROTOCOL_VERSION]):
            raise RemoteError("a sealed frame, and this agent has no key", "no_key")
        try:
            return wire.decode_frame_body(body)
        except wire.DecodeError as exc:
            raise RemoteError(str(exc), "malformed") from None


PLAIN = Codec()


class CallError(Exception):
    """A call failed: unreachable, timed out, or the reply was not understood."""


class RemoteError(Exception):
    """The peer sent bytes that are not a valid frame; ``reason`` is for counters."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


async def read_frame(reader: asyncio.StreamReader, codec: Codec = PLAIN) -> wire.Message:
    try:
        header = await reader.readexactly(wire.FRAME_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EOFError from None
        raise RemoteError("connection closed inside a frame header") from None
    try:
        n = wire.frame_length(header)
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise RemoteError("connection closed inside a frame") from None
    except wire.DecodeError as exc:
        raise RemoteError(str(exc)) from None
    return codec.decode(body)


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def call(addr: str, msg: wire.Message, timeout: float,
               codec: Codec = PLAIN) -> wire.Message:
    async def run() -> wire.Message:
        host, port = _split(addr)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(codec.encode(msg))
            await writer.drain()
            return await read_frame(reader, codec)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    try:
        return await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise CallError(f"call to {addr} timed out after {timeout:g}s") from None
    except EOFError:
        raise CallError(f"{addr} closed the connection without answering (a different "
                        "cluster key or name?)") from None
    except (OSError, ValueError) as exc:
        raise CallError(f"call to {addr} failed: {str(exc) or type(exc).__name__}") from None
    except RemoteError as exc:
        raise CallError(f"bad reply from {addr}: {exc}") from None


Handler = Callable[[wire.Message], Awaitable[wire.Message]]


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           handler: Handler, codec: Codec = PLAIN) -> None:
    """Answer requests on one inbound connection until the peer closes it."""
    try:
        while True:
            try:
                msg = await asyncio.wait_for(read_frame(reader, codec), READ_TIMEOUT)
            except (EOFError, TimeoutError, ConnectionError):
                return
            reply = await handler(msg)
            writer.write(codec.encode(reply))
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
