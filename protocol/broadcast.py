"""Transmit-limited piggyback queue for membership dissemination.

Each pending update is keyed by what it is about (``("m", node)`` for Alive/Suspect/Dead,
``("f", node)`` for Facts); a newer update for the same key replaces the older one, so the
queue never carries stale news. Every time an update rides a packet its count rises; it is
dropped once sent ``limit`` times, where the limit grows with log N (SWIM's guarantee that
an update reaches everyone with high probability). The least-sent updates go first.

Sans-IO: it stores encoded message bytes and hands back those that fit a byte budget.
"""

from __future__ import annotations

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
    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._serial = 0

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, key: tuple[str, str], payload: bytes) -> None:
        self._serial += 1
        self._entries[key] = _Entry(payload, 0, self._serial)

    def drop(self, key: tuple[str, str]) -> None:
        self._entries.pop(key, None)

    def take(self, budget: int, per_message_overhead: int, limit: int) -> list[bytes]:
        """Payloads that fit ``budget`` bytes, least-sent and newest first."""
        if not self._entries or budget <= 0:
            return []
        order = sorted(self._entries.items(), key=lambda kv: (kv[1].transmits, -kv[1].serial))
        out: list[bytes] = []
        used = 0
        for key, entry in order:
            cost = len(entry.payload) + per_message_overhead
            if used + cost > budget:
                continue
            used += cost
            out.append(entry.payload)
            entry.transmits += 1
            if entry.transmits >= limit:
                del self._entries[key]
            if budget - used < 16:
                break
        return out
