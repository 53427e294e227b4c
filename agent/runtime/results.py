"""Results: the file work of bringing what a run left under ``$FLEXMESH_OUTPUT`` back to
its origin (the decisions are the node's, ``agent.node.results``).

Owner. Each run gets an output directory of its own, ``work_dir/JOB/N.output`` (N: the
run's number here), made fresh and owned by the job's user; ``FLEXMESH_OUTPUT`` names it
(a container sees it at ``/flexmesh/output``). When the process has exited, before the
node hears of it, the directory is packed (``resultpack``: hostile input, cut at
``[payload] max_results`` and ``max_files``) into ``STATE/results/SHA.tar`` and removed.
An agent that dies half-way packs again when it hears of the exit at restart (the
directory is removed only once packed). The archive is served to the origin in chunks
(``FetchResults``) and deleted once no run here still needs it: the origin said it has it
(``ResultsTaken``), or the run was forgotten.

Origin. ``CollectResults`` brings an archive to ``STATE/jobs/JOB/results/A.tar`` (A: the
job's attempt), fetched chunk by chunk (resumable, a partial file beside it, verified
against its SHA-256) or, from this node's own store, linked. An owner out of reach is
asked again for a while (``COLLECT_ROUNDS``); one that refuses is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from flexmesh.agent import bundlefetch
from flexmesh.agent.bundle import Reader, remove_tree
from flexmesh.agent.bundlecache import valid_sha
from flexmesh.agent.models import TERMINAL, RunRecord, job_id_problem
from flexmesh.agent.node import CollectResults
from flexmesh.agent.node import results as node_results
from flexmesh.agent.resultpack import ResultsPacked, pack_results
from flexmesh.agent.rpc import Replies
from flexmesh.protocol import wire

if TYPE_CHECKING:
    from flexmesh.agent.runtime.agent import Agent

log = logging.getLogger("flexmesh.agent")

CALL_TIMEOUT = 30.0  # seconds for one chunk's call
COLLECT_ROUNDS = 8  # fetches (each with its own retries) before results are given up
ROUND_PAUSE = 5.0  # seconds between them (doubled each time, up to ROUND_PAUSE_MAX)
ROUND_PAUSE_MAX = 60.0


class Results:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.store = agent.state_dir / "results"
        self._collecting: set[tuple[str, int]] = set()
        self._packing = 0  # packs in flight: their files are not the sweep's yet

    async def start(self) -> None:
        """Remove output directories of runs that ended (and were packed, or never will
        be); fetch what was being fetched when the agent stopped; drop unwanted archives."""
        await asyncio.to_thread(self.store.mkdir, 0o700, True, True)
        for run in list(self.agent.node.owner.runs.values()):
            if run.state in TERMINAL:
                await self._remove(self.output_dir(run))
        for eff in node_results.pending(self.agent.node.origin):
            self.agent.spawn(self.collect(eff))
        await self.sweep()

    # --- owner ----------------------------------------------------------------------------

    def output_dir(self, run: RunRecord) -> Path:
        return self.agent.payload.work_root / run.id / f"{run.attempts}.output"

    def make(self, run: RunRecord, user: tuple[int, int] | None) -> Path:
        """A fresh output directory for a run, its user's (blocking: call on a thread)."""
        dest = self.output_dir(run)
        remove_tree(dest)  # (left by an agent that died)
        dest.parent.mkdir(0o711, parents=True, exist_ok=True)
        dest.mkdir(0o700)
        if user is not None:
            os.chown(dest, *user)
        return dest

    async def discard(self, run: RunRecord) -> None:
        """A run that never started: its output directory goes."""
        if job_id_problem(run.id) is None:
            await self._remove(self.output_dir(run))

    async def pack(self, run: RunRecord) -> None:
        """Pack a run's output directory (if it has one), tell the node, remove it."""
        src = self.output_dir(run)
        if job_id_problem(run.id) is not None or not await asyncio.to_thread(src.is_dir):
            return
        self._packing += 1
        try:
            await self._pack(run, src)
        finally:
            self._packing -= 1
        await self._remove(src)

    async def _pack(self, run: RunRecord, src: Path) -> None:
        s = self.agent.settings
        try:
            reader = await asyncio.to_thread(self._reader, run)
            packed: ResultsPacked | None = await asyncio.to_thread(
                pack_results, src, self.store, reader, s.max_results_bytes(),
                s.payload_max_files)
        except OSError as exc:
            packed = None
            note = f"results could not be packed: {exc.strerror or exc}"
            self.agent.count("results_pack_failed")
            log.warning("results_pack_failed job=%s error=%s", run.id, exc)
        if packed is not None:
            note = packed.note
            self.agent.count("results_packed")
            log.info("results_packed job=%s bytes=%d files=%d %s", run.id, packed.size,
                     packed.files, note)
        node_results.packed(self.agent.node, run.id, run.lease_id,
                            packed.sha256 if packed else "", packed.size if packed else 0,
                            note)

    def _reader(self, run: RunRecord) -> Reader:
        """Who the output is packed for: the job's user (none: the agent's own)."""
        user = self.agent.processes.job_user(run)
        if user is None:
            return Reader()
        try:
            gids = frozenset(os.getgrouplist(pwd.getpwuid(user[0]).pw_name, user[1]))
        except KeyError:
            gids = frozenset({user[1]})
        return Reader(user[0], gids)

    async def _remove(self, path: Path) -> None:
        await asyncio.to_thread(remove_tree, path)
        with contextlib.suppress(OSError):  # (the job's directory, once it is empty)
            await asyncio.to_thread(path.parent.rmdir)

    async def serve(self, msg: wire.FetchResults) -> wire.Message | Replies:
        """A chunk of the results of a run here, for its origin (with ``through``: a
        stream of them)."""
        if not node_results.served(self.agent.node, msg) or not valid_sha(msg.results):
            return wire.Error(f"no run of {msg.job_id[:80]} here has results "
                              f"{msg.results[:80]} to give")
        cap = self.agent.transport.bulk.chunk_cap()  # (to go out at bulk_rate in time)
        length = min(msg.length, cap or msg.length)
        path = self._archive(msg.results)
        try:
            if msg.through:
                f = await asyncio.to_thread(open, path, "rb")
                if self.agent.transport.bulk.reserve_stream(length):  # (no await after)
                    self.agent.count("results_streams_served")
                    return bundlefetch.chunks(f, msg.results, msg.offset, msg.through,
                                              length, lambda: self.agent.count(
                                                  "results_chunks_served"))
                f.close()
            data, total = await asyncio.to_thread(bundlefetch.read_chunk, path, msg.offset,
                                                  length)
        except OSError as exc:
            return wire.Error(f"cannot read results {msg.results}: {exc.strerror or exc}")
        self.agent.count("results_chunks_served")
        return wire.BundleChunk(msg.results, msg.offset, data, total)

    def _archive(self, sha: str) -> Path:
        return self.store / f"{sha}.tar"

    async def sweep(self) -> None:
        """Delete the archives no run here needs any more; none while a pack is under
        way (its temporary file, or its archive before the node has heard of it, would
        look unwanted): a later sweep takes them."""
        node = self.agent.node
        if self._packing:
            return
        names = await asyncio.to_thread(os.listdir, self.store)
        for name in names:
            sha = name.removesuffix(".tar")
            if name.startswith(".pack-") or (valid_sha(sha) and name.endswith(".tar")
                                             and not node_results.wanted(node, sha)):
                await asyncio.to_thread((self.store / name).unlink, True)

    # --- origin ---------------------------------------------------------------------------

    def archive_path(self, job_id: str, attempt: int) -> Path:
        """Where the results of an attempt of a job submitted here are kept."""
        return self.agent.processes.runner.job_dir(job_id) / "results" / f"{attempt}.tar"

    async def collect(self, eff: CollectResults) -> None:
        key = (eff.job_id, eff.attempt)
        if key in self._collecting:
            return
        self._collecting.add(key)
        try:
            error = await self._collect(eff)
        finally:
            self._collecting.discard(key)
        if error:
            log.warning("results_failed job=%s attempt=%d error=%s", eff.job_id, eff.attempt,
                        error)
        node_results.collected(self.agent.node, eff.job_id, eff.attempt, eff.sha, error)
        await self.agent.flush()

    async def _collect(self, eff: CollectResults) -> str:
        """Bring the archive here; "" or why it cannot be."""
        if job_id_problem(eff.job_id) is not None or not valid_sha(eff.sha):
            return "results named by an invalid job id or SHA-256"
        dest = self.archive_path(eff.job_id, eff.attempt)
        await asyncio.to_thread(dest.parent.mkdir, 0o700, True, True)
        if eff.node == self.agent.node.name:
            try:
                await asyncio.to_thread(_link, self._archive(eff.sha), dest)
            except OSError as exc:
                return f"results could not be kept: {exc.strerror or exc}"
            node_results.taken(self.agent.node, wire.ResultsTaken(eff.job_id, eff.sha))
            await self.sweep()
            return ""
        limit = self.agent.settings.max_results_bytes()
        if eff.size > limit:
            return (f"results of {eff.size} bytes are larger than this node's max_results "
                    f"({self.agent.settings.payload_max_results})")
        error = await self._fetch(eff, dest)
        if not error:
            self.agent.spawn(self._tell_taken(eff))
        return error

    async def _fetch(self, eff: CollectResults, dest: Path) -> str:
        want = bundlefetch.Want(eff.sha, eff.size, eff.job_id, peer=f"owner {eff.node}")
        partial = dest.with_suffix(".part")
        pause = ROUND_PAUSE
        for round_ in range(COLLECT_ROUNDS):
            try:
                got = await bundlefetch.fetch(
                    lambda msg: self._call(eff.node, msg), want, partial, dest,
                    ask=lambda offset, length: wire.FetchResults(eff.job_id, eff.sha, offset,
                                                                 length),
                    opener=lambda msg: self.agent.transport.stream(eff.node, msg,
                                                                   CALL_TIMEOUT))
            except bundlefetch.FetchError as exc:
                if exc.refused or round_ == COLLECT_ROUNDS - 1:
                    return f"results could not be fetched from {eff.node}: {exc}"
                await asyncio.sleep(pause)
                pause = min(pause * 2, ROUND_PAUSE_MAX)
                continue
            except OSError as exc:
                return f"results could not be kept: {exc.strerror or exc}"
            self.agent.count("results_fetch_bytes", got.bytes)
            log.info("results_fetched job=%s attempt=%d bytes=%d resumed_at=%d",
                     eff.job_id, eff.attempt, got.bytes, got.resumed_at)
            return ""
        return f"results could not be fetched from {eff.node}"

    async def _call(self, node: str, msg: wire.Message) -> tuple[wire.Message | None, str]:
        member = self.agent.node.membership.members.get(node)
        if member is None:
            return None, f"{node} is not a member"
        return await self.agent.transport.call(member.addr, msg, CALL_TIMEOUT, node)

    async def _tell_taken(self, eff: CollectResults) -> None:
        """Tell the owner its copy may go (a few tries; else it goes with its run)."""
        pause = ROUND_PAUSE
        for _ in range(COLLECT_ROUNDS):
            reply, _error = await self._call(eff.node, wire.ResultsTaken(eff.job_id, eff.sha))
            if reply is not None:
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, ROUND_PAUSE_MAX)


def _link(src: Path, dest: Path) -> None:
    """``src`` at ``dest`` too: a hard link, or a copy across file systems."""
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        tmp = dest.with_suffix(".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
