"""Working directories jobs carry: packed at the origin, served to owners, fetched, cached
and unpacked into a fresh directory for each run.

Where the fetch sits in a job's life: the owner accepts ``StartJob`` as for any job (the
lease goes ``LENT``, which has no TTL, and the run is journaled ``placed``), and emits
``RunJob``. Carrying out that effect, the runtime first makes the bundle present (from
this node's store: a job submitted here, or one fetched before; else fetched from the
origin, see ``bundlefetch``), unpacks it into ``work_dir/JOB`` owned by the job's user,
and only then starts the process there. While it fetches, the origin's ``JobSync`` hears
``placed``; a cancel or preemption meanwhile ends the run at once on the owner's books,
and the fetch is cancelled as soon as the run is written (``runs_changed``). A fetch that
cannot reach the origin keeps trying while the run is kept (see ``FETCH_PATIENCE``). A
fetch or unpack that fails ends the run ``failed`` with the reason, as a command that
cannot start does. The directory is removed when the process has exited (or never
started).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pwd
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flexmesh.agent import bundlefetch
from flexmesh.agent.bundle import BundleError, Packed, Reader, pack, remove_tree, unpack
from flexmesh.agent.bundlecache import BundleCache, valid_sha
from flexmesh.agent.models import PLACED, RUNNING, JobRecord, RunRecord, job_id_problem
from flexmesh.agent.node.holdings import Holdings
from flexmesh.agent.rpc import Replies
from flexmesh.agent.runtime.statedir import unreachable
from flexmesh.protocol import wire
from flexmesh.protocol.membership import LEFT

if TYPE_CHECKING:
    from flexmesh.agent.runtime.agent import Agent

log = logging.getLogger("flexmesh.agent")

FETCH_CALL_TIMEOUT = 30.0  # seconds for one chunk's call
MEMBER_WAIT = 60.0  # seconds a fetch waits for its origin to be a member (a push-pull)
# A fetch keeps trying, with pauses of at most 5 s, until this many times [jobs]
# orphan_limit (owner_away_limit for an origin that left the mesh: a restart) passed
# since the first failed try in a row. An origin silent that long (a radio shadow) has
# stopped following the run, so the orphan rule has ended it ``preempted`` first (to be
# requeued once the origin is back) and the fetch with it; this bounds an origin that
# follows the run but cannot serve it.
FETCH_PATIENCE = 2


class PayloadError(Exception):
    """A run's working directory cannot be made; the message says why."""


class Payload:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        s = agent.settings
        self.cache = BundleCache(agent.state_dir / "bundles", s.cache_bytes())
        self.work_root = s.work_dir()
        self.holdings = Holdings()  # what this node gossips it holds (bundles and images)
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock)
        # The fetches under way, by job id, with the run each is for.
        self._fetches: dict[str, tuple[RunRecord, asyncio.Task[bundlefetch.Fetched]]] = {}

    async def start(self) -> None:
        """Read the store; remove the directories of runs here that ended while the agent
        was down (only those: ``work_dir`` may be a directory shared with others)."""
        await asyncio.to_thread(self.cache.load)
        self.tell_held(self.holdings.set_bundles(self.cache.recent()))
        if not self.work_root.exists():
            await asyncio.to_thread(self.work_root.mkdir, 0o711, True, True)
            await asyncio.to_thread(os.chmod, self.work_root, 0o711)  # (jobs' users enter)
        if os.geteuid() == 0:  # jobs run as other users: they must reach their directories
            from flexmesh.agent.runtime.processes import lookup_user
            name = self.agent.settings.borrowed_user
            why = unreachable("the work dir", self.work_root, lookup_user(name), name)
            if why:
                log.warning("work_dir_unreachable %s; jobs run as that user fail to start", why)
        for run in list(self.agent.node.owner.runs.values()):
            if run.bundle and run.state not in (PLACED, RUNNING):
                await self.cleanup(self.job_dir(run))

    def _in_use(self) -> set[str]:
        node = self.agent.node
        jobs: list[JobRecord | RunRecord] = [*node.origin.jobs.values(),
                                             *node.owner.runs.values()]
        return {j.bundle for j in jobs if j.bundle and not j.terminal}

    def _evict(self) -> None:
        self.cache.capacity = self.agent.settings.cache_bytes()  # (as reloaded)
        for sha in self.cache.evict(self._in_use()):
            self.agent.count("bundles_evicted")
            log.info("bundle_evicted bundle=%s", sha)
        for name in self.cache.drop_stale_partials():
            log.info("bundle_partial_dropped file=%s", name)
        self.tell_held(self.holdings.set_bundles(self.cache.recent()))

    def tell_held(self, changed: bool) -> None:
        """What this node holds changed: gossip it (placement prefers a holder)."""
        if changed and self.agent.node is not None:
            self.agent.node.held = self.holdings.digest()
            self.agent.node.publish_facts()

    # --- origin: pack at submit, serve to owners ------------------------------------------

    async def pack(self, src: str, uid: int | None) -> Packed:
        """Pack ``src`` for a submitter of ``uid`` (None: unknown, as the agent reads);
        the bundle is pinned until ``unpin``. BundleError says what is wrong."""
        s = self.agent.settings
        reader = await asyncio.to_thread(_reader, uid)
        packed = await asyncio.to_thread(pack, src, self.cache.root, reader,
                                         s.max_bundle_bytes(), s.payload_max_files)
        self.cache.pin(packed.sha256)
        self.cache.add(packed.sha256, packed.size)
        self._evict()
        self.agent.count("bundles_packed")
        return packed

    def unpin(self, sha: str) -> None:
        self.cache.unpin(sha)

    async def serve(self, msg: wire.FetchBundle) -> wire.Message | Replies:
        """A chunk of a bundle of a job submitted here and not ended (with ``through``:
        a stream of them)."""
        jobs = self.agent.node.origin.jobs
        if not any(j.bundle == msg.bundle and not j.terminal for j in jobs.values()):
            return wire.Error(f"no job here that has not ended carries bundle {msg.bundle[:80]}")
        if not self.cache.has(msg.bundle):
            return wire.Error(f"bundle {msg.bundle} is gone from {self.agent.settings.name}")
        cap = self.agent.transport.bulk.chunk_cap()  # (to go out at bulk_rate in time)
        length = min(msg.length, cap or msg.length)
        path = self.cache.path(msg.bundle)
        try:
            if msg.through:
                f = await asyncio.to_thread(open, path, "rb")
                if self.agent.transport.bulk.reserve_stream(length):  # (no await after)
                    self.agent.count("bundle_streams_served")
                    return bundlefetch.chunks(f, msg.bundle, msg.offset, msg.through, length,
                                              lambda: self.agent.count("bundle_chunks_served"))
                f.close()
            data, total = await asyncio.to_thread(bundlefetch.read_chunk, path, msg.offset,
                                                  length)
        except OSError as exc:
            return wire.Error(f"cannot read bundle {msg.bundle}: {exc.strerror or exc}")
        self.agent.count("bundle_chunks_served")
        return wire.BundleChunk(msg.bundle, msg.offset, data, total)

    # --- owner: a run's working directory -------------------------------------------------

    def job_dir(self, job: RunRecord) -> Path:
        """A run's directory: one per attempt, so the removal of an ended run's never
        meets the next run's."""
        return self.work_root / job.id / str(job.attempts)

    async def prepare(self, job: RunRecord, user: tuple[int, int] | None) -> Path:
        """The run's working directory, unpacked from its bundle (fetched if need be)."""
        s = self.agent.settings
        if not valid_sha(job.bundle) or job_id_problem(job.id) is not None:
            raise PayloadError(f"bundle {job.bundle[:80]!r} is not a SHA-256")
        if job.bundle_size > s.max_bundle_bytes():
            raise PayloadError(f"its bundle ({job.bundle_size} bytes) is larger than this "
                               f"node's max_bundle ({s.payload_max_bundle})")
        if not self.cache.has(job.bundle) and job.origin != s.name:
            await self._origin_known(job)
        self.cache.pin(job.bundle)
        try:
            await self._present(job)
            dest = self.job_dir(job)
            await asyncio.to_thread(remove_tree, dest)  # left by an agent that died
            await asyncio.to_thread(dest.parent.mkdir, 0o711, False, True)
            t0 = time.monotonic()
            await asyncio.to_thread(unpack, self.cache.path(job.bundle), dest,
                                    s.max_bundle_bytes(), s.payload_max_files, user)
            log.info("bundle_unpacked bundle=%s job=%s seconds=%.3f", job.bundle, job.id,
                     time.monotonic() - t0)
        except BundleError as exc:
            raise PayloadError(f"unsafe or corrupt bundle: {exc}") from None
        except OSError as exc:
            raise PayloadError(f"cannot unpack its bundle: {exc}") from None
        finally:
            self.cache.unpin(job.bundle)
        return dest

    async def _present(self, job: RunRecord) -> None:
        """The bundle in the store: already here (a hit) or fetched from the origin."""
        async with self._locks[job.bundle]:  # a second run of the same bundle waits
            if self.cache.use(job.bundle):
                self.agent.count("bundle_cache_hits")
                log.info("bundle_cache_hit bundle=%s job=%s", job.bundle, job.id)
                self.tell_held(self.holdings.set_bundles(self.cache.recent()))
                return
            if job.origin == self.agent.settings.name:
                raise PayloadError(f"bundle {job.bundle} is gone from this node's store")
            t0 = time.monotonic()
            try:
                got = await self._fetch(job)
            except (bundlefetch.FetchError, OSError) as exc:
                stopped = isinstance(exc, bundlefetch.FetchError) and exc.stopped
                self.agent.count("bundle_fetches_stopped" if stopped else "bundle_fetches_failed")
                raise PayloadError(f"cannot fetch its bundle from {job.origin}: {exc}") from None
            self.agent.count("bundle_fetches")
            self.agent.count("bundle_fetch_bytes", got.bytes)
            self.agent.count("bundle_fetch_retries", got.retries)
            self.cache.add(job.bundle, job.bundle_size)
            log.info("bundle_fetched bundle=%s job=%s bytes=%d resumed_at=%d retries=%d "
                     "chunks=%d seconds=%.3f", job.bundle, job.id, got.bytes, got.resumed_at,
                     got.retries, got.chunks, time.monotonic() - t0)
            self._evict()

    async def _fetch(self, job: RunRecord) -> bundlefetch.Fetched:
        """Fetch the bundle of ``job`` from its origin, on a task that ``runs_changed``
        cancels once the run is stopped (a pause, or a call that hangs on an origin gone
        silent, would keep it going and the job from being placed here again)."""
        task = asyncio.create_task(bundlefetch.fetch(
            lambda msg: self._call(job.origin, msg),
            bundlefetch.Want(job.bundle, job.bundle_size, job.id),
            self.cache.partial(job.bundle), self.cache.path(job.bundle),
            alive=lambda: self.wanted(job),
            opener=lambda msg: self.agent.transport.stream(job.origin, msg,
                                                           FETCH_CALL_TIMEOUT),
            patience=lambda: self._patience(job),
            retrying=lambda at, why, pause: log.info(
                "bundle_fetch_retry bundle=%s job=%s at=%d pause=%.1f error=%s",
                job.bundle, job.id, at, pause, why)))
        self._fetches[job.id] = (job, task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # (this coroutine was cancelled, not only the fetch)
            raise bundlefetch.FetchError("the job stopped while its bundle was fetched",
                                         stopped=True) from None
        finally:
            if self._fetches.get(job.id, (job, None))[1] is task:
                del self._fetches[job.id]

    def _patience(self, job: RunRecord) -> float:
        """Seconds of failed tries before a fetch gives up: longer than the orphan rule
        keeps the run while its origin is silent (``FETCH_PATIENCE``)."""
        config = self.agent.node.config
        origin = self.agent.node.membership.members.get(job.origin)
        left = origin is not None and origin.state == LEFT
        return FETCH_PATIENCE * (config.owner_away_limit if left else config.orphan_limit)

    def runs_changed(self, job_ids: set[str]) -> None:
        """The node wrote these runs (or jobs): the fetch of one no longer meant to start
        (cancelled, preempted, its origin silent) ends now; its partial file stays."""
        for job_id in job_ids & self._fetches.keys():
            job, task = self._fetches[job_id]
            if not self.wanted(job) and not task.done() and not task.cancelling():
                task.cancel()  # (once: a second cancel would cut its cleanup short)

    async def _origin_known(self, job: RunRecord) -> None:
        """An agent just restarted may be asked to run a job before it has heard of the
        job's origin (it learns members as they gossip or push-pull with it): up to
        ``MEMBER_WAIT`` seconds for it, while the run is still wanted."""
        loop = self.agent.loop
        deadline = loop.time() + MEMBER_WAIT
        while self.wanted(job) and (left := deadline - loop.time()) > 0:
            if await self.agent.transport.member_addr(job.origin, min(1.0, left)):
                return

    async def _call(self, node: str, msg: wire.Message) -> tuple[wire.Message | None, str]:
        member = self.agent.node.membership.members.get(node)
        if member is None:
            return None, f"{node} is not a member"
        return await self.agent.transport.call(member.addr, msg, FETCH_CALL_TIMEOUT, node)

    def wanted(self, job: RunRecord) -> bool:
        """Whether the run is still meant to start (not stopped, not replaced)."""
        run = self.agent.node.owner.runs.get(job.id)
        return run is not None and run.state == PLACED and run.lease_id == job.lease_id

    async def cleanup(self, path: Path) -> None:
        """A run ended (or never started): its working directory goes (and its job's,
        once no run of it has one)."""
        await asyncio.to_thread(remove_tree, path)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(path.parent.rmdir)


def _reader(uid: int | None) -> Reader:
    """Who a workdir is packed for: ``uid`` and its groups (NSS lookups may block)."""
    if uid is None:
        return Reader()
    try:
        entry = pwd.getpwuid(uid)
        gids = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except KeyError:
        gids = frozenset()
    return Reader(uid, gids)
