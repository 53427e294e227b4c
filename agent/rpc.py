"""Agent-to-agent calls over TCP: one length-prefixed msgpack frame each way.

A call opens a connection, writes one request frame and reads one reply frame, all under
one deadline. A peer that sends something that is not a frame of this protocol is
disconnected (``RemoteError``); it cannot crash or stall the agent.

What a peer can make this agent hold before it has proven anything is bounded by
``Limits``. The first frame on a connection may announce at most ``wire.FIRST_FRAME``
bytes; a caller with a larger request sends a small ``Hello`` first (unanswered), and
only a first frame that decoded (and opened, with a key) lets frames up to
``wire.MAX_FRAME`` follow. Every frame body is read into one buffer of its announced size,
reserved beforehand from a ``Budget`` that all inbound connections share. Connections are
capped in all and per peer address, and a first header, a body and the wait between frames
each have a deadline. A connection over a limit is closed at once and counted
(``LimitError``), never left waiting for room. Requests are sealed for their receiver
(``Codec``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from flexmesh.agent.rpcbudget import Budget
from flexmesh.agent.rpccodec import PLAIN as PLAIN
from flexmesh.agent.rpccodec import UNBOUND_OK as UNBOUND_OK
from flexmesh.agent.rpccodec import Codec as Codec
from flexmesh.agent.rpccodec import RemoteError as RemoteError
from flexmesh.protocol import compress, wire

log = logging.getLogger("flexmesh.agent")

READ_TIMEOUT = 30.0  # an idle inbound connection is closed after this long
CHUNK = 64 * 1024  # bytes taken from the stream at a time while a body is read
TRIM_AFTER = 1024 * 1024  # bytes of bodies read before memory is handed back (Server)
DROP_LOG_EVERY = 10.0  # seconds between log lines about connections dropped for garbage
STREAM_AHEAD = 2 * 1024 * 1024  # bytes of a stream's replies that may wait to go out




@dataclass(frozen=True)
class Limits:
    """What inbound connections may make this agent hold, and for how long."""

    first_frame: int = wire.FIRST_FRAME  # bytes a connection's first frame may announce
    budget: int = 64 * 1024 * 1024  # bytes of bodies being read, all connections together
    max_connections: int = 512  # inbound connections open at once
    max_per_ip: int = 128  # ... from one peer address
    header_timeout: float = 10.0  # seconds from accept to the first frame's header
    body_timeout: float = 10.0  # seconds for a body, plus its size at body_rate
    body_rate: int = 64 * 1024  # bytes/s: the slowest link an honest peer may be on
    idle_timeout: float = READ_TIMEOUT  # seconds between frames
    # Bytes of a stream's replies that may wait to go out (sealed: each must reach its
    # caller well within the replay window, so the runtime sizes it to the bulk rate).
    stream_ahead: int = STREAM_AHEAD

    def body_deadline(self, n: int) -> float:
        return self.body_timeout + n / self.body_rate


DEFAULT_LIMITS = Limits()


class CallError(Exception):
    """A call failed: unreachable, timed out, or the reply was not understood."""


class LimitError(Exception):
    """An inbound connection went over a limit and is closed; ``counter`` is its count."""

    def __init__(self, counter: str, message: str) -> None:
        super().__init__(message)
        self.counter = counter


# --- reading frames ------------------------------------------------------------------------


async def _read_header(reader: asyncio.StreamReader) -> int | None:
    """The body length a frame header announces; None if the peer closed before one."""
    try:
        header = await reader.readexactly(wire.FRAME_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise RemoteError("connection closed inside a frame header") from None
    try:
        return wire.frame_length(header)
    except wire.DecodeError as exc:
        raise RemoteError(str(exc)) from None


async def _read_into(reader: asyncio.StreamReader, buf: bytearray) -> None:
    """Fill ``buf`` from the stream, a chunk at a time: nothing else grows with the frame."""
    view = memoryview(buf)
    pos = 0
    while pos < len(buf):
        chunk = await reader.read(min(len(buf) - pos, CHUNK))
        if not chunk:
            raise RemoteError("connection closed inside a frame")
        view[pos:pos + len(chunk)] = chunk
        pos += len(chunk)


async def read_frame(reader: asyncio.StreamReader, codec: Codec = PLAIN) -> wire.Message:
    """One frame, as a caller reads its reply (under the call's own deadline)."""
    n = await _read_header(reader)
    if n is None:
        raise EOFError
    try:
        body = await reader.readexactly(n)  # (one copy out of the stream's buffer)
    except asyncio.IncompleteReadError:
        raise RemoteError("connection closed inside a frame") from None
    return codec.decode(body, request=False)


async def _next_header(reader: asyncio.StreamReader, limits: Limits, first: bool) -> int | None:
    timeout = limits.header_timeout if first else limits.idle_timeout
    try:
        async with asyncio.timeout(timeout):
            n = await _read_header(reader)
    except TimeoutError:
        if first:
            raise LimitError("tcp_header_timeouts",
                             f"no frame header within {timeout:g}s of connecting") from None
        return None  # idle: the peer is done with this connection
    if first and n is not None and n > limits.first_frame:
        raise LimitError("frames_dropped_first_too_large",
                         f"a first frame of {n} bytes (at most {limits.first_frame} "
                         "without a Hello before it)")
    return n


async def _read_body(reader: asyncio.StreamReader, n: int, codec: Codec, limits: Limits,
                     budget: Budget) -> wire.Message:
    """Read and decode a body of ``n`` bytes into a buffer reserved from ``budget``."""
    if not budget.reserve(n):
        raise LimitError("frames_dropped_budget",
                         f"a frame of {n} bytes while {budget.used} of {budget.limit} "
                         "bytes are being read")
    try:
        buf = bytearray(n)
        deadline = limits.body_deadline(n)
        try:
            async with asyncio.timeout(deadline):
                await _read_into(reader, buf)
        except TimeoutError:
            raise LimitError("tcp_body_timeouts",
                             f"a frame of {n} bytes not in within {deadline:g}s") from None
        return codec.decode(buf)
    finally:
        budget.release(n)


# --- calling --------------------------------------------------------------------------------


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def call(addr: str, msg: wire.Message, timeout: float,
               codec: Codec = PLAIN, source: str = "", to: str = "") -> wire.Message:
    """Send ``msg`` to the agent at ``addr`` (named ``to``, where known: the request is
    sealed for it) and return its reply; ``source`` names the caller in the ``Hello`` that
    goes before a request over ``wire.FIRST_FRAME``."""
    async def run() -> wire.Message:
        host, port = split_addr(addr)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            frame = codec.encode(msg, to)
            if len(frame) - wire.FRAME_HEADER.size > wire.FIRST_FRAME:
                writer.write(codec.encode(wire.Hello(source), to))  # unanswered
            writer.write(frame)
            await writer.drain()
            return await read_frame(reader, codec)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    try:
        return await asyncio.wait_for(run(), timeout)
    except (TimeoutError, EOFError, OSError, ValueError, RemoteError) as exc:
        raise failure(addr, exc, timeout) from None


def failure(addr: str, exc: Exception, timeout: float) -> CallError:
    """What a call to ``addr`` that raised ``exc`` failed of, for a person."""
    if isinstance(exc, TimeoutError):
        return CallError(f"call to {addr} timed out after {timeout:g}s")
    if isinstance(exc, EOFError):
        return CallError(f"{addr} closed the connection without answering (a different "
                         "cluster key or name?)")
    if isinstance(exc, RemoteError):
        return CallError(f"bad reply from {addr}: {exc}")
    return CallError(f"call to {addr} failed: {str(exc) or type(exc).__name__}")


# --- answering ------------------------------------------------------------------------------

# A handler's answer: one reply, or a stream of them (each its own frame: rpcstream.py).
Replies = AsyncGenerator[wire.Message, None]
Handler = Callable[[wire.Message], Awaitable[wire.Message | Replies]]
# Writes a reply's frame (the runtime paces bulk replies: runtime/bulk.py).
Send = Callable[[asyncio.StreamWriter, wire.Message, bytes | bytearray], Awaitable[None]]


async def _write(writer: asyncio.StreamWriter, reply: wire.Message,
                 frame: bytes | bytearray) -> None:
    writer.write(frame)
    await writer.drain()


async def _send_all(writer: asyncio.StreamWriter, replies: Replies, codec: Codec,
                    send: Send, limits: Limits, bulk: bool = False) -> None:
    """Each reply of a stream as its own frame, the next made only once the last was
    taken by the socket; a caller that stops taking them is dropped (``LimitError``).
    Up to ``limits.stream_ahead`` bytes may wait in the transport, so the next reply is
    made while the last one is still going out. ``replies`` is started at once (no await
    before: what it holds is let go in its ``finally``) and closed whatever happens."""
    try:
        async for reply in replies:
            writer.transport.set_write_buffer_limits(high=limits.stream_ahead)
            frame = codec.encode(reply, bulk=bulk)
            deadline = limits.idle_timeout + limits.body_deadline(len(frame))
            try:
                async with asyncio.timeout(deadline):
                    await send(writer, reply, frame)
            except TimeoutError:
                # Dropped at once: a close would wait for the caller to take what the
                # transport holds, which it does not (and hold its slot meanwhile).
                writer.transport.abort()
                raise LimitError("tcp_stream_stalls", f"a reply of {len(frame)} bytes not "
                                 f"taken within {deadline:g}s") from None
    finally:
        await replies.aclose()  # (it may hold a file open)


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           handler: Handler, codec: Codec = PLAIN,
                           limits: Limits = DEFAULT_LIMITS, budget: Budget | None = None,
                           send: Send | None = None) -> None:
    """Answer requests on one inbound connection until the peer closes it or goes idle.

    Raises ``RemoteError`` for bytes that are not frames of this protocol and
    ``LimitError`` for a connection over a limit; the caller closes nothing."""
    budget = Budget(limits.budget) if budget is None else budget
    first = True
    try:
        while (n := await _next_header(reader, limits, first)) is not None:
            msg = await _read_body(reader, n, codec, limits, budget)
            if isinstance(msg, wire.Hello):
                if not first:
                    raise RemoteError("a Hello after the first frame")
            else:
                reply = await handler(msg)
                if not isinstance(reply, wire.Message):
                    bulk = compress.accepts(msg, compress.AES)
                    await _send_all(writer, reply, codec, send or _write, limits, bulk)
                else:
                    await (send or _write)(writer, reply, codec.encode(reply))
            first = False
    except ConnectionError:
        return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class Server:
    """Inbound connections under ``limits()``: caps on how many, one budget for the bodies
    being read, every refusal counted by name through ``count``.

    ``codec`` and ``limits`` are read at each connection, so a reload applies to the next
    one. ``trim`` is called when no body is being read and more than ``TRIM_AFTER`` bytes
    were read since it was last called (the runtime hands freed memory back there)."""

    def __init__(self, handler: Handler, codec: Callable[[], Codec],
                 limits: Callable[[], Limits], count: Callable[[str], None],
                 trim: Callable[[], None] = lambda: None,
                 dropped: Callable[[RemoteError, str], None] = lambda exc, ip: None,
                 send: Send | None = None) -> None:
        self.handler = handler
        self.send = send  # writes each reply (None: at once)
        self.dropped = dropped  # told of every connection dropped for garbage (and from where)
        self.codec = codec
        self.limits = limits
        self.count = count
        self.trim = trim
        self.budget = Budget(limits().budget)
        self.connections = 0
        self.by_ip: dict[str, int] = {}
        self._trimmed_at = 0  # budget.total when trim was last called
        self._logged_at = -DROP_LOG_EVERY  # when a dropped connection was last logged
        self._unlogged = 0  # dropped connections not logged since

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The ``asyncio.start_server`` callback: one inbound connection, start to end."""
        limits = self.limits()
        self.budget.limit = limits.budget
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        refused = self._admit(ip, limits)
        if refused is not None:
            self.count(refused)
            writer.close()
            return
        try:
            await serve_connection(reader, writer, self.handler, self.codec(), limits,
                                   self.budget, self.send)
        except LimitError as exc:
            self.count(exc.counter)
            log.debug("closed a connection from %s: %s", ip, exc)
        except RemoteError as exc:
            self.count("peers_disconnected_garbage")
            self.count(f"frames_dropped_{exc.reason}")
            self.dropped(exc, ip)
            self._log_dropped(ip, exc)
        except asyncio.CancelledError:
            # The agent stops while a call waits (a JobSync long poll): the connection ends
            # here. Not re-raised: Python 3.11's stream callback would log a cancelled
            # handler as an error ("Exception in callback ... connection_made").
            writer.close()
        finally:
            self._leave(ip)

    def _log_dropped(self, ip: str, exc: RemoteError) -> None:
        """One line per ``DROP_LOG_EVERY`` seconds at most (the counters have them all):
        whoever can reach the port must not be able to flood the log."""
        now = time.monotonic()
        if now - self._logged_at < DROP_LOG_EVERY:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last such line)" if self._unlogged else ""
        log.info("dropped a peer connection from %s: %s%s", ip, exc, more)
        self._logged_at, self._unlogged = now, 0

    def _admit(self, ip: str, limits: Limits) -> str | None:
        """None if the connection may go on, else the name of the count it adds to."""
        if self.connections >= limits.max_connections:
            return "tcp_refused_busy"
        if self.by_ip.get(ip, 0) >= limits.max_per_ip:
            return "tcp_refused_per_ip"
        self.connections += 1
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        return None

    def _leave(self, ip: str) -> None:
        self.connections -= 1
        left = self.by_ip[ip] - 1
        if left:
            self.by_ip[ip] = left
        else:
            del self.by_ip[ip]
        if self.budget.used == 0 and self.budget.total - self._trimmed_at > TRIM_AFTER:
            self._trimmed_at = self.budget.total
            self.trim()
