"""An owner fetching a bundle from a job's origin: chunk by chunk, to a file, resumable.

Each ``FetchBundle`` asks for the bytes from what the partial file already holds, so a
dropped connection (or an agent restarted half-way) costs only the chunk in flight, and
neither side ever holds more than one chunk of the bundle in memory. The whole is checked
against its SHA-256 before it takes its place in the store; a mismatch deletes what came.
Consecutive failed calls are retried a few times with a growing pause, then the fetch
fails: it never waits forever. The caller gives ``call`` (one request, one reply or None
and why) and ``alive`` (whether the job still wants the bundle).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flexmesh.protocol import wire

CHUNK = 1 << 20  # bytes asked for per call: far below wire.MAX_FRAME
RETRIES = 5  # failed calls in a row before the fetch gives up
PAUSE = 0.2  # seconds before the first retry; doubled for each one after

Caller = Callable[[wire.Message], Awaitable[tuple[wire.Message | None, str]]]


class FetchError(Exception):
    """The bundle could not be fetched; the message says why, for a person. ``refused``:
    the other side answered that it will not serve it (asking again cannot help)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(slots=True)
class Fetched:
    bytes: int = 0  # bytes that came over the network (a resumed fetch: only the rest)
    calls: int = 0
    retries: int = 0
    resumed_at: int = 0  # bytes the partial file held when this fetch began


@dataclass(frozen=True, slots=True)
class Want:
    sha: str
    size: int
    job_id: str = ""
    peer: str = "origin"  # who serves it, as the errors name it


Asker = Callable[[int, int], wire.Message]  # (offset, length) -> the request for them


async def fetch(call: Caller, want: Want, partial: Path, dest: Path,
                alive: Callable[[], bool] = lambda: True, chunk: int = CHUNK,
                retries: int = RETRIES, pause: float = PAUSE,
                ask: Asker | None = None) -> Fetched:
    """Bring bundle ``want`` to ``dest`` through ``partial``; FetchError if it cannot.
    ``ask`` makes each request (default: a ``FetchBundle`` of ``want``); the answers are
    ``BundleChunk``s of ``want.sha``."""
    ask = ask or (lambda offset, length: wire.FetchBundle(want.sha, offset, length,
                                                          want.job_id))
    partial.parent.mkdir(parents=True, exist_ok=True)
    h, have = await asyncio.to_thread(_resume, partial, want.size)
    stats = Fetched(resumed_at=have)
    with open(partial, "ab") as f:
        while have < want.size:
            if not alive():
                raise FetchError("the job stopped while its bundle was fetched")
            stats.calls += 1
            length = min(chunk, want.size - have)
            reply, error = await call(ask(have, length))
            data = _chunk(reply, have, length, want)
            if data is None:
                stats.retries += 1
                if stats.retries > retries:
                    raise FetchError(f"gave up after {retries} retries at byte {have} of "
                                     f"{want.size}: {error or reply}")
                await asyncio.sleep(pause * 2 ** (stats.retries - 1))
                continue
            await asyncio.to_thread(_append, f, h, data)
            have += len(data)
            stats.bytes += len(data)
    if h.hexdigest() != want.sha:
        partial.unlink(missing_ok=True)
        raise FetchError(f"the bundle that came does not match its SHA-256 {want.sha}")
    os.replace(partial, dest)
    return stats


def _chunk(reply: wire.Message | None, offset: int, length: int, want: Want) -> bytes | None:
    """The bytes a reply brings, None if it brings none (to retry); FetchError where
    retrying cannot help."""
    if isinstance(reply, wire.Error):
        raise FetchError(f"the {want.peer} refused: {reply.reason}", refused=True)
    if not isinstance(reply, wire.BundleChunk):
        return None
    if reply.bundle != want.sha or reply.total != want.size:
        raise FetchError(f"the {want.peer} holds {reply.total} bytes of {reply.bundle[:16]}, "
                         f"not {want.size} of {want.sha[:16]}", refused=True)
    if reply.offset != offset or not 0 < len(reply.data) <= length:
        return None
    return reply.data


def _resume(partial: Path, size: int) -> tuple[hashlib._Hash, int]:
    """The hash of what a partial file already holds, and its length (a partial longer
    than the bundle is garbage and starts over)."""
    h = hashlib.sha256()
    have = 0
    if partial.exists() and partial.stat().st_size <= size:
        with open(partial, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
                have += len(block)
    else:
        partial.unlink(missing_ok=True)
    return h, have


def _append(f: IO[bytes], h: hashlib._Hash, data: bytes) -> None:
    f.write(data)
    f.flush()
    h.update(data)


def read_chunk(path: Path, offset: int, length: int) -> tuple[bytes, int]:
    """The origin's side: at most ``length`` bytes (and at most ``CHUNK``) of ``path``
    from ``offset``, and the file's size."""
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        f.seek(min(offset, total))
        return f.read(min(length, CHUNK)), total
