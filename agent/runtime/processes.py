"""The one place that builds a job's environment, picks the user it runs as, starts and
stops its process, and keeps its output: the owner's side (runs and JobSync answers) and
the origin's (output received from a job followed elsewhere, attempts kept apart)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from flexmesh.agent import supervise
from flexmesh.agent.containers import exit_hint
from flexmesh.agent.devices.discovery import find_npu_smi
from flexmesh.agent.devices.enforcement import job_env_many, visible_env
from flexmesh.agent.jobenv import base_env, job_environment
from flexmesh.agent.jobprocs import describe_exit
from flexmesh.agent.jobs import JobRunner, JobStartError
from flexmesh.agent.models import FAILED, LOST, PREEMPTED, TERMINAL, RunRecord, job_id_problem
from flexmesh.agent.node import JobOutput, RunJob, StopJob
from flexmesh.agent.node.follow import SYNC_CHUNK
from flexmesh.agent.node.owner import MAX_OFFSET
from flexmesh.agent.runtime.containers import ContainerError, Containers
from flexmesh.agent.runtime.payload import PayloadError
from flexmesh.agent.runtime.statedir import unreachable
from flexmesh.agent.runtime.vnpu import VnpuError, Vnpus
from flexmesh.protocol import wire

if TYPE_CHECKING:
    from flexmesh.agent.runtime.agent import Agent

log = logging.getLogger("flexmesh.agent")



class Processes:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.runner = JobRunner(agent.state_dir, self._on_exit)
        self.containers = Containers(agent)
        self.vnpus = Vnpus(find_npu_smi(agent.settings.npu_smi or None), agent.state_dir,
                           Path(agent.settings.npu_dev_dir))
        self._runs: dict[str, str] = {}  # job -> lease of the process it has here
        self._workdirs: dict[str, Path] = {}  # job -> the working directory of that process
        self._starting: set[str] = set()  # jobs whose start is not yet told to the node
        self._early_exits: dict[str, tuple[int | None, str]] = {}  # ... that ended already

    # --- owner: runs --------------------------------------------------------------------

    def owner_env(self, eff: RunJob) -> dict[str, str]:
        """The owner's layer (see ``jobenv``): identity, devices, their limits."""
        job, devices = eff.job, eff.devices
        env = {
            "FLEXMESH_JOB_ID": job.id, "FLEXMESH_DEVICE": ",".join(d.id for d in devices),
            "FLEXMESH_COMPUTE_MILLI": str(job.compute_milli),
            "FLEXMESH_MEMORY_MIB": str(job.memory_mib), "FLEXMESH_ORIGIN": job.origin,
        }
        enforcement = self.agent.sampler.enforcement
        # The MPS daemon the agent found (its pipe directory, when not the default) is the
        # one the job must reach: its environment is clean, not the agent's.
        mps_pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or None
        try:
            env.update(job_env_many(devices, job.compute_milli, job.memory_mib, enforcement,
                                    self.agent.settings.hami_lib or None, mps_pipe))
        except ValueError as exc:
            log.warning("job %s: no limits applied: %s", job.id, exc)
            env.update(visible_env(devices))
        return env

    def _identity(self, job: RunRecord) -> tuple[tuple[int, int] | None, dict[str, str]]:
        """(the user a job runs as, its base environment); NSS lookups may block."""
        user = self.job_user(job)
        uid = os.geteuid() if user is None else user[0]
        return user, base_env(uid, self.agent.settings.job_locale)

    async def run(self, eff: RunJob) -> None:
        job, node, loop = eff.job, self.agent.node, self.agent.loop
        if job.id not in node.origin.jobs:
            # A new attempt here after an earlier one (preempted): keep that output apart.
            await asyncio.to_thread(archive_output, self.runner.job_dir(job.id))
        self._runs[job.id] = job.lease_id
        self._starting.add(job.id)
        cwd = None
        try:
            await asyncio.to_thread(supervise.forget_records, self.runner.job_dir(job.id))
            user, base = await asyncio.to_thread(self._identity, job)
            # In a container the image's own PATH and HOME stand: no base layer.
            env = job_environment({} if job.image else base, job.env, self.owner_env(eff))
            env["FLEXMESH_OUTPUT"] = str(await asyncio.to_thread(self.agent.results.make, job,
                                                                 user))
            if job.bundle:
                await asyncio.to_thread(self._reachable, job, user)  # (stats: off the loop)
                cwd = await self._workdir(job, user)
                env["FLEXMESH_WORKDIR"] = str(cwd)
            command: list[str] = job.command
            if job.image:  # the runtime's client runs as the agent; the job, as its user
                vnpus = await self.vnpus.acquire(job.id, job.lease_id, eff.devices,
                                                 job.compute_milli, job.memory_mib)
                command, env = await asyncio.to_thread(
                    self.containers.command, job, eff.devices, user or (os.geteuid(), os.getegid()),
                    env, self.runner.job_dir(job.id), vnpus)
                user, cwd = None, None
            pid, pid_start = await self.runner.start(job.id, command, env, user=user,
                                                     cwd=None if cwd is None else str(cwd),
                                                     run=job.lease_id, sweep=not job.image)
        except (JobStartError, PayloadError, ContainerError, VnpuError, ValueError,
                OSError) as exc:
            self._runs.pop(job.id, None)
            if job.bundle:
                self._workdirs.pop(job.id, None)
                await self.agent.payload.cleanup(self.agent.payload.job_dir(job))
            await self._container_ended(job.id, job.lease_id)
            await self.agent.results.discard(job)
            why = (f"workdir: {exc}" if isinstance(exc, PayloadError) else f"container: {exc}"
                   if isinstance(exc, ContainerError) else f"vnpu: {exc}"
                   if isinstance(exc, VnpuError) else f"could not start: {exc}")
            # An image job given before this node found its runtime (just restarted, facts
            # of before): handed back to be placed again, not failed.
            again = isinstance(exc, ContainerError) and not self.containers.runtime
            node.job_exited(job.id, None, why, loop.time(), state=PREEMPTED if again
                            else FAILED)
        else:
            node.job_started(job.id, pid, pid_start, loop.time(), lease_id=job.lease_id)
            early = self._early_exits.pop(job.id, None)
            if early is not None:  # it ended before its start was told: now, in order
                self._exited(job.id, *early)
        finally:
            self._starting.discard(job.id)
            self._early_exits.pop(job.id, None)
        await self.agent.flush()

    async def _workdir(self, job: RunRecord, user: tuple[int, int] | None) -> Path:
        """The run's working directory, made from its bundle (see ``payload``)."""
        path = await self.agent.payload.prepare(job, user)
        self._workdirs[job.id] = path
        if not self.agent.payload.wanted(job):  # stopped while its bundle came
            raise PayloadError("stopped before it had started")
        return path

    def _reachable(self, job: RunRecord, user: tuple[int, int] | None) -> None:
        """A job that runs in its workdir fails at once, saying why, where its user cannot
        reach it (a container gets it mounted)."""
        why = None if user is None or job.image else unreachable(
            "the work dir", self.agent.payload.work_root, user)
        if why:
            raise PayloadError(why)

    def job_user(self, job: RunRecord) -> tuple[int, int] | None:
        """(uid, gid) a job runs as; None: as the agent (which then is not root).

        A job submitted here runs as its submitter; root's only if ``allow_root``. Jobs
        borrowed from other nodes, or whose submitter is unknown, run as ``borrowed_user``.
        """
        if os.geteuid() != 0:
            return None  # an unprivileged agent cannot switch users: jobs run as it does
        s = self.agent.settings
        uid = job.uid if job.origin == self.agent.node.name else None
        if uid is None or (uid == 0 and not s.allow_root):
            return lookup_user(s.borrowed_user)
        try:
            return uid, pwd.getpwuid(uid).pw_gid
        except KeyError:
            return uid, uid  # no passwd entry: a group of the same number

    def adopt(self, job: RunRecord) -> bool | None:
        """A process an earlier instance of the agent started, still running? Or one that
        ended while the agent was down, whose supervisor recorded how: its end is told
        as soon as the node has read the journal back. False: it is gone, unknown how;
        None: it was never started (no supervisor was ever given it)."""
        pid, start, job_dir = job.pid, job.pid_start, self.runner.job_dir(job.id)
        if pid is None or start is None:  # started, not yet journaled: its supervisor says
            pid, start = supervise.recorded_pid(job_dir, job.lease_id) or (0, 0)
            if pid and self.runner.adopt(job.id, pid, start, sweep=not job.image):
                self.agent.loop.call_soon(self._started_unjournaled, job, pid, start)
                return self._adopted(job)
            pid, start = 0, 0
        if not pid or not self.runner.adopt(job.id, pid, start, sweep=not job.image):
            code = supervise.recorded_exit(job_dir, job.lease_id)
            if code is None:
                return False if supervise.began(job_dir, job.lease_id) else None
            exit_code, reason = describe_exit(code)
            self.agent.loop.call_soon(self._exited, job.id, exit_code,
                                      f"{reason} (while the agent was down)")
        return self._adopted(job)

    def _adopted(self, job: RunRecord) -> bool:
        self._runs[job.id] = job.lease_id
        if job.bundle:
            self._workdirs[job.id] = self.agent.payload.job_dir(job)
        if job.image:
            self.containers.track(job)
        return True

    def _started_unjournaled(self, job: RunRecord, pid: int, start: int) -> None:
        self.agent.node.job_started(job.id, pid, start, self.agent.loop.time(),
                                    lease_id=job.lease_id)
        self.agent.kick()
    async def start(self) -> None:
        """At start, after the runs of the last instance were adopted (or not): find the
        container runtimes in the background (until then the node gossips none, so it is
        given no job with an image) and clean up the containers not adopted."""
        self.agent.spawn(self._start_containers())

    async def _start_containers(self) -> None:
        # The vNPUs of runs not adopted go once their containers are gone (a destroy
        # fails while a container holds its vNPU).
        await self.containers.start(lambda: list(self._runs))
        await self.vnpus.reconcile_async(dict(self._runs))

    async def _container_ended(self, job_id: str, lease_id: str | None) -> None:
        """A run's container is over: remove it, then destroy its vNPUs."""
        await self.containers.ended(job_id, self.runner.job_dir(job_id))
        await self.vnpus.release_async(job_id, lease_id)

    async def shutdown(self, kill: bool, grace: float) -> None:
        """Stop watching jobs; with ``kill``, stop them (containers through the runtime)."""
        if kill:
            await asyncio.gather(*(self.containers.stop(j, grace, self._stopper(j))
                                   for j in list(self.containers.names)))
        await self.runner.shutdown(kill=kill, grace_s=grace)

    def _stopper(self, job_id: str) -> Callable[[float], Awaitable[bool]]:
        return lambda grace: self.runner.stop(job_id, grace, "agent shutting down")

    async def stop(self, eff: StopJob) -> None:
        """Stop a job's process, if it is still the run the node meant (a later run of the
        same job, started once the earlier one exited, is left alone)."""
        if eff.lease_id and self._runs.get(eff.job_id, eff.lease_id) != eff.lease_id:
            return
        await self.containers.stop(eff.job_id, self.agent.settings.stop_grace,
                                   lambda grace: self.runner.stop(eff.job_id, grace, eff.reason))

    def _on_exit(self, job_id: str, exit_code: int | None, reason: str) -> None:
        if job_id in self.containers.names:
            reason += exit_hint(exit_code)
        if job_id in self._starting:  # a quick job: its exit waits for its start to be told
            self._early_exits[job_id] = (exit_code, reason)
            return
        self._exited(job_id, exit_code, reason)

    def _exited(self, job_id: str, exit_code: int | None, reason: str) -> None:
        """The process ended: its results are packed first, then the node hears of it."""
        run = self.agent.node.owner.runs.get(job_id)
        if run is None or run.terminal or self._runs.get(job_id) != run.lease_id:
            self._ended(job_id, exit_code, reason)
        else:
            self.agent.spawn(self._pack_then_end(replace(run), exit_code, reason))

    async def _pack_then_end(self, run: RunRecord, exit_code: int | None, reason: str) -> None:
        try:
            # Its container goes before its output is packed: one whose client was killed
            # while the runtime's stop hung could still be writing to it.
            if run.id in self.containers.names:
                await self.containers.ended(run.id, self.runner.job_dir(run.id))
            await self.agent.results.pack(run)
        except Exception as exc:  # (never the end lost; a cancel at shutdown packs again)
            log.error("results_pack_failed job=%s error=%r", run.id, exc)
        self._ended(run.id, exit_code, reason)

    def _ended(self, job_id: str, exit_code: int | None, reason: str) -> None:
        lease = self._runs.pop(job_id, None)
        workdir = self._workdirs.pop(job_id, None)
        if workdir is not None:
            self.agent.spawn(self.agent.payload.cleanup(workdir))
        if job_id in self.containers.names or self.vnpus.of_run(job_id):
            self.agent.spawn(self._container_ended(job_id, lease))
        state = LOST if exit_code is None else None
        self.agent.node.job_exited(job_id, exit_code, reason, self.agent.loop.time(),
                                   state=state)
        self.agent.kick()

    async def job_sync(self, msg: wire.JobSync) -> wire.Message:
        """Answer an origin that follows a job run here: hold the call open (up to
        ``wait_ms``, at most 10 s) until there is output past its offsets or the job ends."""
        loop, node = self.agent.loop, self.agent.node
        job = node.owner.runs.get(msg.job_id)
        if job is None or not (0 <= msg.stdout_offset < MAX_OFFSET
                               and 0 <= msg.stderr_offset < MAX_OFFSET):
            return node.sync_reply(msg, b"", b"", SYNC_CHUNK, loop.time())
        deadline = loop.time() + min(max(msg.wait_ms, 0), 10_000) / 1000
        chunk = min(SYNC_CHUNK, self.agent.transport.bulk.chunk_cap(1.0) or SYNC_CHUNK)
        while True:
            state = job.state  # read before the output: output written before it counts
            out = await asyncio.to_thread(self.runner.read_log, job.id, "stdout",
                                          msg.stdout_offset, chunk)
            err = await asyncio.to_thread(self.runner.read_log, job.id, "stderr",
                                          msg.stderr_offset, chunk)
            if out or err or state in TERMINAL or loop.time() >= deadline:
                return node.sync_reply(msg, out, err, chunk, loop.time())
            ev = self.agent.job_event(job.id)
            ev.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), min(0.2, deadline - loop.time()))

    # --- origin: output of jobs followed elsewhere --------------------------------------

    async def archive(self, job_id: str) -> None:
        await asyncio.to_thread(archive_output, self.runner.job_dir(job_id))

    async def write_output(self, eff: JobOutput) -> None:
        await asyncio.to_thread(write_at, self.runner.job_dir(eff.job_id), eff.stream,
                                eff.offset, eff.data)

    async def forget(self, job_id: str) -> None:
        """A job past its retention: its output (every attempt's) is deleted."""
        if job_id_problem(job_id) is None:  # (a peer's run of a bad id never started)
            await asyncio.to_thread(shutil.rmtree, self.runner.job_dir(job_id), True)

    def output_size(self, job_id: str) -> tuple[int, int]:
        """Bytes of stdout and stderr already here for a job (its current attempt)."""
        if job_id_problem(job_id) is not None:
            return 0, 0
        job_dir = self.runner.job_dir(job_id)
        return _size(job_dir / "stdout"), _size(job_dir / "stderr")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def lookup_user(name: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        if name.isdigit():
            return int(name), int(name)
        log.warning("user %r does not exist; running borrowed jobs as 65534 (nobody)", name)
        return 65534, 65534


def archive_output(job_dir: Path) -> None:
    """Move a finished attempt's output to ``stdout.1``, ``stderr.1``, ... beside it."""
    if not (job_dir / "stdout").exists() and not (job_dir / "stderr").exists():
        return
    n = 1
    while (job_dir / f"stdout.{n}").exists() or (job_dir / f"stderr.{n}").exists():
        n += 1
    for stream in ("stdout", "stderr"):
        if (job_dir / stream).exists():
            (job_dir / stream).rename(job_dir / f"{stream}.{n}")


def write_at(job_dir: Path, stream: str, offset: int, data: bytes) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / stream
    mode = "r+b" if path.exists() else "wb"
    with open(path, mode) as f:
        f.seek(offset)
        f.write(data)
