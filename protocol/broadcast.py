"""Transmit-limited piggyback queue for membership dissemination.

Each pending update is keyed by what it is about (``("m", node)`` for Alive/Suspect/Dead,
``("f", node)`` for Facts); a newer update for the same key replaces the older one, so the
queue never carries stale news. Every time an update rides a packet its count rises; it is
dropped once sent ``limit`` times, where the limit grows with log N (SWIM's guarantee that
an update reaches everyone with high probability). The least-sent updates go first.

Sans-IO: it stores encoded message bytes and hands back those that fit a byte budget.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass


def retransmit_limit(mult: int, n: int) -> int:
    """How many times an update is piggybacked in a cluster of ``n`` nodes."""
    return mult * max(1, math.ceil(math.log10(n + 1)))


@dataclass(slots=True)
class _Entry:
    payload: bytes
    transmits: int
    serial: int


class BroadcastQueue:
    """Pending updates, handed out least-sent and newest first.

    The order lives in a heap of ``(transmits, -serial, key)``; an entry replaced or sent
    since it was pushed leaves a stale heap item behind, skipped when it comes up. A packet
    costs O(k log n) for the k updates it carries, not a sort of the whole queue (which
    matters at 30% loss in a 1,000-node mesh, where queues hold thousands of updates).
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._heap: list[tuple[int, int, tuple[str, str]]] = []
        self._serial = 0

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, key: tuple[str, str], payload: bytes) -> None:
        self._serial += 1
        self._entries[key] = _Entry(payload, 0, self._serial)
        heapq.heappush(self._heap, (0, -self._serial, key))
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._compact()

    def drop(self, key: tuple[str, str]) -> None:
        self._entries.pop(key, None)

    def _compact(self) -> None:
        self._heap = [(e.transmits, -e.serial, k) for k, e in self._entries.items()]
        heapq.heapify(self._heap)

    def take(self, budget: int, per_message_overhead: int, limit: int) -> list[bytes]:
        """Payloads that fit ``budget`` bytes, least-sent and newest first."""
        if not self._entries or budget <= 0:
            return []
        heap, entries = self._heap, self._entries
        out: list[bytes] = []
        back: list[tuple[int, int, tuple[str, str]]] = []
        used = 0
        while heap:
            item = heapq.heappop(heap)
            transmits, neg_serial, key = item
            entry = entries.get(key)
            if entry is None or entry.serial != -neg_serial or entry.transmits != transmits:
                continue  # replaced, dropped or sent since this item was pushed
            cost = len(entry.payload) + per_message_overhead
            if used + cost > budget:
                back.append(item)  # too big for what is left of this packet
                continue
            used += cost
            out.append(entry.payload)
            entry.transmits += 1
            if entry.transmits >= limit:
                del entries[key]
            else:
                back.append((entry.transmits, neg_serial, key))
            if budget - used < 16:
                break  # nothing useful fits any more
        for item in back:
            heapq.heappush(heap, item)
        return out
