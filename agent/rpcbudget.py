"""The bytes of frame bodies being read, shared by all of a server's inbound connections
(kept apart from agent/rpc.py for size)."""

from __future__ import annotations


class Budget:
    """Bytes reserved for frame bodies being read, across connections: at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0  # the most ever reserved at once
        self.total = 0  # bytes ever reserved

    def reserve(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        self.total += n
        return True

    def release(self, n: int) -> None:
        self.used -= n
