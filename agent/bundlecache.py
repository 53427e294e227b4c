"""The bundles this node holds, by SHA-256: those packed here for jobs submitted here, and
those fetched from other nodes for jobs run here. One least-recently-used store of at most
``capacity`` bytes under ``state_dir/bundles``.

A bundle in use is never evicted: one that a job submitted here and not yet ended names
(its owner may fetch it, now or after a requeue), one a run here is being started from, or
one pinned while it is packed. What is in use may exceed the capacity; what is not is
evicted, least recently used first, until the store fits again. Use is remembered across
restarts through each file's mtime. A partial download lives in ``partial/SHA.part`` until
it is complete and verified; one not written to for ``PARTIAL_MAX_AGE`` (a fetch given
up, cancelled, or of a job placed elsewhere since) is removed at the next load or
eviction, so they cannot pile up. Methods here touch the disk only through small calls (a
stat, an unlink, a utime).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import time
from pathlib import Path

_SHA256 = re.compile(r"[0-9a-f]{64}")
PARTIAL_MAX_AGE = 3600.0  # seconds a partial download unwritten is kept (to resume it)


def valid_sha(text: str) -> bool:
    """Whether ``text`` names a bundle (64 lower-case hex digits): it becomes a file name."""
    return bool(_SHA256.fullmatch(text))


class BundleCache:
    def __init__(self, root: Path, capacity: int) -> None:
        self.root = root
        self.capacity = capacity
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()  # sha -> size
        self._pins: collections.Counter[str] = collections.Counter()

    def load(self) -> None:
        """Read what the store holds (oldest use first); leftovers of a pack are removed."""
        (self.root / "partial").mkdir(parents=True, exist_ok=True)
        self.drop_stale_partials()
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(".pack-"):
                path.unlink(missing_ok=True)
            elif path.suffix == ".tar" and valid_sha(path.stem):
                st = path.stat()
                found.append((st.st_mtime, path.stem, st.st_size))
        for _, sha, size in sorted(found):
            self._lru[sha] = size

    @property
    def total(self) -> int:
        return sum(self._lru.values())

    def path(self, sha: str) -> Path:
        if not valid_sha(sha):
            raise ValueError(f"{sha[:80]!r} is not a SHA-256")
        return self.root / f"{sha}.tar"

    def partial(self, sha: str) -> Path:
        return self.root / "partial" / f"{self.path(sha).stem}.part"

    def has(self, sha: str) -> bool:
        return sha in self._lru and self.path(sha).exists()

    def recent(self, limit: int = 32) -> list[str]:
        """The bundles here, most recently used first, at most ``limit``."""
        out: list[str] = []
        for sha in reversed(self._lru):
            if len(out) >= limit:
                break
            out.append(sha)
        return out

    def size(self, sha: str) -> int | None:
        return self._lru.get(sha)

    def use(self, sha: str) -> bool:
        """Mark ``sha`` just used; False if it is not here."""
        if not self.has(sha):
            self._lru.pop(sha, None)
            return False
        self._lru.move_to_end(sha)
        with contextlib.suppress(OSError):
            now = time.time()
            os.utime(self.path(sha), (now, now))
        return True

    def add(self, sha: str, size: int) -> None:
        """A bundle now complete in the store (packed or fetched and verified)."""
        self._lru[sha] = size
        self.use(sha)

    def pin(self, sha: str) -> None:
        self._pins[sha] += 1

    def unpin(self, sha: str) -> None:
        self._pins[sha] -= 1
        if self._pins[sha] <= 0:
            del self._pins[sha]

    def drop_stale_partials(self, now: float | None = None) -> list[str]:
        """Remove partial downloads unwritten for ``PARTIAL_MAX_AGE``; their names."""
        cutoff = (time.time() if now is None else now) - PARTIAL_MAX_AGE
        dropped = []
        for path in (self.root / "partial").glob("*.part"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    dropped.append(path.name)
        return dropped

    def evict(self, in_use: set[str]) -> list[str]:
        """Remove least recently used bundles not in use until the store fits its
        capacity; returns those removed."""
        gone = []
        total = self.total
        for sha in list(self._lru):
            if total <= self.capacity:
                break
            if sha in in_use or sha in self._pins:
                continue
            total -= self._lru.pop(sha)
            self.path(sha).unlink(missing_ok=True)
            gone.append(sha)
        return gone
