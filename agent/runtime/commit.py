"""Journal writes from many callers, committed together."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Iterable
from typing import Any

from flexmesh.agent.models import JobRecord
from flexmesh.agent.store import AsyncJournal

log = logging.getLogger("flexmesh.agent")


RETRY_FIRST, RETRY_MAX = 0.5, 10.0  # seconds between tries of a failed journal write


class JournalWriteError(Exception):
    """A write that could not wait (a submission) failed; the message says why."""


def describe(exc: BaseException) -> str:
    """Why a journal write failed, for a person: a full disk is named as such."""
    text = str(exc) or type(exc).__name__
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "disk is full" in text:
        return f"disk full: {text}"
    return text


class GroupCommit:
    """Journal writes from many callers, committed together: one transaction and one
    fsync per batch. Writes that arrive while a commit runs go into the next batch; each
    caller returns once its own writes are durable. A record forgotten after it was
    written in the same batch is not written; one written again after it was forgotten is.

    A batch that fails (a full disk) is tried again, with what came since merged over it,
    until it succeeds: its callers wait, the event loop does not. A caller that cannot wait
    (``retry=False``: a submission, whose user should hear at once) is answered with
    ``JournalWriteError`` instead, and its records leave the batch."""

    def __init__(self, journal: AsyncJournal) -> None:
        self.journal = journal
        self._jobs: dict[str, JobRecord] = {}
        self._leases: dict[str, dict[str, Any]] = {}
        self._meta: dict[str, str] = {}
        self._forget_jobs: set[str] = set()
        self._forget_leases: set[str] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._impatient: dict[asyncio.Future[None], list[str]] = {}  # waiter -> its job ids
        self._task: asyncio.Future[None] | None = None
        self.batches = 0
        self.failures = 0  # failed tries, in all
        self.failing_since: float | None = None  # loop time of the first failed try

    async def write(self, jobs: Iterable[JobRecord] = (),
                    leases: Iterable[dict[str, Any]] = (),
                    meta: dict[str, str] | None = None, forget_jobs: Iterable[str] = (),
                    forget_leases: Iterable[str] = (), retry: bool = True) -> None:
        jobs = list(jobs)
        self._merge({j.id: j for j in jobs}, {x["id"]: x for x in leases}, meta or {},
                    set(forget_jobs), set(forget_leases))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        if not retry:
            self._impatient[done] = [j.id for j in jobs]
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._commit_loop())
        await done

    def _merge(self, jobs: dict[str, JobRecord], leases: dict[str, dict[str, Any]],
               meta: dict[str, str], forget_jobs: set[str], forget_leases: set[str]) -> None:
        """Add writes that come after what is pending (they win over it)."""
        for job_id in forget_jobs:
            self._jobs.pop(job_id, None)
        for lease_id in forget_leases:
            self._leases.pop(lease_id, None)
        self._forget_jobs = (self._forget_jobs - jobs.keys()) | forget_jobs
        self._forget_leases = (self._forget_leases - leases.keys()) | forget_leases
        self._jobs.update(jobs)
        self._leases.update(leases)
        self._meta.update(meta)

    def _take(self) -> tuple[Any, ...]:
        batch = (self._jobs, self._leases, self._meta, self._forget_jobs, self._forget_leases,
                 self._waiters)
        self._jobs, self._leases, self._meta, self._waiters = {}, {}, {}, []
        self._forget_jobs, self._forget_leases = set(), set()
        return batch

    async def _commit_loop(self) -> None:
        delay = RETRY_FIRST
        while self._waiters:
            jobs, leases, meta, forget_jobs, forget_leases, waiters = self._take()
            try:
                await self.journal.write_batch(jobs.values(), leases.values(), meta,
                                               forget_jobs, forget_leases)
            except Exception as exc:
                self._failed(exc, jobs, waiters)
                # What came meanwhile is newer: it goes over the failed batch.
                pending = self._take()
                self._jobs, self._leases, self._meta = jobs, leases, meta
                self._forget_jobs, self._forget_leases = forget_jobs, forget_leases
                self._waiters = [w for w in waiters if not w.done()]
                self._merge(*pending[:5])
                self._waiters += pending[5]
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if self.failing_since is not None:
                log.warning("journal writes succeed again (after %d failed tries)",
                            self.failures)
                self.failing_since = None
            delay = RETRY_FIRST
            self.batches += 1
            for w in waiters:
                self._impatient.pop(w, None)
                if not w.done():
                    w.set_result(None)

    def _failed(self, exc: Exception, jobs: dict[str, JobRecord],
                waiters: list[asyncio.Future[None]]) -> None:
        why = describe(exc)
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = asyncio.get_running_loop().time()
            log.error("journal write failed: %s; trying again until it succeeds", why)
        for w in waiters:
            ids = self._impatient.pop(w, None)
            if ids is None:
                continue
            for job_id in ids:  # (also a submitter that gave up: its jobs were never taken)
                jobs.pop(job_id, None)
            if not w.done():
                w.set_exception(JournalWriteError(why))
