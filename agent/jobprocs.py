"""One job process seen from outside: its ``/proc`` entry, how it ended, signalling its
process group, reaping it.

Plain functions of a pid and the start time that, with the pid, names one process; no
asyncio and no bookkeeping: ``jobs.JobRunner`` decides when each is called. A process the
runner did not spawn (adopted after a restart of the agent) is not its child, and its pid
may have been reused since the runner last looked: every step on one first checks that
the start time still matches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import NamedTuple

# Under the runner's name, as before this module was split from it: log filters still match.
log = logging.getLogger("flexmesh.agent.jobs")

ADOPTED_EXIT_REASON = "process exited while not a child of this agent; exit code unknown"
# For the caller, when adopt() returns False.
VANISHED_REASON = "process vanished while the agent was down"


class ProcStat(NamedTuple):
    state: str
    start: int


def read_stat(pid: int) -> ProcStat | None:
    """State (field 3) and start time (field 22) from ``/proc/<pid>/stat``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold ")" or spaces.
    fields = data[data.rfind(b")") + 1 :].split()
    try:
        return ProcStat(fields[0].decode("ascii", "replace"), int(fields[19]))
    except (IndexError, ValueError):
        return None


def pid_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22).

    With the pid, it names one process: a pid reused by another process has a different
    start time. None when there is no such process.
    """
    stat = read_stat(pid)
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


def is_gone(pid: int, pid_start: int) -> bool:
    """Whether the process started at ``pid_start`` has ended (or is a zombie), judged by
    ``/proc`` alone: for processes that are not our children."""
    stat = read_stat(pid)
    return stat is None or stat.start != pid_start or stat.state in ("Z", "X")


def child_has_exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited; it is left unreaped (``WNOWAIT``)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def reap_child(pid: int, sweep_group: bool) -> tuple[int | None, str] | None:
    """Reap our exited child: ``(exit_code, reason)``, or None if it has not exited after
    all. With ``sweep_group``, SIGKILL what is left of its process group first."""
    if sweep_group:
        # The leader is an unreaped zombie, so its group id is still taken.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None, "process exited; its exit status was collected by someone else"
    if reaped == 0:
        return None
    return describe_exit(os.waitstatus_to_exitcode(status))


def sweep_adopted_group(pid: int, pid_start: int) -> None:
    """SIGKILL what is left of the process group of an adopted job whose leader (``pid``,
    started at ``pid_start``) has ended. The kernel gives no new process a pid that is
    still a group's id, so while the group has members it is the job's; only a live
    process at ``pid`` that started at another time (the group emptied, the pid reused)
    makes it someone else's, and then nothing is sent."""
    stat = read_stat(pid)
    if stat is not None and stat.start != pid_start:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def reap_adopted(pid: int, pid_start: int) -> tuple[int | None, str]:
    """``(exit_code, reason)`` for an adopted process that has ended.

    An adopted process is normally not our child; if it is (adopted back in the same
    process), reap it so it does not linger as a zombie, and say what we know. Only while
    /proc still shows the same process: never reap a reused pid.
    """
    stat = read_stat(pid)
    if stat is not None and stat.start == pid_start:
        with contextlib.suppress(ChildProcessError):
            reaped, status = os.waitpid(pid, os.WNOHANG)
            if reaped == pid:
                return describe_exit(os.waitstatus_to_exitcode(status))
    return None, ADOPTED_EXIT_REASON


ESCAPE_PASSES = 20  # rounds of SIGKILL for processes that left a job's group, at most


def escaped(pid: int) -> list[int]:
    """The live descendants of ``pid`` (by ``/proc``'s parent links) that are not in its
    process group: the job's processes that left it (``setsid``). A job's supervisor is a
    child subreaper (``supervise``), so they stay its descendants when their parent ends."""
    kids: dict[int, list[tuple[int, bool]]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            state, ppid, pgrp = data[data.rfind(b")") + 2:].split()[:3]
            kids.setdefault(int(ppid), []).append(
                (int(name), int(pgrp) != pid and state not in (b"Z", b"X")))
        except (OSError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        for kid, out in kids.get(todo.pop(), ()):
            todo.append(kid)
            if out:
                found.append(kid)
    return found


def signal_escaped(pid: int, pid_start: int, sig: signal.Signals) -> None:
    """``sig`` to the processes that left the group of the job whose leader is ``pid``
    (started at ``pid_start``: nothing is sent once that is not so). A SIGKILL goes while
    the group is stopped, in passes until none is left, each stopping what it found before
    it kills it (a stopped process forks nothing more; the children of one killed come to
    the supervisor, and the next pass finds them). Reads all of ``/proc`` a pass: may run
    on a thread. A process that forks anew faster than a pass may still get away."""

    def found() -> list[int]:
        kids = escaped(pid)
        stat = read_stat(pid)
        return kids if stat is not None and stat.start == pid_start else []

    if sig != signal.SIGKILL:
        for kid in found():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(kid, sig)
        return
    stat = read_stat(pid)
    if stat is None or stat.start != pid_start or stat.state in ("Z", "X"):
        return  # (ended meanwhile: its group, or a pid reused, is not to be stopped)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGSTOP)
    for _ in range(ESCAPE_PASSES):
        kids = found()
        if not kids:
            return
        for how in (signal.SIGSTOP, signal.SIGKILL):
            for kid in kids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(kid, how)


def signal_job(job_id: str, pid: int, pid_start: int, pidfd: int | None, *, child: bool,
               sig: signal.Signals) -> None:
    """Send ``sig`` to the job's process group, and to its leader through the pidfd."""
    if not child:
        # Not our child: it may have ended and its pid been reused since we last looked.
        stat = read_stat(pid)
        if stat is None or stat.start != pid_start:
            return
    with contextlib.suppress(ProcessLookupError):
        try:
            os.killpg(pid, sig)
        except PermissionError as e:
            log.warning("job %s: cannot signal process group %d: %s", job_id, pid, e)
    # The leader too, in case it left its process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        elif child:
            os.kill(pid, sig)
