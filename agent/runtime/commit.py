"""Journal writes from many callers, committed together."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar, assert_never

from flexmesh.agent.models import JobRecord, RunRecord
from flexmesh.agent.node.effects import (
    ForgetJob,
    ForgetLease,
    ForgetRun,
    PersistJob,
    PersistLease,
    PersistRun,
)
from flexmesh.agent.store import AsyncJournal

if TYPE_CHECKING:
    from flexmesh.agent.node import Node

log = logging.getLogger("flexmesh.agent")
T = TypeVar("T")
# The journal writes a node asks for
Persist = PersistJob | PersistRun | PersistLease | ForgetJob | ForgetRun | ForgetLease


RETRY_FIRST, RETRY_MAX = 0.5, 10.0  # seconds between tries of a failed journal write


class JournalWriteError(Exception):
    """A write that could not wait (a submission) failed; the message says why."""


def describe(exc: BaseException) -> str:
    """Why a journal write failed, for a person: a full disk is named as such."""
    text = str(exc) or type(exc).__name__
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "disk is full" in text:
        return f"disk full: {text}"
    return text


def _merge(mine: dict[str, T], forget: set[str], theirs: dict[str, T],
           forgotten: set[str]) -> set[str]:
    """Records of one table, then later ones over them: what is left to forget."""
    for key in forgotten:
        mine.pop(key, None)
    mine.update(theirs)
    return (forget - theirs.keys()) | forgotten


class Batch:
    """Writes not committed yet: records by table and id, what to forget, meta values."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self.runs: dict[str, RunRecord] = {}
        self.leases: dict[str, dict[str, Any]] = {}
        self.meta: dict[str, str] = {}
        self.forget_jobs: set[str] = set()
        self.forget_runs: set[str] = set()
        self.forget_leases: set[str] = set()

    def merge(self, later: Batch) -> None:
        """Add writes that come after these (they win over them)."""
        self.forget_jobs = _merge(self.jobs, self.forget_jobs, later.jobs, later.forget_jobs)
        self.forget_runs = _merge(self.runs, self.forget_runs, later.runs, later.forget_runs)
        self.forget_leases = _merge(self.leases, self.forget_leases, later.leases,
                                    later.forget_leases)
        self.meta.update(later.meta)

    def add(self, eff: Persist) -> None:
        """One journal write the node asked for, after those added before."""
        match eff:
            case ForgetJob():
                self.jobs.pop(eff.job_id, None)
                self.forget_jobs.add(eff.job_id)
            case ForgetRun():
                self.runs.pop(eff.job_id, None)
                self.forget_runs.add(eff.job_id)
            case ForgetLease():
                self.leases.pop(eff.lease_id, None)
                self.forget_leases.add(eff.lease_id)
            case PersistJob():
                self.forget_jobs.discard(eff.job.id)
                self.jobs[eff.job.id] = eff.job
            case PersistRun():
                self.forget_runs.discard(eff.run.id)
                self.runs[eff.run.id] = eff.run
            case PersistLease():
                self.forget_leases.discard(eff.lease.id)
                self.leases[eff.lease.id] = eff.lease.to_dict()
            case _:
                assert_never(eff)

    def drop_jobs(self, ids: list[str]) -> None:
        for job_id in ids:
            self.jobs.pop(job_id, None)


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
        self._batch = Batch()
        self._waiters: list[asyncio.Future[None]] = []
        self._impatient: dict[asyncio.Future[None], list[str]] = {}  # waiter -> its job ids
        self._task: asyncio.Future[None] | None = None
        self.batches = 0
        self.failures = 0  # failed tries, in all
        self.failing_since: float | None = None  # loop time of the first failed try
        self.last_error = ""  # why the last try failed (while failing_since is set)
        self._failures_before = 0  # ``failures`` when the last run of failures began

    def health(self, now: float) -> dict[str, Any]:
        """For the status API: whether writes succeed now, else for how long (``now``:
        loop time) and why they fail; ``failed_tries`` counts them all, since the start."""
        failing = self.failing_since is not None
        return {"ok": not failing, "failed_tries": self.failures,
                "failing_for_s": round(now - self.failing_since, 1)
                if self.failing_since is not None else None,
                "error": self.last_error if failing else ""}

    async def write(self, jobs: Iterable[JobRecord] = (),
                    leases: Iterable[dict[str, Any]] = (),
                    meta: dict[str, str] | None = None, forget_jobs: Iterable[str] = (),
                    forget_leases: Iterable[str] = (), retry: bool = True,
                    runs: Iterable[RunRecord] = (), forget_runs: Iterable[str] = ()) -> None:
        later = Batch()
        later.jobs = {j.id: j for j in jobs}
        later.runs = {r.id: r for r in runs}
        later.leases = {x["id"]: x for x in leases}
        later.meta = dict(meta or {})
        later.forget_jobs, later.forget_runs = set(forget_jobs), set(forget_runs)
        later.forget_leases = set(forget_leases)
        await self.write_batch(later, retry)

    async def write_batch(self, later: Batch, retry: bool = True) -> None:
        """Commit ``later`` with what is pending; return once it is durable."""
        self._batch.merge(later)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        if not retry:
            self._impatient[done] = list(later.jobs)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._commit_loop())
        await done

    def _take(self) -> tuple[Batch, list[asyncio.Future[None]]]:
        batch, waiters = self._batch, self._waiters
        self._batch, self._waiters = Batch(), []
        return batch, waiters

    async def _commit_loop(self) -> None:
        delay = RETRY_FIRST
        try:
            await self._commit_while_waited(delay)
        finally:
            # Nothing left to write (what failed was a submission, refused): writes are
            # not failing now; the next one says whether the disk has room again.
            if not self._waiters and self.failing_since is not None:
                log.warning("journal: nothing left to write after %d failed tries; the "
                            "next write tries again", self.failures - self._failures_before)
                self._failures_before = self.failures
                self.failing_since, self.last_error = None, ""

    async def _commit_while_waited(self, delay: float) -> None:
        while self._waiters:
            batch, waiters = self._take()
            try:
                await self.journal.write_batch(
                    batch.jobs.values(), batch.leases.values(), batch.meta, batch.forget_jobs,
                    batch.forget_leases, runs=batch.runs.values(), forget_runs=batch.forget_runs)
            except Exception as exc:
                self._failed(exc, batch, waiters)
                # What came meanwhile is newer: it goes over the failed batch.
                pending, more = self._take()
                batch.merge(pending)
                self._batch = batch
                self._waiters = [w for w in waiters if not w.done()] + more
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if self.failing_since is not None:
                log.warning("journal writes succeed again (after %d failed tries)",
                            self.failures - self._failures_before)
                self._failures_before = self.failures
                self.failing_since, self.last_error = None, ""
            delay = RETRY_FIRST
            self.batches += 1
            for w in waiters:
                self._impatient.pop(w, None)
                if not w.done():
                    w.set_result(None)

    def _failed(self, exc: Exception, batch: Batch,
                waiters: list[asyncio.Future[None]]) -> None:
        why = describe(exc)
        self.failures += 1
        self.last_error = why
        if self.failing_since is None:
            self.failing_since = asyncio.get_running_loop().time()
            log.error("journal write failed: %s; trying again while something waits to be "
                      "written", why)
        for w in waiters:
            ids = self._impatient.pop(w, None)
            if ids is None:
                continue
            # (also a submitter that gave up: its jobs were never taken)
            batch.drop_jobs(ids)
            if not w.done():
                w.set_exception(JournalWriteError(why))


async def journal(commits: GroupCommit, node: Node, effects: list[Persist]) -> set[str]:
    """The journal writes of one drained batch, durable when this returns: the ids of the
    jobs and runs written."""
    if not effects:
        return set()
    batch = Batch()
    for eff in effects:
        batch.add(eff)
    records: list[JobRecord | RunRecord] = [*batch.jobs.values(), *batch.runs.values()]
    for record in records:
        _stamp(node, record)
    if batch.leases:  # a fencing token or a term is never handed out twice, leases forgotten
        batch.meta = {"token": str(node.leases.token), "max_term": str(node.leases.max_term)}
    await commits.write_batch(batch)
    return {*batch.jobs, *batch.runs}


def _stamp(node: Node, record: JobRecord | RunRecord) -> None:
    """The node keeps its own (monotonic or virtual) time; records carry wall time."""
    record.updated_at = time.time()
    if record.created_at < 1e9:
        record.created_at = record.updated_at
    live: JobRecord | RunRecord | None = (
        node.owner.runs.get(record.id) if isinstance(record, RunRecord)
        else node.origin.jobs.get(record.id))
    if live is not None:
        live.updated_at, live.created_at = record.updated_at, record.created_at
