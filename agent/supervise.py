"""The small process each job runs under, as conmon and containerd-shim do: it outlives
a restart of the agent and records how the job ended, so an agent that re-adopts a job
after a restart (no longer its parent) still learns its exit status.

``jobspawn`` starts ``python -I -S -c SCRIPT STATUS_FD READY_FD ENV_FD UID GID SWEEP
COMMAND...``
in the job's session, as the agent's user (the agent's interpreter may not be one the
job's user can run) and with an empty environment: the job's (``ENV_FD``, a memfd of
NUL-separated ``NAME=value``) goes to the command only, so nothing a submitter sets
(``LD_LIBRARY_PATH``) reaches a process running as root. The supervisor forks the
command, which drops to the job's user and group (no supplementary groups; ``-``: stays)
before its exec, tells the agent through ``READY_FD`` whether it could be started
(``ok``, or the errno of the failed exec, so the agent gives the same message as for any
command that cannot start), waits for it, writes its exit status to ``STATUS_FD`` (the
``exit`` file in the job's directory, opened by the agent) and ends the same way: with
its exit code, or by the same signal. Signals sent to the job's process group reach the
command; the supervisor only waits for it to end (its own handlers do nothing, and are
not inherited by the command: exec resets them).

With ``SWEEP`` 1 (every job but a container's, whose runtime keeps its own processes) the
supervisor is a child subreaper (``PR_SET_CHILD_SUBREAPER``): a process of the job that
left its process group (``setsid``) and whose parent ended is re-parented to it rather
than to init, so it stays among the supervisor's descendants, where ``jobprocs`` finds it
when the job is stopped (the supervisor reaps such orphans as they end). Once the command
has ended, the supervisor stops and then SIGKILLs whatever of its descendants is left,
in passes (the children of one that died come to it), and reaps them, for at most
``SWEEP_S`` seconds, before it records the exit status. What this cannot stop: a process
that fights it (forking anew faster than a pass over ``/proc``), and one running as the
agent's own user, which may kill the supervisor or leave its tree (a cgroup per job would
hold both: not done yet).

The script is isolated (``-I -S``: no site, no user environment) and imports only the
standard library; it costs a few MiB of memory per job.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

STATUS_FILE = "exit"  # in the job's directory: the exit status, as a return code
PID_FILE = "pid"  # ... the supervisor's pid and start time, written once it started

SWEEP_S = 10  # seconds the supervisor spends killing the leftovers of an ended command

SCRIPT = f"SWEEP_S = {SWEEP_S}\n" + r"""
import os, signal, sys, time, warnings  # (all imported now: the job's user may not read them)
status, ready, envfd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
uid, gid, sweep = sys.argv[4], sys.argv[5], sys.argv[6] == "1"
argv = sys.argv[7:]
if sweep:
    try:
        import ctypes
        sweep = ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # SUBREAPER
    except Exception:
        sweep = False
chunks = []
while True:
    chunk = os.read(envfd, 1 << 16)
    if not chunk:
        break
    chunks.append(chunk)
os.close(envfd)
env = {}
for item in b"".join(chunks).split(b"\0"):
    name, eq, value = item.partition(b"=")
    if eq:
        env[os.fsdecode(name)] = os.fsdecode(value)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
          signal.SIGUSR2, signal.SIGPIPE):
    signal.signal(s, lambda n, f: None)
r, w = os.pipe2(os.O_CLOEXEC)
pid = os.fork()
if pid == 0:
    os.close(r); os.close(status); os.close(ready)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
              signal.SIGUSR2, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(s, signal.SIG_DFL)  # (a stop before the exec must not be swallowed)
    try:
        if uid != "-":
            os.setgroups([])
            os.setgid(int(gid))
            os.setuid(int(uid))
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        os.write(w, str(e.errno).encode())
    except BaseException:
        os.write(w, b"?")
    os._exit(127)
os.close(w)
err = os.read(r, 32)
os.close(r)
os.write(ready, err or b"ok")
os.close(ready)
if err:
    os.waitpid(pid, 0)
    os._exit(127)
while True:  # (a subreaper reaps the orphans that come to it as they end, too)
    try:
        got, st = os.waitpid(-1 if sweep else pid, 0)
    except ChildProcessError:
        os._exit(255)
    if got == pid:
        break
code = os.waitstatus_to_exitcode(st)

def descendants():
    kids = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/" + name + "/stat", "rb") as f:
                    data = f.read()
                kids.setdefault(int(data[data.rfind(b")") + 2:].split()[1]), []).append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [os.getpid()]
    while todo:
        for kid in kids.get(todo.pop(), ()):
            found.append(kid)
            todo.append(kid)
    return found

deadline = time.monotonic() + SWEEP_S
while sweep and time.monotonic() < deadline:
    found = descendants()
    for how in (signal.SIGSTOP, signal.SIGKILL):  # (a stopped one forks nothing more)
        for kid in found:
            try:
                os.kill(kid, how)
            except OSError:
                pass
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        break  # (none left)
    time.sleep(0.005)
try:
    os.write(status, b"%d\n" % code)
    os.close(status)
except OSError:
    pass  # (a full disk: the agent, if it still is our parent, reads the status itself)
if code < 0:
    try:
        signal.signal(-code, signal.SIG_DFL)
    except (OSError, ValueError):
        pass  # (SIGKILL: never caught)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [-code])
    os.kill(os.getpid(), -code)
os._exit(code & 255 if code >= 0 else 255)
"""


def wrap(argv: list[str], status_fd: int, ready_fd: int, env_fd: int,
         user: tuple[int, int] | None, sweep: bool = True) -> list[str]:
    """The supervisor's command line for ``argv``, run as ``user`` (None: as the agent);
    with ``sweep``, it keeps and then kills the processes that leave the job's group."""
    uid, gid = ("-", "-") if user is None else (str(user[0]), str(user[1]))
    return [sys.executable, "-I", "-S", "-c", SCRIPT,
            str(status_fd), str(ready_fd), str(env_fd), uid, gid, "1" if sweep else "0", *argv]


def env_fd(env: dict[str, str]) -> int:
    """A memfd holding ``env`` for the supervisor to read (from its start)."""
    items = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    if any(b"\0" in item for item in items):
        raise ValueError("an environment variable holds a NUL byte")
    fd = os.memfd_create("flexmesh-job-env", os.MFD_CLOEXEC)
    try:
        data = b"\0".join(items)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def recorded_exit(job_dir: Path, run: str | None = None) -> int | None:
    """The return code the supervisor recorded for the job's last run (-S: killed by
    signal S); None if it recorded none (it was killed too, or the job still runs), or if
    the file is another run's than ``run`` (a lease id; None: whichever)."""
    with contextlib.suppress(OSError, ValueError):
        text = (job_dir / STATUS_FILE).read_text()
        if not text.endswith("\n"):
            return None  # not written yet, or cut short
        lines = text.splitlines()
        if lines[0].startswith("run "):  # written for a run: "run LEASE\n" first
            if run is not None and lines[0][4:] != run:
                return None
            lines = lines[1:]
        return int(lines[0]) if len(lines) == 1 else None
    return None


def open_status(job_dir: Path, run: str = "") -> int:
    """The ``exit`` file of a new run, emptied (but for the line naming ``run``, if
    given): its supervisor writes the exit status after that line."""
    fd = os.open(job_dir / STATUS_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                 0o600)
    try:
        if run:
            os.write(fd, f"run {run}\n".encode())
    except OSError:
        os.close(fd)
        raise
    return fd


def record_pid(job_dir: Path, pid: int, start: int, run: str = "") -> None:
    """Say which process is the run's (and which run, a lease id), before the node
    journals it: an agent killed in between finds it there on restart."""
    tmp = job_dir / (PID_FILE + ".tmp")
    tmp.write_text(f"{pid} {start} {run}".rstrip() + "\n")
    os.replace(tmp, job_dir / PID_FILE)


def recorded_pid(job_dir: Path, run: str | None = None) -> tuple[int, int] | None:
    """(pid, start time) of the last run started in ``job_dir``, or None (none, or the
    file is another run's than ``run``)."""
    with contextlib.suppress(OSError, ValueError):
        fields = (job_dir / PID_FILE).read_text().split()
        if run is not None and len(fields) > 2 and fields[2] != run:
            return None
        return int(fields[0]), int(fields[1])
    return None


def began(job_dir: Path, run: str) -> bool:
    """Whether run ``run`` (a lease id) was ever handed to a supervisor here: its ``exit``
    file, opened before the spawn, names it, or its pid was recorded."""
    with contextlib.suppress(OSError), open(job_dir / STATUS_FILE) as f:
        if f.readline() == f"run {run}\n":
            return True
    return recorded_pid(job_dir, run) is not None


def forget_records(job_dir: Path) -> None:
    """A new run starts: what an earlier one recorded must not be taken for its own."""
    for name in (PID_FILE, STATUS_FILE):
        with contextlib.suppress(FileNotFoundError):
            (job_dir / name).unlink()
