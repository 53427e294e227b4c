"""Memory the agent hands back to the system once large frames are gone (glibc only).

glibc serves a request above its mmap threshold with a mapping of its own, returned to the
system when freed, but it raises that threshold (up to 32 MiB) each time such a chunk is
freed. After one large frame, later large buffers therefore come from the heap, where
they fragment it and stay: many connections with large frames once left an agent at
1.6 GB after they had closed. ``fix_mmap_threshold`` pins the threshold at start, which
also turns that adjustment off, and ``trim`` gives free heap pages back after large reads.
The threshold sits just above a bundle or results chunk (1 MiB and its framing): a
buffer at or below it is reused from the heap, not mapped and zeroed anew for each chunk
(a fresh mapping cost about 0.5 ms of page faults per MiB, several per chunk), while a
frame above it, up to ``wire.MAX_FRAME``, is still handed back whole when freed.

Both do nothing where the C library is not glibc (musl, macOS), and never raise.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import sys
import time

log = logging.getLogger("flexmesh.agent")

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 2 * 1024 * 1024  # bytes: a body above this (a bundle chunk is 1 MiB) is mapped
# Free memory at the heap's top kept rather than given back at each free: without it a
# chunk's buffers, freed, shrink the heap and the next chunk's fault their pages in again.
# ``trim`` still gives it back once large frames are gone.
TRIM_THRESHOLD = 16 * 1024 * 1024
TRIM_INTERVAL = 1.0  # seconds: malloc_trim walks the heap, so not more often than this

_last_trim = 0.0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols the process has: its C library among them
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def fix_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at ``MMAP_THRESHOLD``; False where it cannot be."""
    libc = _glibc()
    try:
        done = (libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    except (OSError, ctypes.ArgumentError):
        done = False
    log.debug("mmap threshold %s", f"fixed at {MMAP_THRESHOLD}" if done else "left as it is")
    return done


def trim() -> None:
    """Give the heap's free pages back to the system (at most once a ``TRIM_INTERVAL``)."""
    global _last_trim
    libc = _glibc()
    now = time.monotonic()
    if libc is None or now - _last_trim < TRIM_INTERVAL:
        return
    _last_trim = now
    with contextlib.suppress(OSError, ctypes.ArgumentError):
        libc.malloc_trim(0)
