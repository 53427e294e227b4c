"""The simulator's network: datagrams that are lost, delayed, duplicated and reordered,
and calls between agents that go through the wire codec and may be lost or reordered too.
A ``JobSync`` is held open by the owner, as the runtime does, until there is output or news.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flexmesh.agent.models import TERMINAL
from flexmesh.agent.node import Call, Node
from flexmesh.agent.simcheck import check_promise, job_attempts
from flexmesh.protocol import wire
from flexmesh.protocol.membership import SendPacket, StartPushPull

if TYPE_CHECKING:
    from flexmesh.agent.simulator import _SimNode

SYNC_CHUNK = 96  # bytes of output a JobSync answer carries at most: small, to split output
SYNC_POLL = 0.25  # the owner looks again this often while it holds a JobSync open


@dataclass
class LinkFaults:
    loss: float = 0.0
    delay: float = 0.002
    jitter: float = 0.002
    duplicate: float = 0.0
    call_loss: float = 0.0  # a call's request or answer is lost: the caller times out
    call_jitter: float = 0.0  # extra random delay of each call leg (reorders calls)
    # One-way delay of a datagram between two nodes (a latency matrix: sites, clusters),
    # instead of ``delay``; jitter still comes on top.
    one_way: Callable[[str, str], float] | None = None



class SimNetwork:
    """Part of ``Simulator``: how packets and calls travel between its nodes."""

    nodes: dict[str, _SimNode]
    by_addr: dict[str, str]
    faults: LinkFaults
    rng: random.Random
    stats: dict[str, int]
    now: float
    seed: int

    if TYPE_CHECKING:  # provided by ``Simulator``, which this is mixed into
        def at(self, when: float, fn: Callable[[], None]) -> None: ...
        def reachable(self, a: str, b: str) -> bool: ...
        def _pump(self, name: str) -> None: ...

    def _latency(self, src: str = "", dst: str = "") -> float:
        base = self.faults.delay
        if self.faults.one_way is not None and src and dst:
            base = self.faults.one_way(src, dst)
        return base + self.rng.random() * self.faults.jitter

    def _send_packet(self, src: str, eff: SendPacket) -> None:
        dst = self.by_addr.get(eff.addr)
        self.stats["packets"] += 1
        self.stats["bytes"] += len(eff.data)
        if dst is None or not self.reachable(src, dst) or self.rng.random() < self.faults.loss:
            self.stats["dropped"] += 1
            return
        copies = 2 if self.rng.random() < self.faults.duplicate else 1
        src_addr = self.nodes[src].config.addr
        target = self.nodes[dst].node
        for _ in range(copies):
            self.at(self.now + self._latency(src, dst),
                    lambda: self._deliver(dst, target, src_addr, eff.data))

    def _deliver(self, dst: str, target: Node, src_addr: str, data: bytes) -> None:
        sim = self.nodes[dst]
        if not sim.up or sim.node is not target:
            return
        if self.now < sim.stalled_until:  # a frozen loop reads its socket late
            self.at(sim.stalled_until, lambda: self._deliver(dst, target, src_addr, data))
            return
        target.step_packet(src_addr, data, self.now)
        self._pump(dst)

    def _pushpull(self, src: str, eff: StartPushPull) -> None:
        dst = self.by_addr.get(eff.addr)
        node = self.nodes[src].node
        if dst is None or not self.reachable(src, dst):
            return
        request = node.pushpull_request(eff.join)
        rtt = 2 * self._latency()

        def deliver() -> None:
            if not self.reachable(src, dst):
                return
            reply = self.nodes[dst].node.handle_request(request, self.now)
            self._pump(dst)
            self.at(self.now + rtt / 2, lambda: self._pushpull_back(src, node, reply))
        self.at(self.now + rtt / 2, deliver)

    def _pushpull_back(self, src: str, node: Node, reply: wire.Message) -> None:
        if self.nodes[src].node is node and self.nodes[src].up:
            node.pushpull_reply(reply, self.now)
            self._pump(src)

    def _rpc(self, src: str, eff: Call) -> None:
        dst = eff.node
        node = self.nodes[src].node
        # Calls go through the wire codec, as they do between real agents.
        frame = wire.encode_frame(eff.msg)

        def fail(why: str) -> None:
            if self.nodes[src].node is node and self.nodes[src].up:
                node.call_result(eff.call_id, None, why, self.now)
                self._pump(src)

        def back(reply: wire.Message) -> None:
            if self.rng.random() < self.faults.call_loss:
                self.at(self.now + eff.timeout, lambda: fail("timed out"))
                return

            def arrive() -> None:
                if self.nodes[src].node is node and self.nodes[src].up:
                    node.call_result(eff.call_id, reply, "", self.now)
                    self._pump(src)
            self.at(self.now + self._call_latency(), arrive)

        def deliver() -> None:
            if not self.reachable(src, dst):
                self.at(self.now + eff.timeout, lambda: fail("timed out"))
                return
            msg = wire.decode_frame_body(frame[4:])
            if isinstance(msg, wire.JobSync):
                self._answer_sync(dst, msg, self.now + msg.wait_ms / 1000, back,
                                  lambda: fail("connection lost"))
                return
            before = job_attempts(self, dst, msg)
            reply = self.nodes[dst].node.handle_request(msg, self.now)
            self._pump(dst)
            check_promise(self, dst, msg, reply, before)
            back(reply)

        if (dst not in self.nodes or not self.reachable(src, dst)
                or self.rng.random() < self.faults.call_loss):
            self.at(self.now + eff.timeout, lambda: fail("timed out"))
            return
        self.at(self.now + self._call_latency(), deliver)

    def _call_latency(self) -> float:
        return self._latency() + self.rng.random() * self.faults.call_jitter

    def _answer_sync(self, owner: str, msg: wire.JobSync, until: float,
                     back: Callable[[wire.Message], None], lost: Callable[[], None]) -> None:
        """The owner holds a JobSync open until there is output or news, as the runtime
        does: it reads the job's log from the asked offsets and answers."""
        sim = self.nodes[owner]
        if not sim.up:
            lost()  # the owner went down while it held the call
            return
        log = sim.logs.get(msg.job_id)
        out = log.read("stdout", msg.stdout_offset, SYNC_CHUNK, self.now) if log else b""
        err = log.read("stderr", msg.stderr_offset, SYNC_CHUNK, self.now) if log else b""
        reply = sim.node.sync_reply(msg, out, err, SYNC_CHUNK, self.now)
        news = not isinstance(reply, wire.JobSyncReply) or out or err or reply.state in TERMINAL
        if news or self.now >= until:
            back(reply)
            return
        self.at(min(until, self.now + SYNC_POLL),
                lambda: self._answer_sync(owner, msg, until, back, lost))
