"""The replay window: authenticated nonces remembered for a while, repeats refused.

Part of the sealing in ``crypto``: the receiver runs a ``ReplayWindow`` over the nonces of
packets that opened. Like ``crypto`` it does no I/O and reads no clock (``now`` comes in,
wall-clock seconds since the Unix epoch).
"""

from __future__ import annotations

import heapq
import math

_MAX_MS = 2**48  # the 6-byte timestamp lasts until the year 10889


def wall_ms(now: float) -> int:
    if not math.isfinite(now) or not 0 <= now * 1000 < _MAX_MS:
        raise ValueError(f"now must be wall-clock seconds since the Unix epoch, got {now!r}")
    return int(now * 1000)


class ReplayWindow:
    """Remembers authenticated nonces for ``max_age_s`` and rejects repeats, old and future.

    Memory is bounded twice: entries older than ``max_age_s`` are evicted as they age out,
    and beyond ``max_entries`` the oldest are evicted early. Every eviction raises a floor;
    a timestamp at or below the floor is refused as "stale", so an evicted nonce can never
    be replayed. Under a flood the window thus fails closed (a late but genuine packet may
    be dropped), never open.
    """

    def __init__(
        self,
        max_age_s: float = 60.0,
        max_future_s: float | None = None,
        max_entries: int = 100_000,
    ) -> None:
        if not max_age_s > 0 or (max_future_s is not None and not max_future_s >= 0):
            raise ValueError("max_age_s must be > 0 and max_future_s >= 0")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_age_ms = int(max_age_s * 1000)
        self.max_future_ms = self.max_age_ms if max_future_s is None else int(max_future_s * 1000)
        self.max_entries = max_entries
        self.floor_ms = -1  # timestamps at or below this were, or may have been, evicted
        self._seen: set[bytes] = set()
        self._by_age: list[tuple[int, bytes]] = []  # min-heap of (timestamp_ms, key)

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_remember(self, key: bytes, timestamp_ms: int, now: float) -> bool:
        """True if ``key`` is fresh and new (and now remembered); False to drop it."""
        return self.admit(key, timestamp_ms, now) is None

    def admit(self, key: bytes, timestamp_ms: int, now: float) -> str | None:
        """None if accepted and remembered, else the drop reason."""
        now_ms = wall_ms(now)
        if timestamp_ms < now_ms - self.max_age_ms or timestamp_ms <= self.floor_ms:
            return "stale"
        if timestamp_ms > now_ms + self.max_future_ms:
            return "future"
        if key in self._seen:
            return "replayed"
        self._seen.add(key)
        heapq.heappush(self._by_age, (timestamp_ms, key))
        self._evict(now_ms - self.max_age_ms)
        return None

    def _evict(self, cutoff_ms: int) -> None:
        heap = self._by_age
        while heap and (heap[0][0] < cutoff_ms or len(heap) > self.max_entries):
            ts, key = heapq.heappop(heap)
            self._seen.discard(key)
            self.floor_ms = max(self.floor_ms, ts)
