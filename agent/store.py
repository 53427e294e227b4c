"""The agent's journal: jobs, runs, leases and a few counters in one SQLite file.

Durability
----------
The journal runs in WAL mode with ``synchronous=FULL`` by default. Either FULL or NORMAL
keeps a committed transaction through a ``kill -9`` of the agent: once ``COMMIT`` has
returned, the transaction's frames are in the WAL file (in the kernel's page cache at
least), and the next process that opens the database replays them. The two settings
differ on power loss or a kernel panic: with NORMAL the WAL is fsynced only at
checkpoints, so the last transactions before the power cut can be rolled back; with FULL
the WAL is fsynced at every commit. The journal writes a row a few times per job and lease,
never in a hot loop, and every write runs off the event loop (``AsyncJournal``), so the
cost of one fsync per commit buys the promise the design makes: "a job accepted by an
agent is written to its journal before the agent answers; it is never silently dropped",
also on a drone whose battery is pulled. ``Journal(path, synchronous="NORMAL")`` trades
that for speed where power loss is not a concern.

Schema
------
The migrations and the row formats are ``storeschema``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

from flexmesh.agent.models import JobRecord, RunRecord
from flexmesh.agent.storeschema import (
    JOB_COLUMNS,
    MIGRATIONS,
    RUN_COLUMNS,
    SCHEMA_VERSION,
    job_from_row,
    lease_from_row,
    run_from_row,
    upsert_lease,
    upsert_meta,
    upsert_record,
)

__all__ = ["SCHEMA_VERSION", "AsyncJournal", "Journal", "JournalError"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R", JobRecord, RunRecord)

class JournalError(Exception):
    """The journal file cannot be used (unreadable, or written by a newer agent)."""


class Journal:
    """The SQLite journal, synchronous, on one connection.

    Not thread-safe: use it from one thread at a time (``AsyncJournal`` guarantees that by
    running every call on one worker thread). The connection is opened with
    ``check_same_thread=False`` so it may be created on one thread and used on another.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout_ms: int = 5000,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Jobs carry their environment, which may hold secrets: create the file 0600
        # (SQLite gives the -wal and -shm files the same permissions).
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        try:
            # isolation_level=None: no implicit transactions; _tx() opens them explicitly.
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise JournalError(f"cannot open journal {self.path}: {e}") from e
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("journal %s: WAL mode unavailable, running in %s mode", path, mode)
            self._conn.execute(f"PRAGMA synchronous = {synchronous}")
            self._migrate()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise JournalError(f"journal {self.path} is unreadable: {e}") from e
        except BaseException:
            self._conn.close()
            raise

    # -- schema --------------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._tx():
            version = self.schema_version
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"journal {self.path} has schema version {version}, newer than this "
                    f"agent supports ({SCHEMA_VERSION}); upgrade flexmesh"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target - 1]:
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {target}")
                if version:
                    log.info("journal %s: migrated to schema version %d", self.path, target)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; COMMIT on success, ROLLBACK on any error."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- writes --------------------------------------------------------------------------

    def write_batch(self, jobs: Iterable[JobRecord] = (), leases: Iterable[dict[str, Any]] = (),
                    meta: dict[str, str] | None = None, forget_jobs: Iterable[str] = (),
                    forget_leases: Iterable[str] = (), *, runs: Iterable[RunRecord] = (),
                    forget_runs: Iterable[str] = ()) -> None:
        """Insert or replace jobs, leases and meta values in one transaction, durable
        together once this returns (see the module doc): one fsync for a burst of changes
        instead of one each (group commit).

        A lease is keyed by ``lease["id"]`` (or ``lease["lease_id"]``); the dict must be
        JSON-serialisable, and comes back from ``list_leases`` equal. A lease without an
        id raises ValueError and nothing of the batch is written. ``forget_jobs`` and
        ``forget_leases`` are deleted first (records past their retention); so are
        ``forget_runs``, and ``runs`` (an owner's records of its runs) are written as jobs are.
        """
        with self._tx() as conn:
            conn.executemany("DELETE FROM jobs WHERE id = ?", [(j,) for j in forget_jobs])
            conn.executemany("DELETE FROM runs WHERE id = ?", [(r,) for r in forget_runs])
            conn.executemany("DELETE FROM leases WHERE id = ?", [(x,) for x in forget_leases])
            for job in jobs:
                upsert_record(conn, job)
            for run in runs:
                upsert_record(conn, run)
            for lease in leases:
                upsert_lease(conn, lease)
            for key, value in (meta or {}).items():
                upsert_meta(conn, key, value)

    # -- jobs ----------------------------------------------------------------------------

    def list_jobs(self, states: Iterable[str] | None = None) -> list[JobRecord]:
        """Jobs ordered by ``created_at`` (then by insertion), optionally only some states
        (a single state string is accepted too)."""
        return self._list("jobs", JOB_COLUMNS, job_from_row, states)

    def list_runs(self, states: Iterable[str] | None = None) -> list[RunRecord]:
        """This node's runs (of jobs submitted anywhere), ordered as ``list_jobs``."""
        return self._list("runs", RUN_COLUMNS, run_from_row, states)

    def _list(self, table: str, names: tuple[str, ...],
              read: Callable[[tuple[Any, ...]], R | None],
              states: Iterable[str] | None) -> list[R]:
        sql = f"SELECT {', '.join(names)}, data FROM {table}"
        params: tuple[str, ...] = ()
        if states is not None:
            params = (states,) if isinstance(states, str) else tuple(states)
            if not params:
                return []
            sql += f" WHERE state IN ({', '.join('?' * len(params))})"
        sql += " ORDER BY created_at, rowid"
        records = []
        for row in self._conn.execute(sql, params):
            record = read(row)
            if record is not None:
                records.append(record)
        return records

    # -- leases --------------------------------------------------------------------------

    def list_leases(self) -> list[dict[str, Any]]:
        """Every stored lease, in the order they were first written."""
        leases = []
        for lease_id, data in self._conn.execute("SELECT id, data FROM leases ORDER BY rowid"):
            lease = lease_from_row(lease_id, data)
            if lease is not None:
                leases.append(lease)
        return leases

    # -- meta ----------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def bump_meta(self, key: str, at_least: int = 0) -> int:
        """Atomically store ``max(current + 1, at_least)`` under ``key`` and return it.

        For counters that must rise across restarts (incarnation, fencing token). A missing
        or non-integer value counts as 0.
        """
        with self._tx() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            try:
                current = int(row[0]) if row is not None else 0
            except ValueError:
                log.error("journal: meta %r holds %r, not an integer; restarting at 0", key, row[0])
                current = 0
            value = max(current + 1, at_least)
            upsert_meta(conn, key, str(value))
        return value

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent). Committed data is already durable."""
        self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncJournal:
    """A ``Journal`` whose every call runs on one dedicated worker thread.

    The event loop never waits on SQLite (or on fsync). Calls run one at a time, in the
    order they were made, so a ``write_batch`` awaited before another call is visible
    to it.
    Cancelling an awaiting caller does not undo a write already handed to the worker.
    """

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexmesh-journal")
        self._closed = False

    @classmethod
    async def open(cls, path: Path | str, **kwargs: Any) -> AsyncJournal:
        """Open ``Journal(path, **kwargs)`` on the worker thread and wrap it."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexmesh-journal")
        loop = asyncio.get_running_loop()
        try:
            journal = await loop.run_in_executor(
                executor, functools.partial(Journal, path, **kwargs)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self = cls.__new__(cls)
        self._journal = journal
        self._executor = executor
        self._closed = False
        return self

    @property
    def path(self) -> Path:
        return self._journal.path

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._closed:
            raise JournalError("journal is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def list_jobs(self, states: Iterable[str] | None = None) -> list[JobRecord]:
        # Materialise here: a generator must not be consumed on the worker thread.
        return await self._call(self._journal.list_jobs, None if states is None else list(states))

    async def list_runs(self, states: Iterable[str] | None = None) -> list[RunRecord]:
        return await self._call(self._journal.list_runs, None if states is None else list(states))

    async def write_batch(self, jobs: Iterable[JobRecord] = (),
                          leases: Iterable[dict[str, Any]] = (),
                          meta: dict[str, str] | None = None, forget_jobs: Iterable[str] = (),
                          forget_leases: Iterable[str] = (), *, runs: Iterable[RunRecord] = (),
                          forget_runs: Iterable[str] = ()) -> None:
        await self._call(functools.partial(
            self._journal.write_batch, list(jobs), list(leases), meta, list(forget_jobs),
            list(forget_leases), runs=list(runs), forget_runs=list(forget_runs)))

    async def list_leases(self) -> list[dict[str, Any]]:
        return await self._call(self._journal.list_leases)

    async def get_meta(self, key: str) -> str | None:
        return await self._call(self._journal.get_meta, key)

    async def bump_meta(self, key: str, at_least: int = 0) -> int:
        return await self._call(self._journal.bump_meta, key, at_least)

    async def close(self) -> None:
        """Close the journal on its worker thread, then stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._journal.close)
        finally:
            # The worker is idle now (calls run in order), so this join is immediate.
            self._executor.shutdown(wait=True)
