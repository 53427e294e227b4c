"""Noticing that a job process has exited, without blocking and without reaping it.

Each process is watched through a pidfd (``os.pidfd_open``, Linux 5.3+) registered with
``loop.add_reader``: it becomes readable when the process exits, at no cost while it runs,
for any number of jobs. Where pidfds are unavailable the watch falls back to polling
(``waitid(WNOWAIT)`` for children, ``/proc/<pid>/stat`` for adopted processes) every
``poll_interval_s``. What happens next (sweeping, reaping, reporting) is the runner's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from flexmesh.agent.jobprocs import child_has_exited, is_gone

# Under the runner's name, as before this module was split from it: log filters still match.
log = logging.getLogger("flexmesh.agent.jobs")


@dataclass(eq=False)
class JobProcess:
    """One job's process as the runner tracks it, from registration to its report."""

    job_id: str
    pid: int
    pid_start: int
    child: bool  # spawned by this runner (we reap it) or adopted
    tree: bool = False  # a stop signals its processes out of its group too (``escaped``)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    pidfd: int | None = None
    poll_handle: asyncio.TimerHandle | None = None
    stop_reason: str | None = None
    finished: bool = False


class ExitWatch:
    """Calls ``on_exited(job)`` on the loop when a watched process has exited, until the
    job is unwatched (the callback's to do: a pidfd stays readable)."""

    def __init__(self, on_exited: Callable[[JobProcess], None], poll_interval_s: float,
                 use_pidfd: bool | None) -> None:
        self._on_exited = on_exited
        self._poll_interval_s = poll_interval_s
        self._use_pidfd = hasattr(os, "pidfd_open") if use_pidfd is None else use_pidfd

    def open_pidfd(self, pid: int) -> int | None:
        """A pidfd for ``pid``, or None where pidfds are unavailable (from then on the
        watch polls). Raises ProcessLookupError when there is no such process. May be
        called from any thread."""
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

    def watch(self, job: JobProcess, pidfd: int | None) -> None:
        """Watch through ``pidfd`` (then owned by the job), or by polling when None."""
        if pidfd is not None:
            job.pidfd = pidfd
            asyncio.get_running_loop().add_reader(pidfd, self._on_exited, job)
        else:
            self.poll_later(job)

    def poll_later(self, job: JobProcess) -> None:
        job.poll_handle = asyncio.get_running_loop().call_later(
            self._poll_interval_s, self._poll, job
        )

    def unwatch(self, job: JobProcess) -> None:
        """Stop watching; closes the job's pidfd."""
        if job.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(job.pidfd)
            os.close(job.pidfd)
            job.pidfd = None
        if job.poll_handle is not None:
            job.poll_handle.cancel()
            job.poll_handle = None

    def _poll(self, job: JobProcess) -> None:
        job.poll_handle = None
        if child_has_exited(job.pid) if job.child else is_gone(job.pid, job.pid_start):
            self._on_exited(job)
        elif not job.finished:
            self.poll_later(job)
