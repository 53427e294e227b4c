"""Spawn, watch and stop job processes.

How a job process is run
------------------------
``JobRunner.start`` spawns the command (no shell) on a small worker thread, so the event
loop never waits on ``fork``/``exec``. The child gets its own session and process group
(``start_new_session=True``): it survives a restart of the agent and can be signalled as a
group. stdout and stderr go straight to ``<state_dir>/jobs/<job_id>/stdout`` and
``.../stderr`` (opened by the runner in append mode and handed to the child as file
descriptors; the output never flows through the agent).

How it is watched and reaped
----------------------------
The runner reaps its own children, by pid, and never with ``waitpid(-1)``; it does not use
asyncio's child watchers, so it behaves the same under the default loop and under uvloop,
whose own SIGCHLD handling also waits only for the pids it spawned. Each process is
watched through a pidfd (``os.pidfd_open``, Linux 5.3+) registered with
``loop.add_reader``: it becomes readable when the process exits, at no cost while it runs,
for any number of jobs. Where pidfds are unavailable the runner falls back to polling
(``waitid(WNOWAIT)`` for children, ``/proc/<pid>/stat`` for adopted processes) every
``poll_interval_s``.

When a child exits, the runner first SIGKILLs what is left of its process group (while the
leader is still an unreaped zombie, so the group id cannot have been reused), then reaps it.
A job's processes therefore never outlive it, except those that left the group with
``setsid``; pass ``kill_group_on_exit=False`` to leave stragglers alone on a normal exit.

Exit codes and reasons
----------------------
``on_exit(job_id, exit_code, reason)`` is called exactly once per job, on the event loop:

* exit status N:          ``exit_code = N``,        reason ``"exited with code N"``
* killed by signal S:     ``exit_code = 128 + S``   (the shell's convention, so it is never
                          negative), reason ``"killed by signal 9 (SIGKILL)"``
* stopped with ``stop``:  the exit code as above, and ``stop``'s reason
* adopted process ended:  ``exit_code = None``, reason ``ADOPTED_EXIT_REASON``
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from flexmesh.agent.models import job_id_problem

__all__ = [
    "ADOPTED_EXIT_REASON",
    "STREAMS",
    "VANISHED_REASON",
    "JobRunner",
    "JobStartError",
    "describe_exit",
    "pid_start_time",
]

log = logging.getLogger(__name__)

OnExit = Callable[[str, int | None, str], None]

STREAMS = ("stdout", "stderr")

ADOPTED_EXIT_REASON = "process exited while not a child of this agent; exit code unknown"
# For the caller, when adopt() returns False.
VANISHED_REASON = "process vanished while the agent was down"

_START_CANCELLED_REASON = "start was cancelled"
# How long stop() waits for a process after SIGKILL before giving up waiting (a process in
# uninterruptible sleep, e.g. stuck in a GPU driver, dies only when the call returns).
_KILL_WAIT_S = 10.0


class JobStartError(Exception):
    """The command could not be started; the message says why, for a person."""


class _Stat(NamedTuple):
    state: str
    start: int


def _read_stat(pid: int) -> _Stat | None:
    """State (field 3) and start time (field 22) from ``/proc/<pid>/stat``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold ")" or spaces.
    fields = data[data.rfind(b")") + 1 :].split()
    try:
        return _Stat(fields[0].decode("ascii", "replace"), int(fields[19]))
    except (IndexError, ValueError):
        return None


def pid_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22).

    With the pid, it names one process: a pid reused by another process has a different
    start time. None when there is no such process.
    """
    stat = _read_stat(pid)
    return None if stat is None else stat.start


def describe_exit(returncode: int) -> tuple[int, str]:
    """``(exit_code, reason)`` for a ``subprocess``-style return code (-S for signal S)."""
    if returncode >= 0:
        return returncode, f"exited with code {returncode}"
    sig = -returncode
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return 128 + sig, f"killed by signal {sig} ({name})"


class _Spawned(subprocess.Popen[bytes]):
    """Popen used only to spawn: the runner reaps the child itself, by pid.

    Popen's finaliser would warn about (and later try to reap) a child it has not waited
    for; reaping is the runner's job, so it is turned off.
    """

    def __del__(self) -> None:
        pass


@dataclass(eq=False)
class _Job:
    job_id: str
    pid: int
    pid_start: int
    child: bool  # spawned by this runner (we reap it) or adopted
    done: asyncio.Event = field(default_factory=asyncio.Event)
    pidfd: int | None = None
    poll_handle: asyncio.TimerHandle | None = None
    stop_reason: str | None = None
    finished: bool = False


@dataclass(eq=False)
class _Pending:
    """A start in flight: resolves to the registered job, or None / the start error."""

    future: asyncio.Future[_Job | None]
    cancelled: bool = False


def _check_job_id(job_id: str) -> None:
    problem = job_id_problem(job_id)
    if problem is not None:
        raise ValueError(problem)


def _check_stream(stream: str) -> None:
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {', '.join(STREAMS)}, not {stream!r}")


def read_at(path: Path, offset: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of the file at ``path`` from ``offset``; b"" past the end or
    when there is no file (yet). Blocking file I/O: call it off the loop for large reads."""
    if offset < 0 or limit < 0:
        raise ValueError("offset and limit must not be negative")
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


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
        self._poll_interval_s = poll_interval_s
        self._use_pidfd = hasattr(os, "pidfd_open") if use_pidfd is None else use_pidfd
        self._spawn_threads = spawn_threads
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: dict[str, _Job] = {}
        self._starting: dict[str, _Pending] = {}
        self._closed = False

    # -- paths and logs ------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        _check_job_id(job_id)
        return self.state_dir / "jobs" / job_id

    def log_path(self, job_id: str, stream: str) -> Path:
        """``<state_dir>/jobs/<job_id>/<stream>``, stream being "stdout" or "stderr"."""
        _check_stream(stream)
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
    ) -> tuple[int, int]:
        """Spawn ``command`` with the agent's environment plus ``env``.

        Returns ``(pid, pid_start)``. Raises ``JobStartError`` when the command cannot be
        started, ``ValueError`` for a bad or already running job id. If the call is
        cancelled while the process is being spawned, the process is killed and reported
        through ``on_exit`` with the reason "start was cancelled".
        """
        if self._closed:
            raise RuntimeError("the job runner is shut down")
        _check_job_id(job_id)
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
        merged_env = {**os.environ, **env}
        spawn = loop.run_in_executor(self._executor, self._spawn, job_id, argv, merged_env, cwd,
                                     user)
        spawn.add_done_callback(functools.partial(self._on_spawned, job_id, pending))
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
        user: tuple[int, int] | None = None,
    ) -> tuple[int, int, int | None]:
        """On a worker thread: open the logs, spawn, read the start time, open a pidfd.

        With ``user`` = (uid, gid) the child drops to that user and group (and no
        supplementary groups) before exec; the log files stay the agent's, open in the
        child only as inherited descriptors."""
        drop: dict[str, object] = {}
        if user is not None and user != (os.geteuid(), os.getegid()):
            drop = {"user": user[0], "group": user[1], "extra_groups": []}
        job_dir = self.job_dir(job_id)
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            out = os.open(job_dir / "stdout", flags, 0o600)
        except OSError as e:
            raise JobStartError(f"cannot create the log files in {job_dir}: {e}") from e
        try:
            try:
                err = os.open(job_dir / "stderr", flags, 0o600)
            except OSError as e:
                raise JobStartError(f"cannot create the log files in {job_dir}: {e}") from e
            try:
                proc = _Spawned(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    close_fds=True,
                    **drop,  # type: ignore[arg-type]
                )
            except OSError as e:
                raise JobStartError(_start_error_message(e, argv[0], cwd)) from e
            except ValueError as e:  # e.g. an embedded NUL byte
                raise JobStartError(f"cannot start {argv[0]}: {e}") from e
            finally:
                os.close(err)
        finally:
            os.close(out)
        pid = proc.pid
        # Nobody reaps the child before the runner does, so even if it has exited already
        # it is a zombie: /proc still shows its start time and pidfd_open cannot hit a
        # reused pid.
        start = pid_start_time(pid)
        if start is None:
            log.warning("job %s: cannot read /proc/%d/stat; start time unknown", job_id, pid)
            start = 0
        pidfd = self._open_pidfd(pid)
        return pid, start, pidfd

    def _open_pidfd(self, pid: int) -> int | None:
        if not self._use_pidfd:
            return None
        try:
            return os.pidfd_open(pid)
        except ProcessLookupError:
            raise
        except OSError as e:
            log.warning("pidfd_open unavailable (%s); watching processes by polling", e)
            self._use_pidfd = False
            return None

    def _on_spawned(
        self,
        job_id: str,
        pending: _Pending,
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
        job = self._watch(job_id, pid, pid_start, pidfd, child=True)
        pending.future.set_result(job)
        if pending.cancelled:
            self._kill_now(job, _START_CANCELLED_REASON)

    # -- watching ------------------------------------------------------------------------

    def _watch(
        self, job_id: str, pid: int, pid_start: int, pidfd: int | None, *, child: bool
    ) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(job_id, pid, pid_start, child)
        self._jobs[job_id] = job
        if pidfd is not None:
            job.pidfd = pidfd
            loop.add_reader(pidfd, self._finish, job)
        else:
            job.poll_handle = loop.call_later(self._poll_interval_s, self._poll, job)
        return job

    def _unwatch(self, job: _Job) -> None:
        if job.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(job.pidfd)
            os.close(job.pidfd)
            job.pidfd = None
        if job.poll_handle is not None:
            job.poll_handle.cancel()
            job.poll_handle = None

    def _poll(self, job: _Job) -> None:
        job.poll_handle = None
        if self._has_exited(job):
            self._finish(job)
        elif not job.finished:
            job.poll_handle = asyncio.get_running_loop().call_later(
                self._poll_interval_s, self._poll, job
            )

    def _has_exited(self, job: _Job) -> bool:
        if job.child:
            try:
                info = os.waitid(os.P_PID, job.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            return info is not None
        stat = _read_stat(job.pid)
        return stat is None or stat.start != job.pid_start or stat.state in ("Z", "X")

    def _finish(self, job: _Job) -> None:
        """The process has exited: sweep its group, reap it, report it once."""
        if job.finished:
            return
        job.finished = True
        self._unwatch(job)
        exit_code: int | None = None
        reason = ADOPTED_EXIT_REASON
        if job.child:
            if self._kill_group_on_exit or job.stop_reason is not None:
                # The leader is an unreaped zombie, so its group id is still taken.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(job.pid, signal.SIGKILL)
            try:
                pid, status = os.waitpid(job.pid, os.WNOHANG)
            except ChildProcessError:
                reason = "process exited; its exit status was collected by someone else"
            else:
                if pid == 0:  # not exited after all: keep watching by polling
                    job.finished = False
                    job.poll_handle = asyncio.get_running_loop().call_later(
                        self._poll_interval_s, self._poll, job
                    )
                    return
                exit_code, reason = describe_exit(os.waitstatus_to_exitcode(status))
        else:
            # An adopted process is normally not our child; if it is (adopted back in the
            # same process), reap it so it does not linger as a zombie, and say what we know.
            # Only while /proc still shows the same process: never reap a reused pid.
            stat = _read_stat(job.pid)
            if stat is not None and stat.start == job.pid_start:
                with contextlib.suppress(ChildProcessError):
                    pid, status = os.waitpid(job.pid, os.WNOHANG)
                    if pid == job.pid:
                        exit_code, reason = describe_exit(os.waitstatus_to_exitcode(status))
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

    def adopt(self, job_id: str, pid: int, pid_start: int) -> bool:
        """Watch a process a previous agent instance started.

        False when the pid is gone, a zombie, or now names another process (its start time
        differs): the caller marks the job lost with ``VANISHED_REASON``. When True,
        ``on_exit(job_id, None, ADOPTED_EXIT_REASON)`` follows when the process ends, and
        ``stop`` works on it. Must be called on the event loop's thread.
        """
        if self._closed:
            raise RuntimeError("the job runner is shut down")
        _check_job_id(job_id)
        if job_id in self._jobs or job_id in self._starting:
            raise ValueError(f"job {job_id} is already running")
        asyncio.get_running_loop()  # fail early off the loop
        if pid <= 0:
            return False
        # Open the pidfd first, then check the start time: if the process at `pid` is
        # still the one started at `pid_start`, the pidfd refers to it too.
        try:
            pidfd = self._open_pidfd(pid)
        except ProcessLookupError:
            return False
        stat = _read_stat(pid)
        if stat is None or stat.start != pid_start or stat.state in ("Z", "X"):
            if pidfd is not None:
                os.close(pidfd)
            return False
        self._watch(job_id, pid, pid_start, pidfd, child=False)
        return True

    # -- stop ----------------------------------------------------------------------------

    def _signal(self, job: _Job, sig: signal.Signals) -> None:
        if job.finished:
            return
        if not job.child:
            # Not our child: it may have ended and its pid been reused since we last looked.
            stat = _read_stat(job.pid)
            if stat is None or stat.start != job.pid_start:
                return
        with contextlib.suppress(ProcessLookupError):
            try:
                os.killpg(job.pid, sig)
            except PermissionError as e:
                log.warning("job %s: cannot signal process group %d: %s", job.job_id, job.pid, e)
        # The leader too, in case it left its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if job.pidfd is not None:
                signal.pidfd_send_signal(job.pidfd, sig)
            elif job.child:
                os.kill(job.pid, sig)

    def _kill_now(self, job: _Job, reason: str) -> None:
        if job.stop_reason is None:
            job.stop_reason = reason
        self._signal(job, signal.SIGKILL)

    @staticmethod
    async def _wait_done(job: _Job, timeout: float) -> bool:
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
            self._signal(job, signal.SIGTERM)
            if await self._wait_done(job, grace_s):
                return True
        self._signal(job, signal.SIGKILL)
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
                self._unwatch(job)
                job.done.set()
            self._jobs.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # idle: every spawn has finished
            self._executor = None


def _start_error_message(e: OSError, program: str, cwd: str | None) -> str:
    in_cwd = cwd is not None and e.filename is not None and os.fsdecode(e.filename) == cwd
    if isinstance(e, FileNotFoundError):
        return f"working directory not found: {cwd}" if in_cwd else f"command not found: {program}"
    if isinstance(e, PermissionError):
        return f"permission denied: {cwd if in_cwd else program}"
    if isinstance(e, NotADirectoryError) or e.errno == errno.ENOTDIR:
        return f"not a directory: {cwd if in_cwd else program}"
    return f"cannot start {program}: {e.strerror or e}"
