"""The state directory is one agent's: a lock keeps a second agent out, and a journal that
vanished or was emptied is refused at start instead of silently starting afresh."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from flexmesh.agent.store import AsyncJournal, JournalError


class StateDirError(Exception):
    """The state directory cannot be used; the message says why and the way out."""


def lock(state_dir: Path) -> int:
    """Hold ``state_dir/agent.lock`` for the life of the process (the fd it returns); a
    state dir another agent holds raises StateDirError naming that agent's pid."""
    path = state_dir / "agent.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirError(f"state dir {state_dir} is in use by another agent (pid "
                            f"{holder}): give each agent a state dir of its own") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _marker(journal: Path) -> Path:
    return journal.with_name(journal.name + ".id")


def journal_problem(journal: Path) -> str | None:
    """Why the journal must not be opened: this state dir had one (its marker is here) and
    it is gone or empty now. None when it may be opened (or made)."""
    marker = _marker(journal)
    if not marker.exists():
        return None
    try:
        size = journal.stat().st_size
    except FileNotFoundError:
        size = -1
    if size > 0:
        return None
    what = "is missing" if size < 0 else "is empty"
    return (f"journal {journal} {what}, but this state dir had one: it held this node's jobs. "
            f"Restore it from a backup, or start afresh with no jobs: rm {marker}")


def mark_journal(journal: Path) -> None:
    """Note that this state dir has a journal (so that losing it is noticed)."""
    marker = _marker(journal)
    if not marker.exists():
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"this state dir has a journal: see journal.sqlite3\n")
        os.close(fd)


async def open_journal(path: Path) -> AsyncJournal:
    """The state dir's journal, or StateDirError with the way out when it cannot be used."""
    problem = journal_problem(path)
    if problem:
        raise StateDirError(problem)
    try:
        journal = await AsyncJournal.open(path)
    except JournalError as exc:
        raise StateDirError(
            f"{exc}. Restore it from a backup, or move it aside to start afresh with no "
            f"jobs: mv {path} {path}.bad && rm -f {path}.id") from None
    mark_journal(path)
    return journal


def closed_to(path: Path, uid: int, gid: int) -> tuple[Path, int] | None:
    """The first directory on the way to ``path`` (``path`` included) that a process of
    ``uid``/``gid`` (and no supplementary groups, as jobs run) may not search, and its
    mode; None if it can reach ``path``, or a directory on the way does not exist yet."""
    if uid == 0:
        return None
    for d in (*reversed(path.parents), path):
        try:
            st = os.stat(d)
        except OSError:
            return None  # made by the agent later, with a mode jobs can search
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return d, st.st_mode & 0o7777
    return None


def unreachable(what: str, path: Path, user: tuple[int, int], name: str = "") -> str | None:
    """Why jobs of ``user`` cannot work in ``path`` (``what`` names it), or None."""
    closed = closed_to(path, *user)
    if closed is None:
        return None
    d, mode = closed
    who = name or f"uid {user[0]}"
    return (f"{what} {path} is out of reach of the job's user ({who}): {d} has mode "
            f"{mode:04o}; let it search it (chmod o+x {d}) or set [payload] work_dir "
            "elsewhere")
