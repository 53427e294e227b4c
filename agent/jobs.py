"""Spawn, watch and stop job processes: the runner, which keeps the books (what is
starting, what runs, who has been told it ended). The work on one process is elsewhere:
starting it in ``jobspawn``, noticing its exit in ``jobwatch``, ``/proc``, signals and
reaping in ``jobprocs``, where its output lives in ``joblogs``.

How a job process is run
------------------------
``JobRunner.start`` spawns the command on a small worker thread (``jobspawn``: no shell, a
session of its own, stdout and stderr straight to ``<state_dir>/jobs/<job_id>/stdout`` and
``.../stderr``), so the event loop never waits on ``fork``/``exec``.

How it is watched and reaped
----------------------------
The runner reaps its own children, by pid, and never with ``waitpid(-1)``; it does not use
asyncio's child watchers, so it behaves the same under the default loop and under uvloop,
whose own SIGCHLD handling also waits only for the pids it spawned. Each process is
watched through a pidfd registered with the loop, or by polling where pidfds are
unavailable (``jobwatch``).

When a child exits, the runner first SIGKILLs what is left of its process group (while the
leader is still an unreaped zombie, so the group id cannot have been reused), then reaps it.
An adopted job's group (an earlier agent instance started it) is swept likewise when its
leader ends. Processes that left the group (``setsid``) are kept and then killed by the
job's supervisor (``supervise``: every job started with ``sweep``, the default), and a stop
signals them too (``jobprocs.escaped``), so a job's processes never outlive it. Pass
``kill_group_on_exit=False`` to leave stragglers alone on a normal exit.

Exit codes and reasons
----------------------
``on_exit(job_id, exit_code, reason)`` is called exactly once per job, on the event loop:

* exit status N:          ``exit_code = N``,        reason ``"exited with code N"``
* killed by signal S:     ``exit_code = 128 + S``   (the shell's convention, so it is never
                          negative), reason ``"killed by signal 9 (SIGKILL)"``
* stopped with ``stop``:  the exit code as above, and ``stop``'s reason
* adopted process ended:  as above, from the status its supervisor recorded
                          (``supervise``); where none was (it was killed too, or it was
                          started by an agent without supervisors): ``exit_code = None``,
                          reason ``ADOPTED_EXIT_REASON``
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flexmesh.agent import jobspawn, supervise
from flexmesh.agent.joblogs import STREAMS, check_job_id, check_stream, read_at
from flexmesh.agent.jobprocs import (
    ADOPTED_EXIT_REASON,
    VANISHED_REASON,
    describe_exit,
    is_gone,
    pid_start_time,
    reap_adopted,
    reap_child,
    signal_escaped,
    signal_job,
    sweep_adopted_group,
)
from flexmesh.agent.jobspawn import JobStartError
from flexmesh.agent.jobwatch import ExitWatch, JobProcess

__all__ = [
    "ADOPTED_EXIT_REASON",
    "STREAMS",
    "VANISHED_REASON",
    "JobRunner",
    "JobStartError",
    "describe_exit",
    "pid_start_time",
    "read_at",
]

log = logging.getLogger(__name__)

OnExit = Callable[[str, int | None, str], None]

_START_CANCELLED_REASON = "start was cancelled"
# How long stop() waits for a process after SIGKILL before giving up waiting (a process in
# uninterruptible sleep, e.g. stuck in a GPU driver, dies only when the call returns).
_KILL_WAIT_S = 10.0


@dataclass(eq=False)
class _Pending:
    """A start in flight: resolves to the registered job, or None / the start error."""

    future: asyncio.Future[JobProcess | None]
    cancelled: bool = False


class JobRunner:
    """Starts job processes, watches them and reports each one's end exactly once.

    All methods must be called on the event loop's thread (``log_path`` and ``read_log``
    may be called from any thread). ``on_exit`` runs on the loop; an exception it raises is
    logged and swallowed.
    """

    def __init__(
        self,
        state_dir: Path,
        on_exit: OnExit,
        *,
        kill_group_on_exit: bool = True,
        poll_interval_s: float = 0.5,
        use_pidfd: bool | None = None,
        spawn_threads: int = 4,
    ) -> None:
        self.state_dir = Path(state_dir)
        self._on_exit = on_exit
        self._kill_group_on_exit = kill_group_on_exit
        self._exits = ExitWatch(self._finish, poll_interval_s, use_pidfd)
        self._spawn_threads = spawn_threads
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: dict[str, JobProcess] = {}
        self._starting: dict[str, _Pending] = {}
        self._closed = False

    # -- paths and logs ------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        check_job_id(job_id)
        return self.state_dir / "jobs" / job_id

    def log_path(self, job_id: str, stream: str) -> Path:
        """``<state_dir>/jobs/<job_id>/<stream>``, stream being "stdout" or "stderr"."""
        check_stream(stream)
        return self.job_dir(job_id) / stream

    def read_log(self, job_id: str, stream: str, offset: int = 0, limit: int = 65536) -> bytes:
        """Up to ``limit`` bytes of a job's log from ``offset`` (see ``read_at``)."""
        return read_at(self.log_path(job_id, stream), offset, limit)

    def running(self) -> dict[str, int]:
        """job_id -> pid of every process watched now (started and adopted)."""
        return {job_id: job.pid for job_id, job in self._jobs.items()}

    # -- start ---------------------------------------------------------------------------

    async def start(
        self,
        job_id: str,
        command: Sequence[str],
        env: dict[str, str],
        cwd: str | None = None,
        user: tuple[int, int] | None = None,
        run: str = "",
        sweep: bool = True,
    ) -> tuple[int, int]:
        """Spawn ``command`` with exactly the environment ``env`` (none of the agent's);
        ``run`` names the run in the supervisor's records (``supervise``). With ``sweep``
        the processes that leave the job's group end with it (not for a container's
        runtime client, whose runtime keeps its own processes).

        Returns ``(pid, pid_start)``. Raises ``JobStartError`` when the command cannot be
        started, ``ValueError`` for a bad or already running job id. If the call is
        cancelled while the process is being spawned, the process is killed and reported
        through ``on_exit`` with the reason "start was cancelled".
        """
        if self._closed:
            raise RuntimeError("the job runner is shut down")
        check_job_id(job_id)
        argv = [str(a) for a in command]
        if not argv or not argv[0]:
            raise JobStartError("empty command")
        if job_id in self._jobs or job_id in self._starting:
            raise ValueError(f"job {job_id} is already running")
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self._spawn_threads, thread_name_prefix="flexmesh-spawn"
            )
        pending = _Pending(loop.create_future())
        self._starting[job_id] = pending
        spawn = loop.run_in_executor(self._executor, self._spawn, job_id, argv, dict(env), cwd,
                                     user, run, sweep and self._kill_group_on_exit)
        spawn.add_done_callback(functools.partial(self._on_spawned, job_id, pending, sweep))
        try:
            job = await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            pending.cancelled = True
            if pending.future.done() and not pending.future.exception():
                done_job = pending.future.result()
                if done_job is not None:
                    self._kill_now(done_job, _START_CANCELLED_REASON)
            raise
        assert job is not None
        return job.pid, job.pid_start

    def _spawn(
        self, job_id: str, argv: list[str], env: dict[str, str], cwd: str | None,
        user: tuple[int, int] | None = None, run: str = "", sweep: bool = True,
    ) -> tuple[int, int, int | None]:
        """On a worker thread: spawn (see ``jobspawn.spawn``), then open a pidfd.

        The child is not reaped before the runner does it, so even if it has exited
        already it is a zombie, and pidfd_open cannot hit a reused pid."""
        pid, start = jobspawn.spawn(job_id, self.job_dir(job_id), argv, env, cwd, user, run,
                                    sweep)
        return pid, start, self._exits.open_pidfd(pid)

    def _on_spawned(
        self,
        job_id: str,
        pending: _Pending,
        tree: bool,
        spawn: asyncio.Future[tuple[int, int, int | None]],
    ) -> None:
        """On the loop, when the spawn thread is done: register the process."""
        self._starting.pop(job_id, None)
        if spawn.cancelled():
            pending.future.set_exception(JobStartError(_START_CANCELLED_REASON))
            return
        exc = spawn.exception()
        if exc is not None:
            if pending.cancelled:  # nobody will look at it
                pending.future.set_result(None)
            else:
                pending.future.set_exception(exc)
            return
        pid, pid_start, pidfd = spawn.result()
        job = self._watch(job_id, pid, pid_start, pidfd, child=True, tree=tree)
        pending.future.set_result(job)
        if pending.cancelled:
            self._kill_now(job, _START_CANCELLED_REASON)

    # -- watching ------------------------------------------------------------------------

    def _watch(
        self, job_id: str, pid: int, pid_start: int, pidfd: int | None, *, child: bool,
        tree: bool,
    ) -> JobProcess:
        job = JobProcess(job_id, pid, pid_start, child, tree=tree)
        self._jobs[job_id] = job
        self._exits.watch(job, pidfd)
        return job

    def _finish(self, job: JobProcess) -> None:
        """The process has exited: sweep its group, reap it, report it once."""
        if job.finished:
            return
        job.finished = True
        self._exits.unwatch(job)
        if job.child:
            ended = reap_child(job.pid, self._kill_group_on_exit or job.stop_reason is not None)
            if ended is None:  # not exited after all: keep watching by polling
                job.finished = False
                self._exits.poll_later(job)
                return
            exit_code, reason = ended
        else:
            if self._kill_group_on_exit or job.stop_reason is not None:
                sweep_adopted_group(job.pid, job.pid_start)  # (before a reap frees its id)
            exit_code, reason = reap_adopted(job.pid, job.pid_start)
            recorded = supervise.recorded_exit(self.job_dir(job.job_id))
            if exit_code is None and recorded is not None:  # (its supervisor wrote it)
                exit_code, reason = describe_exit(recorded)
        if job.stop_reason is not None:
            reason = job.stop_reason
        if self._jobs.get(job.job_id) is job:
            del self._jobs[job.job_id]
        try:
            self._on_exit(job.job_id, exit_code, reason)
        except Exception:
            log.exception("job %s: on_exit callback failed", job.job_id)
        finally:
            job.done.set()

    # -- adopt ---------------------------------------------------------------------------

    def adopt(self, job_id: str, pid: int, pid_start: int, sweep: bool = True) -> bool:
        """Watch a process a previous agent instance started (``sweep`` as for ``start``).

        False when the pid is gone, a zombie, or now names another process (its start time
        differs): the caller marks the job lost with ``VANISHED_REASON``. When True,
        ``on_exit(job_id, None, ADOPTED_EXIT_REASON)`` follows when the process ends, and
        ``stop`` works on it. Must be called on the event loop's thread.
        """
        if self._closed:
            raise RuntimeError("the job runner is shut down")
        check_job_id(job_id)
        if job_id in self._jobs or job_id in self._starting:
            raise ValueError(f"job {job_id} is already running")
        asyncio.get_running_loop()  # fail early off the loop
        if pid <= 0:
            return False
        # Open the pidfd first, then check the start time: if the process at `pid` is
        # still the one started at `pid_start`, the pidfd refers to it too.
        try:
            pidfd = self._exits.open_pidfd(pid)
        except ProcessLookupError:
            return False
        if is_gone(pid, pid_start):
            if pidfd is not None:
                os.close(pidfd)
            return False
        self._watch(job_id, pid, pid_start, pidfd, child=False, tree=sweep)
        return True

    # -- stop ----------------------------------------------------------------------------

    def _signal(self, job: JobProcess, sig: signal.Signals) -> None:
        if not job.finished:
            signal_job(job.job_id, job.pid, job.pid_start, job.pidfd, child=job.child, sig=sig)

    async def _signal_all(self, job: JobProcess, sig: signal.Signals) -> None:
        """``sig`` to the job's processes out of its group (read from ``/proc`` on a
        thread), then to its group."""
        try:
            if job.tree and not job.finished:
                await asyncio.to_thread(signal_escaped, job.pid, job.pid_start, sig)
        finally:  # (cancelled, or failed: the group, stopped by it, is signalled anyway)
            self._signal(job, sig)

    def _kill_now(self, job: JobProcess, reason: str) -> None:
        if job.stop_reason is None:
            job.stop_reason = reason
        if job.tree and not job.finished:  # (on the loop: only for a start cancelled)
            signal_escaped(job.pid, job.pid_start, signal.SIGKILL)
        self._signal(job, signal.SIGKILL)

    @staticmethod
    async def _wait_done(job: JobProcess, timeout: float) -> bool:
        try:
            await asyncio.wait_for(job.done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(
        self, job_id: str, grace_s: float = 10.0, reason: str = "stopped by the agent"
    ) -> bool:
        """SIGTERM the job's process group, SIGKILL it after ``grace_s`` seconds.

        ``on_exit`` reports ``reason`` (the first one given, if stopped twice) with the
        process's exit code, and has been called by the time this returns. With
        ``grace_s <= 0`` the group is SIGKILLed at once. Returns False if the job was not
        running here. Works on adopted jobs (their exit code is unknown).
        """
        pending = self._starting.get(job_id)
        if pending is not None:
            try:
                await asyncio.shield(pending.future)
            except Exception:
                return False
        job = self._jobs.get(job_id)
        if job is None:
            return False
        if job.stop_reason is None:
            job.stop_reason = reason
        if grace_s > 0:
            await self._signal_all(job, signal.SIGTERM)
            if await self._wait_done(job, grace_s):
                return True
        await self._signal_all(job, signal.SIGKILL)
        if not await self._wait_done(job, _KILL_WAIT_S):
            log.warning(
                "job %s: pid %d still there %.0f s after SIGKILL", job_id, job.pid, _KILL_WAIT_S
            )
        return True

    # -- shutdown ------------------------------------------------------------------------

    async def shutdown(
        self, kill: bool, grace_s: float = 10.0, reason: str = "agent shutting down"
    ) -> None:
        """Stop accepting work. With ``kill``, stop every job (``stop(grace_s, reason)``);
        without, stop watching them and leave them running, for the next agent instance to
        adopt (no ``on_exit`` is called for them)."""
        self._closed = True
        if self._starting:
            await asyncio.gather(
                *(asyncio.shield(p.future) for p in list(self._starting.values())),
                return_exceptions=True,
            )
        if kill:
            await asyncio.gather(*(self.stop(j, grace_s, reason) for j in list(self._jobs)))
        else:
            for job in list(self._jobs.values()):
                job.finished = True
                self._exits.unwatch(job)
                job.done.set()
            self._jobs.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # idle: every spawn has finished
            self._executor = None

