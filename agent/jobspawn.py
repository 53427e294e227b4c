"""Starting one job process: its log files, a session of its own, the user it runs as,
and a message a person can read when it cannot start.

``spawn`` blocks (it creates files, forks and execs): the runner calls it on a worker
thread, so the event loop never waits on it. The command runs without a shell, under its
supervisor (``supervise``: it records the exit status for an agent that restarts), in a
session and process group of its own (``start_new_session=True``): it survives a restart
of the agent and can be signalled as a group. stdout and stderr go straight to
``<job_dir>/stdout`` and ``.../stderr``, opened here in append mode and handed to the child
as file descriptors: the output never flows through the agent.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
from pathlib import Path

from flexmesh.agent import supervise
from flexmesh.agent.jobprocs import pid_start_time

# Under the runner's name, as before this module was split from it: log filters still match.
log = logging.getLogger("flexmesh.agent.jobs")

_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


class JobStartError(Exception):
    """The command could not be started; the message says why, for a person."""


class _Spawned(subprocess.Popen[bytes]):
    """Popen used only to spawn: the runner reaps the child itself, by pid.

    Popen's finaliser would warn about (and later try to reap) a child it has not waited
    for; reaping is the runner's job, so it is turned off.
    """

    def __del__(self) -> None:
        pass


def spawn(job_id: str, job_dir: Path, argv: list[str], env: dict[str, str], cwd: str | None,
          user: tuple[int, int] | None = None, run: str = "",
          sweep: bool = True) -> tuple[int, int]:
    """Open the logs, spawn under the job's supervisor (``supervise``), wait until the
    command is started, read the start time: ``(pid, pid_start)`` of the supervisor, the
    leader of the job's process group. ``run`` (a lease id) is written into the records
    the supervisor leaves, so that a later run's agent never takes them for its own.

    With ``user`` = (uid, gid) the command drops to that user and group (and no
    supplementary groups) before exec; the log files stay the agent's, open in the
    command only as inherited descriptors. ``sweep``: see ``supervise``. Raises
    ``JobStartError``."""
    out, err = _open_logs(job_dir)
    try:
        status = supervise.open_status(job_dir, run)
    except OSError as e:
        os.close(out)
        os.close(err)
        raise JobStartError(f"cannot create {job_dir / supervise.STATUS_FILE}: {e}") from e
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    fds = [err, out, status, ready_w]
    try:
        job_env = supervise.env_fd(env)
        fds.append(job_env)
        wrapped = supervise.wrap(argv, status, ready_w, job_env, _switch_to(user), sweep)
        proc = _popen(wrapped, {}, cwd, out, err, (status, ready_w, job_env))
    except (JobStartError, ValueError, OSError) as e:
        os.close(ready_r)
        if isinstance(e, JobStartError):
            raise
        raise JobStartError(f"cannot start {argv[0]}: {e}") from e
    finally:
        for fd in fds:
            os.close(fd)
    _started(proc.pid, ready_r, argv[0], cwd)
    pid = proc.pid
    # Nobody reaps the child before the runner does, so even if it has exited already
    # it is a zombie: /proc still shows its start time.
    start = pid_start_time(pid)
    if start is None:
        log.warning("job %s: cannot read /proc/%d/stat; start time unknown", job_id, pid)
        start = 0
    try:
        supervise.record_pid(job_dir, pid, start, run)
    except OSError as e:
        log.warning("job %s: cannot record its pid: %s", job_id, e)
    return pid, start


def _started(pid: int, ready: int, program: str, cwd: str | None) -> None:
    """Wait for the supervisor's word that the command runs; else reap it and raise."""
    try:
        word = os.read(ready, 32)
    finally:
        os.close(ready)
    if word == b"ok":
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # it exits at once: no zombie left behind
    if not word.isdigit():
        raise JobStartError(f"cannot start {program}: its supervisor could not start it")
    code = int(word)
    raise JobStartError(_start_error_message(OSError(code, os.strerror(code), program),
                                             program, cwd))


def _switch_to(user: tuple[int, int] | None) -> tuple[int, int] | None:
    """The user and group the command drops to, or None where that is the agent already."""
    if user is not None and user != (os.geteuid(), os.getegid()):
        return user
    return None


def _open_logs(job_dir: Path) -> tuple[int, int]:
    """The job's stdout and stderr files, created 0600 and opened for appending."""
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        out = os.open(job_dir / "stdout", _LOG_FLAGS, 0o600)
    except OSError as e:
        raise JobStartError(f"cannot create the log files in {job_dir}: {e}") from e
    try:
        err = os.open(job_dir / "stderr", _LOG_FLAGS, 0o600)
    except OSError as e:
        os.close(out)
        raise JobStartError(f"cannot create the log files in {job_dir}: {e}") from e
    return out, err


def _popen(argv: list[str], env: dict[str, str], cwd: str | None, out: int, err: int,
           fds: tuple[int, ...]) -> _Spawned:
    try:
        return _Spawned(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            pass_fds=fds,
        )
    except OSError as e:
        raise JobStartError(_start_error_message(e, argv[0], cwd)) from e
    except ValueError as e:  # e.g. an embedded NUL byte
        raise JobStartError(f"cannot start {argv[0]}: {e}") from e


def _start_error_message(e: OSError, program: str, cwd: str | None) -> str:
    in_cwd = cwd is not None and e.filename is not None and os.fsdecode(e.filename) == cwd
    if isinstance(e, FileNotFoundError):
        return f"working directory not found: {cwd}" if in_cwd else f"command not found: {program}"
    if isinstance(e, PermissionError):
        return f"permission denied: {cwd if in_cwd else program}"
    if isinstance(e, NotADirectoryError) or e.errno == errno.ENOTDIR:
        return f"not a directory: {cwd if in_cwd else program}"
    return f"cannot start {program}: {e.strerror or e}"
