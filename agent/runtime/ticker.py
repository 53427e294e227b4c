"""The node's timers: the runtime wakes when the node's next deadline is due.

One future and one timer a turn (no task): an idle agent turns a few times a second, and
this is most of what it does. Input that moves the deadline re-times the wait (``retime``):
sooner wakes the loop at once; later moves the timer, so that a deadline that passed away
(a probe's ack came before its timeout) costs no wakeup. On a VM a wakeup costs more CPU
than what an idle agent does in it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flexmesh.agent.runtime.agent import Agent

MAX_WAIT = 1.0  # seconds: the loop turns at least this often (the watchdog vouches for it)


class Ticker:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.loop = agent.loop
        self.last_tick = self.loop.time()
        self._wake: asyncio.Future[bool] = self.loop.create_future()
        self._until = 0.0  # when the loop wakes next, unless woken
        self._timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        node = self.agent.node
        while True:
            started = self.last_tick = self.loop.time()
            self._until = started + min(max(0.0, node.next_deadline() - started), MAX_WAIT)
            self._wake = self.loop.create_future()
            self._timer = self.loop.call_at(self._until, _resolve, self._wake, False)
            woken = await self._wake
            self._timer.cancel()
            now = self.loop.time()
            if not woken:  # slept past its timer: by how much says how slow the loop is
                node.membership.timer_overshoot(now - self._until)
            if now >= node.next_deadline():
                node.tick(now)
                self.agent.kick(at_once=True)  # (a full disk's retried writes never stop timers)

    def retime(self) -> None:
        """After input: wake at the node's next deadline, sooner or later than planned."""
        if self._wake.done() or self._timer is None:
            return
        until = min(self.agent.node.next_deadline(), self.last_tick + MAX_WAIT)
        if until < self._until:
            _resolve(self._wake, True)
        elif until > self._until + 0.002:
            self._timer.cancel()
            self._until = until
            self._timer = self.loop.call_at(until, _resolve, self._wake, False)


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)
