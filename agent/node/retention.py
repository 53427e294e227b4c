"""How long ended records are kept: at most ``keep`` of them, none older than ``keep_for``
seconds; the oldest go first. A record that comes back to life (a new attempt under the
same id) is no longer counted as ended."""

from __future__ import annotations


class Retention:
    def __init__(self, keep: int, keep_for: float) -> None:
        self.keep = keep
        self.keep_for = keep_for
        self._ended: dict[str, float] = {}  # in the order they ended

    def __len__(self) -> int:
        return len(self._ended)

    def __contains__(self, key: str) -> bool:
        return key in self._ended

    def ended(self, key: str, now: float) -> None:
        self._ended.setdefault(key, now)

    def revived(self, key: str) -> None:
        self._ended.pop(key, None)

    def due(self, now: float) -> list[str]:
        """The records to forget now (no longer counted here)."""
        out = []
        while self._ended:
            key, when = next(iter(self._ended.items()))
            if len(self._ended) <= self.keep and now - when < self.keep_for:
                break
            del self._ended[key]
            out.append(key)
        return out
