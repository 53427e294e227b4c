"""The wire of a running agent: gossip over UDP, calls over TCP, both sealed with the
cluster keys. Fault injection (loss, duplication, delay of outgoing datagrams, for tests on
loopback only) is a wrapper around the datagram sender, not part of it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from flexmesh.agent import rpc, rpcstream
from flexmesh.agent.config import Settings
from flexmesh.agent.configcheck import bulk_rate_bytes
from flexmesh.agent.runtime import memory
from flexmesh.agent.runtime.bulk import Bulk
from flexmesh.protocol import compress, wire
from flexmesh.protocol.crypto import OVERHEAD, SEAL_VERSION, CryptoError
from flexmesh.protocol.membership import SendPacket

if TYPE_CHECKING:
    from flexmesh.agent.runtime.agent import Agent

log = logging.getLogger("flexmesh.agent")

Handler = Callable[[wire.Message], Awaitable[wire.Message | rpc.Replies]]
Send = Callable[[str, bytes], None]
Receive = Callable[[], Awaitable[tuple[wire.Message | None, str]]]
AHEAD_SECONDS = 4  # of the bulk rate a stream may queue to go out (the replay window: 60)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.transport.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.transport.agent.count("udp_errors")


class Faults:
    """Loses, duplicates or delays outgoing datagrams as configured (``fault_*``)."""

    def __init__(self, settings: Settings, count: Callable[[str], None]) -> None:
        self.settings = settings
        self.count = count
        self.rng = random.Random()
        self.loop = asyncio.get_running_loop()

    def send(self, addr: str, data: bytes, send: Send) -> None:
        s = self.settings
        if s.fault_drop and self.rng.random() < s.fault_drop:
            self.count("fault_dropped")
            return
        copies = 2 if s.fault_duplicate and self.rng.random() < s.fault_duplicate else 1
        for _ in range(copies):
            if s.fault_delay_ms:
                self.loop.call_later(s.fault_delay_ms / 1000, send, addr, data)
            else:
                send(addr, data)


class Transport:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.loop = asyncio.get_running_loop()
        self.faults = Faults(agent.settings, agent.count)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self.calls: rpc.Server | None = None
        self._members_changed = asyncio.Event()  # set (and replaced) at each MemberEvent
        self.bulk = Bulk(lambda: bulk_rate_bytes(agent.settings),
                         lambda: agent.settings.compress, agent.count, self.loop.time)

    async def bind(self, host: str, port: int, handler: Handler) -> int:
        """Bind UDP and TCP on the same port; with port 0, one that is free for both."""
        memory.fix_mmap_threshold()  # before the first large frame comes in

        async def answer(msg: wire.Message) -> wire.Message | rpc.Replies:
            reply = await handler(msg)
            if isinstance(reply, wire.Message):
                return await self.bulk.answer(msg, reply)
            return self.bulk.answers(msg, reply)  # (a stream)

        self.calls = rpc.Server(answer, lambda: self.agent.keys.codec,
                                lambda: tcp_limits(self.agent.settings), self.agent.count,
                                memory.trim, self._dropped, self.bulk.send)
        self._udp, port = await self._bind_udp(host, port)
        self._tcp = await asyncio.start_server(self.calls.serve, host, port)
        return port

    async def _bind_udp(self, host: str, port: int) -> tuple[asyncio.DatagramTransport, int]:
        for _ in range(20):
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(host, port))
            chosen = transport.get_extra_info("sockname")[1]
            if port:
                return transport, chosen
            try:
                probe = await asyncio.start_server(lambda r, w: None, host, chosen)
            except OSError:
                transport.close()
                continue
            probe.close()
            await probe.wait_closed()
            return transport, chosen
        raise OSError(f"no port on {host} free for both UDP and TCP")

    async def close(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2.0)
        if self._udp is not None:
            self._udp.close()

    def _dropped(self, exc: rpc.RemoteError, ip: str) -> None:
        if exc.reason == "unknown_key":
            self.agent.keys.unknown_key(ip, "", self.loop.time())

    # --- UDP ----------------------------------------------------------------------------

    def on_datagram(self, data: bytes, addr: tuple[Any, int]) -> None:
        agent = self.agent
        if len(data) > wire.UDP_BUDGET + OVERHEAD:
            agent.count("packets_dropped_oversized")
            return
        sealer = agent.keys.sealer
        if sealer is not None:
            try:
                data = sealer.open(data, agent.keys.codec.cluster, time.time())
            except CryptoError as exc:
                agent.count(f"packets_dropped_{exc.reason}")
                if exc.reason == "unknown_key":
                    agent.keys.unknown_key(f"{addr[0]}:{addr[1]}", exc.detail, self.loop.time())
                return
        elif data[:1] == bytes([SEAL_VERSION]):
            agent.count("packets_dropped_sealed_without_key")
            return
        agent.node.step_packet(f"{addr[0]}:{addr[1]}", data, self.loop.time())
        agent.kick(at_once=True)

    def send_packet(self, eff: SendPacket, leaving: bool) -> None:
        """Send a datagram; while the agent stops, only those that say it leaves."""
        if self._udp is None or (self.agent.stopping and not leaving):
            return
        data = eff.data
        sealer = self.agent.keys.sealer
        if sealer is not None:
            data = sealer.seal(data, self.agent.keys.codec.cluster, time.time())
        self.faults.send(eff.addr, data, self._sendto)

    def _sendto(self, addr: str, data: bytes) -> None:
        if self._udp is None or self._udp.is_closing():
            return
        try:
            host, port = addr.rsplit(":", 1)
            self._udp.sendto(data, (host.strip("[]"), int(port)))
        except (OSError, ValueError) as exc:
            self.agent.count("udp_send_errors")
            log.debug("udp send to %s failed: %s", addr, exc)

    # --- TCP ----------------------------------------------------------------------------

    async def call(self, addr: str, msg: wire.Message, timeout: float,
                   to: str = "") -> tuple[wire.Message | None, str]:
        """Call another agent (named ``to``: the request is sealed for it, where known):
        (its reply, "") or (None, why there is none)."""
        msg = self.bulk.offer(msg)
        try:
            reply = await rpc.call(addr, msg, timeout, self.agent.keys.codec,
                                   self.agent.settings.name, to)
        except rpc.CallError as exc:
            return None, str(exc)
        return await self.bulk.inflate(msg, reply)

    async def member_addr(self, node: str, wait: float) -> str | None:
        """The address of member ``node``; where it is not one (yet), up to ``wait``
        seconds for it to become one: an agent just restarted learns the others only as
        they gossip or push-pull with it, while they may already ask it to run a job."""
        deadline = self.loop.time() + wait
        while (member := self.agent.node.membership.members.get(node)) is None:
            left, changed = deadline - self.loop.time(), self._members_changed
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
        return member.addr

    def members_changed(self) -> None:
        """Wakes whoever waits for a member (``member_addr``)."""
        self._members_changed.set()
        self._members_changed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def stream(self, node: str, msg: wire.Message,
                     timeout: float) -> AsyncIterator[Receive]:
        """A call to member ``node`` answered by a stream (``rpcstream``): its replies, one
        per call of what is given, each (the reply, "") or (None, why there is none); a
        stream that could not be opened gives (None, why) at once. It closes when the
        block is left."""
        msg = self.bulk.offer(msg)
        if self.agent.keys.codec.aes:  # (frames sealed with AES-256-GCM open here)
            msg = compress.offer(msg, compress.AES)
        member = self.agent.node.membership.members.get(node)
        addr = member.addr if member is not None else None
        async with contextlib.AsyncExitStack() as stack:
            opened: rpcstream.Stream | None = None
            why = f"{node} is not a member"
            try:
                if addr is not None:
                    opened = await stack.enter_async_context(rpcstream.stream(
                        addr, msg, timeout, self.agent.keys.codec,
                        self.agent.settings.name, node))
            except rpc.CallError as exc:
                why = str(exc)

            async def receive() -> tuple[wire.Message | None, str]:
                if opened is None:
                    return None, why
                try:
                    reply = await opened.next()
                except rpc.CallError as exc:
                    return None, str(exc)
                return await self.bulk.inflate(msg, reply)

            yield receive


def tcp_limits(s: Settings) -> rpc.Limits:
    """The ``[limits]`` settings as the TCP server takes them; under a bulk rate, a stream
    queues at most ``AHEAD_SECONDS`` of it (its frames are sealed before they wait)."""
    rate = bulk_rate_bytes(s)
    ahead = rpc.STREAM_AHEAD if rate <= 0 else max(64 * 1024, min(rpc.STREAM_AHEAD,
                                                                  rate * AHEAD_SECONDS))
    return rpc.Limits(stream_ahead=ahead, budget=s.tcp_frame_budget_mib * 1024 * 1024,
                      max_connections=s.tcp_max_connections,
                      max_per_ip=s.tcp_max_connections_per_ip,
                      header_timeout=s.tcp_header_timeout, body_timeout=s.tcp_body_timeout,
                      body_rate=s.tcp_slow_link_kib_s * 1024)
