"""How long ended records are kept: at most ``keep`` of them, none older than ``keep_for``
seconds; the oldest go first. A record that comes back to life (a new attempt under the
same id) is no longer counted as ended. A record ``held`` (one that someone still needs)
is not counted: it outlives the count, never the age."""

from __future__ import annotations

from collections.abc import Callable


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

    def due(self, now: float, held: Callable[[str], bool] | None = None) -> list[str]:
        """The records to forget now (no longer counted here)."""
        out = []
        keys = list(self._ended)
        kept = keys if held is None else [k for k in keys if not held(k)]
        excess = len(kept) - self.keep  # (held records do not count)
        for key, when in list(self._ended.items()):
            aged = now - when >= self.keep_for
            if not aged and excess <= 0:
                break
            if aged or held is None or not held(key):
                del self._ended[key]
                out.append(key)
                excess -= 1
        return out
