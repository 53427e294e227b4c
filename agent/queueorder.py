"""A queued request as the scheduler keeps it, and the queue's order without sorting it.

Requests wait in a heap by the time they may be tried again, and move to a heap by
(priority, age) once that time has come. Heap entries are checked when taken (a request
withdrawn, placed or re-queued since is skipped), so a round costs O(limit log n),
whatever the backlog. Sans-IO: the time is passed in.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

from flexmesh.policies import MultiPlacement, Placement, Request
from flexmesh.protocol import wire


@dataclass(slots=True)
class Queued:
    submit: wire.Submit
    enqueued: float
    seq: int
    inflight: bool = False
    not_before: float = 0.0
    reason: str = "waiting for a device"
    attempts: int = 0
    preempting_until: float = 0.0  # victims were told to stop; no new ones before this
    booked: tuple[Request, Placement | MultiPlacement] | None = None  # until owner answers


class Order:
    def __init__(self) -> None:
        self._waiting: list[tuple[float, int, int, str]] = []
        self._ready: list[tuple[int, int, str]] = []

    def wait(self, q: Queued) -> None:
        """``q`` is to be tried again at ``q.not_before``."""
        heapq.heappush(self._waiting, (q.not_before, -q.submit.priority, q.seq, q.submit.job_id))

    def take(self, queue: Mapping[str, Queued], now: float, limit: int) -> list[Queued]:
        """Up to ``limit`` requests of ``queue`` that may be tried now, in their order."""
        waiting, ready = self._waiting, self._ready
        while waiting and waiting[0][0] <= now:
            _, prio, seq, job_id = heapq.heappop(waiting)
            heapq.heappush(ready, (prio, seq, job_id))
        out: list[Queued] = []
        taken: set[str] = set()
        while ready and len(out) < limit:
            _, seq, job_id = heapq.heappop(ready)
            q = queue.get(job_id)
            if q is None or q.seq != seq or q.inflight or job_id in taken:
                continue
            if q.not_before > now:
                self.wait(q)
                continue
            taken.add(job_id)
            out.append(q)
        return out

    def clear(self) -> None:
        self._waiting.clear()
        self._ready.clear()
