"""JobRunner: spawning, logs, exit reasons, stop, adopt, under the default loop and uvloop.

Each scenario is a coroutine run by ``run``, a fixture parametrised over the loop
implementations (``asyncio.Runner(loop_factory=...)``), so the same code is exercised
under both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from flexmesh.agent.jobs import (
    ADOPTED_EXIT_REASON,
    JobRunner,
    JobStartError,
    describe_exit,
    pid_start_time,
    read_at,
)

try:
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    HAVE_UVLOOP = False

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]

LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio")]
if HAVE_UVLOOP:
    LOOPS.append(pytest.param(uvloop.new_event_loop, id="uvloop"))


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Run[Any]:
    factory = request.param

    def _run(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(coro, 30))

    return _run


class Exits:
    """Records on_exit calls; lets a test wait for a given job's end."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None, str]] = []
        self._events: dict[str, asyncio.Event] = {}

    def _event(self, job_id: str) -> asyncio.Event:
        return self._events.setdefault(job_id, asyncio.Event())

    def __call__(self, job_id: str, exit_code: int | None, reason: str) -> None:
        self.calls.append((job_id, exit_code, reason))
        self._event(job_id).set()

    async def wait(self, job_id: str, timeout: float = 10.0) -> tuple[int | None, str]:
        await asyncio.wait_for(self._event(job_id).wait(), timeout)
        [(code, reason)] = [(c, r) for j, c, r in self.calls if j == job_id]
        return code, reason


async def wait_for_output(runner: JobRunner, job_id: str, needle: bytes) -> bytes:
    """Wait (bounded) until the job's stdout contains needle; a condition, not a race."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while needle not in (out := runner.read_log(job_id, "stdout")):
        assert loop.time() < deadline, f"{needle!r} never appeared in {out!r}"
        await asyncio.sleep(0.01)
    return out


async def wait_gone(pid: int) -> None:
    """Wait (bounded) until pid is dead: gone, or a zombie its new parent has not reaped."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in (b"Z", b"X"):
            return
        assert loop.time() < deadline, f"pid {pid} still alive"
        await asyncio.sleep(0.01)


async def spawn_orphan(*argv: str) -> int:
    """Start argv in its own session as a grandchild whose parent exits at once, as a job
    left behind by a previous agent instance is: not a child of this process."""
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen(sys.argv[1:], start_new_session=True, stdin=subprocess.DEVNULL,"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid)\n"
    )
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code, *argv], capture_output=True, check=True
    )
    return int(done.stdout)


def zombies_of(pid: int) -> list[int]:
    """The children of ``pid`` that have ended and are not reaped yet."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
            except (OSError, ValueError):
                continue
            if int(ppid) == pid and state == b"Z":
                found.append(int(name))
    return found


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def test_describe_exit() -> None:
    assert describe_exit(0) == (0, "exited with code 0")
    assert describe_exit(2) == (2, "exited with code 2")
    assert describe_exit(-9) == (137, "killed by signal 9 (SIGKILL)")
    assert describe_exit(-15) == (143, "killed by signal 15 (SIGTERM)")
    assert pid_start_time(os.getpid()) is not None


def test_read_at(tmp_path: Path) -> None:
    log = tmp_path / "stdout"
    log.write_bytes(b"hello world\n")
    assert read_at(log, 0, 1 << 20) == b"hello world\n"
    assert read_at(log, 6, 5) == b"world"
    assert read_at(log, 100, 5) == b""  # past the end
    assert read_at(tmp_path / "not-yet", 0, 5) == b""
    with pytest.raises(ValueError):
        read_at(log, -1, 5)


def test_env_logs_and_exit_codes(
    run: Run[None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEXMESH_TEST_INHERITED", "from-agent")  # the job must not see it

    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits)
        try:
            pid, pid_start = await runner.start(
                "j1",
                sh('echo "$FOO-$FLEXMESH_TEST_INHERITED."; echo oops >&2; pwd; exit 3'),
                {"FOO": "bar"},
                cwd=str(tmp_path),
            )
            assert pid > 0 and pid_start > 0
            assert await exits.wait("j1") == (3, "exited with code 3")
            assert runner.running() == {}
            expected = f"bar-.\n{tmp_path}\n".encode()  # exactly the env it was given
            assert runner.read_log("j1", "stdout") == expected
            assert runner.read_log("j1", "stderr") == b"oops\n"
            assert runner.read_log("j1", "stdout", offset=1, limit=3) == b"ar-"
            assert runner.read_log("j1", "stdout", offset=10_000) == b""
            assert runner.read_log("never-ran", "stdout") == b""
            assert runner.log_path("j1", "stderr") == tmp_path / "jobs" / "j1" / "stderr"
            with pytest.raises(ValueError):
                runner.log_path("j1", "stdin")

            await runner.start("j0", ["true"], {})
            assert await exits.wait("j0") == (0, "exited with code 0")
            await runner.start("j9", sh("kill -9 $$"), {})
            assert await exits.wait("j9") == (137, "killed by signal 9 (SIGKILL)")
            assert len(exits.calls) == 3
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


def test_start_errors(run: Run[None], tmp_path: Path) -> None:
    not_executable = tmp_path / "script.sh"
    not_executable.write_text("#!/bin/sh\necho hi\n")

    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path / "state", exits)
        try:
            with pytest.raises(JobStartError, match=r"^command not found: no-such-cmd-xyz$"):
                await runner.start("a", ["no-such-cmd-xyz", "arg"], {})
            with pytest.raises(JobStartError, match=r"^permission denied: "):
                await runner.start("b", [str(not_executable)], {})
            with pytest.raises(JobStartError, match=r"^working directory not found: /nope"):
                await runner.start("c", ["true"], {}, cwd="/nope/nowhere")
            with pytest.raises(JobStartError, match="empty command"):
                await runner.start("d", [], {})
            with pytest.raises(ValueError):
                await runner.start("../escape", ["true"], {})
            assert runner.running() == {}
            # A job id whose start failed can be started again.
            await runner.start("a", ["true"], {})
            assert await exits.wait("a") == (0, "exited with code 0")
            assert [c[0] for c in exits.calls] == ["a"]
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


def test_stop_with_grace_kills_a_process_that_ignores_sigterm(
    run: Run[None], tmp_path: Path
) -> None:
    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits)
        try:
            await runner.start("stubborn", sh('trap "" TERM; echo ready; exec sleep 30'), {})
            await runner.start("polite", ["sleep", "30"], {})
            await wait_for_output(runner, "stubborn", b"ready")
            with pytest.raises(ValueError, match="already running"):
                await runner.start("polite", ["true"], {})
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            polite = await runner.stop("polite", grace_s=10, reason="cancelled by user")
            assert polite and loop.time() - t0 < 5  # SIGTERM was enough
            assert exits.calls == [("polite", 143, "cancelled by user")]
            t0 = loop.time()
            assert await runner.stop("stubborn", grace_s=0.3, reason="cancelled by user")
            # the grace period was given (uvloop's clock counts whole milliseconds)
            assert loop.time() - t0 >= 0.3 - 0.002
            assert exits.calls[1] == ("stubborn", 137, "cancelled by user")
            assert runner.running() == {}
            assert not await runner.stop("stubborn")  # no longer running
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


def test_stop_and_exit_sweep_the_process_group(run: Run[None], tmp_path: Path) -> None:
    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits)
        try:
            # The leader exits at once, leaving a background child in its group.
            await runner.start("leaves", sh("sleep 30 & echo $!"), {})
            assert (await exits.wait("leaves"))[0] == 0
            await wait_gone(int(runner.read_log("leaves", "stdout")))
            # Stopping a job stops its children too.
            await runner.start("tree", sh("sleep 30 & echo $!; wait"), {})
            straggler = int(await wait_for_output(runner, "tree", b"\n"))
            assert await runner.stop("tree", grace_s=5, reason="preempted by owner")
            assert exits.calls[-1] == ("tree", 143, "preempted by owner")
            await wait_gone(straggler)
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


def test_processes_that_leave_the_group_end_with_the_job(run: Run[None], tmp_path: Path) -> None:
    """``setsid`` does not take a process out of its job: the supervisor, a subreaper,
    keeps it and kills it once the command has ended; a stop signals it too, and one that
    ignores SIGTERM is SIGKILLed with the rest once the grace is over."""
    daemon = tmp_path / "daemon.sh"  # leaves the group, and ignores SIGTERM
    daemon.write_text('trap "" TERM\nwhile :; do sleep 0.1; done\n')

    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits)
        try:
            # The command ends at once, leaving a process in a session of its own ...
            await runner.start("left", sh("setsid sleep 30 & echo $!"), {})
            assert (await exits.wait("left"))[0] == 0
            await wait_gone(int(runner.read_log("left", "stdout")))
            # ... or one whose parent ended too (a daemon's double fork).
            await runner.start("double", sh("(setsid sleep 30 & echo $!); exit 3"), {})
            assert (await exits.wait("double"))[0] == 3
            await wait_gone(int(runner.read_log("double", "stdout")))
            # A stop: the command and the process that left both ignore SIGTERM.
            await runner.start("stubborn", sh(f'trap "" TERM; setsid sh {daemon} & echo $!; '
                                              "while :; do sleep 0.1; done"), {})
            escapee = int(await wait_for_output(runner, "stubborn", b"\n"))
            assert await runner.stop("stubborn", grace_s=0.5, reason="cancelled by user")
            assert exits.calls[-1] == ("stubborn", 137, "cancelled by user")
            await wait_gone(escapee)
            # Orphans that end while the command runs are reaped as they end, not left
            # as zombies of the supervisor until the job does.
            await runner.start("orphans", sh("for i in 1 2 3; do (setsid true &); done; "
                                             "echo ready; sleep 30"), {})
            await wait_for_output(runner, "orphans", b"ready\n")
            supervisor = runner.running()["orphans"]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while zombies_of(supervisor):
                assert loop.time() < deadline, zombies_of(supervisor)
                await asyncio.sleep(0.01)
            assert await runner.stop("orphans", grace_s=1)
            # Left alone where asked (a container runtime's client keeps its own).
            await runner.start("kept", sh("setsid sleep 30 & echo $!"), {}, sweep=False)
            assert (await exits.wait("kept"))[0] == 0
            kept = int(runner.read_log("kept", "stdout"))
            assert pid_start_time(kept) is not None
            os.kill(kept, signal.SIGKILL)
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


CHAIN = """
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None)

def child(*_):
    if os.fork() == 0:  # a new child, told (SIGUSR1) when its parent dies: it makes another
        libc.prctl(1, signal.SIGUSR1)  # PR_SET_PDEATHSIG
        signal.signal(signal.SIGUSR1, child)

os.setsid()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGUSR1, child)
child()
print("chain", flush=True)
while True:
    time.sleep(1)
"""


def _running(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{name}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if marker.encode() in cmd and state not in (b"Z", b"X"):
                found.append(int(name))
    return found


def test_a_chain_that_rebuilds_itself_as_it_is_killed_ends_with_its_job(
        run: Run[None], tmp_path: Path) -> None:
    """Out of the group, each of its processes makes a new child when its parent dies
    (PR_SET_PDEATHSIG): killed a child at a time, it would outlive the job. The sweep stops
    each pass's processes before it kills them."""
    chain = tmp_path / "chain-a7f3.py"
    chain.write_text(CHAIN)

    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits)
        try:
            await runner.start("chain", [sys.executable, str(chain)], {})
            await wait_for_output(runner, "chain", b"chain\n")
            os.kill(runner.running()["chain"], 0)
            assert len(_running("chain-a7f3")) >= 2
            await runner.start("ends", sh(f"{sys.executable} {chain} & sleep 0.5; exit 0"), {})
            assert (await exits.wait("ends"))[0] == 0
            assert await runner.stop("chain", grace_s=0.2)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while _running("chain-a7f3"):
                assert loop.time() < deadline, _running("chain-a7f3")
                await asyncio.sleep(0.01)
        finally:
            await runner.shutdown(kill=True, grace_s=1)
            for pid in _running("chain-a7f3"):
                os.kill(pid, signal.SIGKILL)

    run(scenario())


def test_many_concurrent_jobs_beside_asyncio_subprocesses(run: Run[None], tmp_path: Path) -> None:
    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits)
        try:
            n = 40
            # asyncio's own subprocess machinery (uvloop's SIGCHLD handling, or the default
            # loop's child watcher) runs at the same time and must not steal our exits.
            other = await asyncio.create_subprocess_exec("true")
            await asyncio.gather(
                *(runner.start(f"j{i}", sh(f"exit {i % 7}"), {}) for i in range(n)),
                other.wait(),
            )
            results = await asyncio.gather(*(exits.wait(f"j{i}") for i in range(n)))
            assert results == [(i % 7, f"exited with code {i % 7}") for i in range(n)]
            assert other.returncode == 0
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "polling"])
def test_adopt_live_and_vanished(run: Run[None], tmp_path: Path, use_pidfd: bool) -> None:
    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits, use_pidfd=use_pidfd, poll_interval_s=0.05)
        try:
            one = await spawn_orphan("sleep", "30")
            two = await spawn_orphan("sleep", "30")
            one_start, two_start = pid_start_time(one), pid_start_time(two)
            assert one_start is not None and two_start is not None

            # A pid whose start time does not match: reused by another process.
            assert not runner.adopt("reused", one, one_start + 1)
            assert runner.running() == {}

            assert runner.adopt("one", one, one_start)
            assert runner.adopt("two", two, two_start)
            assert runner.running() == {"one": one, "two": two}

            # An adopted process ending on its own: exit code unknown.
            os.kill(two, signal.SIGTERM)
            assert await exits.wait("two") == (None, ADOPTED_EXIT_REASON)
            # Stop works on adopted processes.
            assert await runner.stop("one", grace_s=5, reason="cancelled by user")
            assert exits.calls[-1] == ("one", None, "cancelled by user")
            await wait_gone(one)
            assert runner.running() == {}
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


def test_adopt_a_pid_that_exited(run: Run[None], tmp_path: Path) -> None:
    async def scenario() -> None:
        runner = JobRunner(tmp_path, Exits())
        try:
            done = await asyncio.to_thread(
                subprocess.run, ["sh", "-c", "echo $$"], capture_output=True
            )
            pid = int(done.stdout)
            assert not runner.adopt("gone", pid, 12345)
            assert not runner.adopt("bad", -1, 0)
        finally:
            await runner.shutdown(kill=True)

    run(scenario())


def test_detach_on_shutdown_then_adopt_again(run: Run[None], tmp_path: Path) -> None:
    async def scenario() -> None:
        first_exits, second_exits = Exits(), Exits()
        first = JobRunner(tmp_path, first_exits)
        second = JobRunner(tmp_path, second_exits)
        try:
            pid, pid_start = await first.start("keep", ["sleep", "30"], {})
            await first.shutdown(kill=False)
            assert first.running() == {}
            assert pid_start_time(pid) == pid_start  # still running
            with pytest.raises(RuntimeError):
                await first.start("x", ["true"], {})
            assert second.adopt("keep", pid, pid_start)
            assert await second.stop("keep", grace_s=5, reason="cancelled by user")
            # Adopted back in the process that spawned it: it is our child after all, so it
            # is reaped and its exit code is known.
            assert second_exits.calls == [("keep", 143, "cancelled by user")]
            assert first_exits.calls == []
        finally:
            await first.shutdown(kill=True, grace_s=1)
            await second.shutdown(kill=True, grace_s=1)

    run(scenario())


def test_shutdown_kill_stops_everything(run: Run[None], tmp_path: Path) -> None:
    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits)
        for i in range(3):
            await runner.start(f"j{i}", ["sleep", "30"], {})
        await runner.shutdown(kill=True, grace_s=5, reason="agent shutting down")
        assert sorted(exits.calls) == [(f"j{i}", 143, "agent shutting down") for i in range(3)]

    run(scenario())


def test_cancelled_start_kills_the_process(run: Run[None], tmp_path: Path) -> None:
    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits)
        try:
            task = asyncio.create_task(runner.start("c", ["sleep", "30"], {}))
            await asyncio.sleep(0)  # let it reach the spawn
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await exits.wait("c") == (137, "start was cancelled")
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


def test_on_exit_errors_are_logged(
    run: Run[None], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        def broken(job_id: str, code: int | None, reason: str) -> None:
            raise RuntimeError("boom")

        runner = JobRunner(tmp_path, broken)
        try:
            await runner.start("j", ["sleep", "30"], {})
            assert await runner.stop("j", grace_s=5)
            assert runner.running() == {}
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    with caplog.at_level(logging.ERROR, logger="flexmesh.agent.jobs"):
        run(scenario())
    assert "on_exit callback failed" in caplog.text


def test_polling_fallback_for_children(run: Run[None], tmp_path: Path) -> None:
    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits, use_pidfd=False, poll_interval_s=0.02)
        try:
            await runner.start("a", sh("exit 5"), {})
            await runner.start("b", ["sleep", "30"], {})
            assert await exits.wait("a") == (5, "exited with code 5")
            assert await runner.stop("b", grace_s=5, reason="cancelled by user")
            assert exits.calls[-1] == ("b", 143, "cancelled by user")
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


def test_stop_while_starting_waits_for_the_start(run: Run[None], tmp_path: Path) -> None:
    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits)
        try:
            start = asyncio.create_task(runner.start("s", ["sleep", "30"], {}))
            await asyncio.sleep(0)  # the start is in flight
            assert await runner.stop("s", grace_s=5, reason="cancelled by user")
            pid, _ = await start
            assert pid > 0
            assert exits.calls == [("s", 143, "cancelled by user")]
            failing = asyncio.create_task(runner.start("f", ["no-such-cmd-xyz"], {}))
            await asyncio.sleep(0)
            assert not await runner.stop("f")
            with pytest.raises(JobStartError):
                await failing
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


@pytest.mark.parametrize("use_pidfd", [True, False])
def test_an_adopted_job_ends_with_the_status_its_supervisor_recorded(
        run: Run[None], tmp_path: Path, use_pidfd: bool) -> None:
    """A job started by an earlier agent instance (here: a process that spawned it and
    exited) is not this agent's child, yet its exit code is known: its supervisor wrote it
    to the job's ``exit`` file. A job whose supervisor was killed too stays unknown."""
    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits, use_pidfd=use_pidfd, poll_interval_s=0.05)
        code = ("import sys; from pathlib import Path; from flexmesh.agent import jobspawn\n"
                "pid, start = jobspawn.spawn(sys.argv[1], Path(sys.argv[2]), sys.argv[3:], "
                "{'PATH': '/usr/bin:/bin'}, None)\n"
                "print(pid, start)\n")
        started = {}
        for job_id, script in (("three", "sleep 0.5; exit 3"), ("term", "sleep 0.5; kill $$"),
                               ("killed", "sleep 30")):
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-c", code, job_id,
                                 str(runner.job_dir(job_id)), "sh", "-c", script],
                capture_output=True, check=True)
            pid, start = map(int, done.stdout.split())
            assert runner.adopt(job_id, pid, start)
            started[job_id] = pid
        try:
            assert await exits.wait("three") == (3, "exited with code 3")
            assert await exits.wait("term") == (143, "killed by signal 15 (SIGTERM)")
            os.killpg(started["killed"], signal.SIGKILL)  # the supervisor with it
            assert await exits.wait("killed") == (None, ADOPTED_EXIT_REASON)
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


def test_the_supervisor_keeps_none_of_the_jobs_environment(run: Run[None],
                                                             tmp_path: Path) -> None:
    """The job's environment (which its submitter chose: LD_LIBRARY_PATH and all) goes to
    the command only; its supervisor, which may run as root, starts with an empty one."""
    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits)
        try:
            await runner.start("env", sh("tr '\\0' '\\n' </proc/$PPID/environ | wc -c; "
                                         "echo $LD_LIBRARY_PATH"),
                               {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/tmp/evil"})
            assert await exits.wait("env") == (0, "exited with code 0")
            assert runner.read_log("env", "stdout").split() == [b"0", b"/tmp/evil"]
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


def test_a_run_records_its_pid_before_the_node_journals_it(run: Run[None],
                                                           tmp_path: Path) -> None:
    """An agent killed between starting a job and journaling its pid finds the process
    from the job's ``pid`` file; a new run forgets what an earlier one recorded."""
    from flexmesh.agent import supervise

    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits)
        try:
            pid, start = await runner.start("p", ["sleep", "0.2"], {"PATH": "/usr/bin:/bin"})
            job_dir = runner.job_dir("p")
            assert supervise.recorded_pid(job_dir) == (pid, start)
            assert await exits.wait("p") == (0, "exited with code 0")
            assert supervise.recorded_exit(job_dir) == 0
            supervise.forget_records(job_dir)
            assert supervise.recorded_pid(job_dir) is None
            assert supervise.recorded_exit(job_dir) is None
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


def test_a_later_run_never_takes_an_earlier_runs_records(run: Run[None],
                                                         tmp_path: Path) -> None:
    """The same job run again on this node (requeued back here), journaled as placed, and
    the agent killed before the new run started: on restart the earlier run's pid and exit
    code are not taken for the new run's, because the records name their lease."""
    from flexmesh.agent import supervise

    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits)
        try:
            pid, start = await runner.start("p", ["sh", "-c", "exit 3"],
                                            {"PATH": "/usr/bin:/bin"}, run="n1/7")
            assert await exits.wait("p") == (3, "exited with code 3")
            job_dir = runner.job_dir("p")
            assert supervise.recorded_pid(job_dir, "n1/7") == (pid, start)
            assert supervise.recorded_exit(job_dir, "n1/7") == 3
            assert supervise.recorded_exit(job_dir) == 3  # (an adopted process: any run)
            assert supervise.recorded_pid(job_dir, "n1/9") is None
            assert supervise.recorded_exit(job_dir, "n1/9") is None
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())


def test_records_of_the_previous_version_are_still_read(tmp_path: Path) -> None:
    """Files written before runs were named (an upgrade while jobs ran) hold no run: taken
    as they are, as that version did."""
    from flexmesh.agent import supervise

    (tmp_path / supervise.PID_FILE).write_text("123 456\n")
    (tmp_path / supervise.STATUS_FILE).write_text("-9\n")
    assert supervise.recorded_pid(tmp_path, "n1/9") == (123, 456)
    assert supervise.recorded_exit(tmp_path, "n1/9") == -9
    (tmp_path / supervise.STATUS_FILE).write_text("run n1/9\n")  # the run has not ended
    assert supervise.recorded_exit(tmp_path, "n1/9") is None


def test_an_adopted_jobs_leftover_processes_are_swept_when_it_ends(
        run: Run[None], tmp_path: Path) -> None:
    """A job started by an earlier agent instance (not this one's child) leaves a process
    in its group behind when it exits: swept, as for a job this agent started, so nothing
    of it runs on past its lease after an agent restart."""
    async def scenario() -> None:
        exits = Exits()
        runner = JobRunner(tmp_path, exits, poll_interval_s=0.05)
        code = ("import sys; from pathlib import Path; from flexmesh.agent import jobspawn\n"
                "pid, start = jobspawn.spawn(sys.argv[1], Path(sys.argv[2]), sys.argv[3:], "
                "{'PATH': '/usr/bin:/bin'}, None)\n"
                "print(pid, start)\n")
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", code, "bg", str(runner.job_dir("bg")),
                             "sh", "-c", "sleep 60 & echo $!; sleep 0.5"],
            capture_output=True, check=True)
        pid, start = map(int, done.stdout.split())
        try:
            assert runner.adopt("bg", pid, start)
            assert await exits.wait("bg") == (0, "exited with code 0")
            straggler = int((runner.job_dir("bg") / "stdout").read_text())
            await wait_gone(straggler)
        finally:
            await runner.shutdown(kill=True, grace_s=1)

    run(scenario())
