"""Journal writes from many callers, committed together."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from flexmesh.agent.models import JobRecord
from flexmesh.agent.store import AsyncJournal


class GroupCommit:
    """Journal writes from many callers, committed together: one transaction and one
    fsync per batch. Writes that arrive while a commit runs go into the next batch; each
    caller returns once its own writes are durable. A record forgotten after it was
    written in the same batch is not written; one written again after it was forgotten is."""

    def __init__(self, journal: AsyncJournal) -> None:
        self.journal = journal
        self._jobs: dict[str, JobRecord] = {}
        self._leases: dict[str, dict[str, Any]] = {}
        self._meta: dict[str, str] = {}
        self._forget_jobs: set[str] = set()
        self._forget_leases: set[str] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Future[None] | None = None
        self.batches = 0

    async def write(self, jobs: Iterable[JobRecord] = (),
                    leases: Iterable[dict[str, Any]] = (),
                    meta: dict[str, str] | None = None, forget_jobs: Iterable[str] = (),
                    forget_leases: Iterable[str] = ()) -> None:
        for job in jobs:
            self._jobs[job.id] = job
            self._forget_jobs.discard(job.id)
        for lease in leases:
            self._leases[lease["id"]] = lease
            self._forget_leases.discard(lease["id"])
        for job_id in forget_jobs:
            self._jobs.pop(job_id, None)
            self._forget_jobs.add(job_id)
        for lease_id in forget_leases:
            self._leases.pop(lease_id, None)
            self._forget_leases.add(lease_id)
        self._meta.update(meta or {})
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._commit_loop())
        await done

    async def _commit_loop(self) -> None:
        while self._waiters:
            jobs, leases, meta = self._jobs, self._leases, self._meta
            forget_jobs, forget_leases = self._forget_jobs, self._forget_leases
            waiters = self._waiters
            self._jobs, self._leases, self._meta, self._waiters = {}, {}, {}, []
            self._forget_jobs, self._forget_leases = set(), set()
            try:
                await self.journal.write_batch(jobs.values(), leases.values(), meta,
                                               forget_jobs, forget_leases)
            except Exception as exc:
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            self.batches += 1
            for w in waiters:
                if not w.done():
                    w.set_result(None)
