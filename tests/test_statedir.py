"""Disk and journal faults: a full disk is named and retried, a damaged or vanished journal
is refused with the way out, and two agents cannot share a state dir."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from flexmesh.agent import api
from flexmesh.agent.clicommands import journal_warning
from flexmesh.agent.localmesh import LocalMesh
from flexmesh.agent.models import JobRecord
from flexmesh.agent.runtime import commit, statedir
from flexmesh.agent.runtime.commit import GroupCommit, JournalWriteError, describe
from flexmesh.agent.store import Journal


def test_a_second_lock_on_a_state_dir_names_the_holder(tmp_path: Path) -> None:
    fd = statedir.lock(tmp_path)
    try:
        with pytest.raises(statedir.StateDirError) as info:
            statedir.lock(tmp_path)
        assert "in use by another agent" in str(info.value)
        assert f"pid {__import__('os').getpid()}" in str(info.value)
    finally:
        statedir.unlock(fd)
    statedir.unlock(statedir.lock(tmp_path))  # free again once let go


def test_a_journal_that_vanished_or_was_emptied_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    assert statedir.journal_problem(path) is None  # a new state dir: make one
    Journal(path).close()
    statedir.mark_journal(path)
    assert statedir.journal_problem(path) is None
    path.write_bytes(b"")
    problem = statedir.journal_problem(path)
    assert problem is not None and "is empty" in problem and f"rm {path}.id" in problem
    path.unlink()
    problem = statedir.journal_problem(path)
    assert problem is not None and "is missing" in problem


@pytest.mark.parametrize("damage", ["garbage", "future"])
def test_a_damaged_journal_is_refused_in_one_line_with_the_way_out(tmp_path: Path,
                                                                   damage: str) -> None:
    path = tmp_path / "journal.sqlite3"
    if damage == "garbage":
        path.write_bytes(b"not a database, not at all " * 100)
    else:
        Journal(path).close()
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA user_version = 999")
        conn.close()
    with pytest.raises(statedir.StateDirError) as info:
        asyncio.run(statedir.open_journal(path))
    text = str(info.value)
    assert "\n" not in text and f"mv {path} {path}.bad" in text
    assert ("newer than this agent" if damage == "future" else "unreadable") in text


class FlakyJournal:
    """Fails its first ``fails`` writes (a full disk), then keeps what it is given."""

    def __init__(self, fails: int) -> None:
        self.fails = fails
        self.jobs: dict[str, JobRecord] = {}
        self.forgotten: set[str] = set()

    async def write_batch(self, jobs: Any, leases: Any, meta: Any, forget_jobs: Any,
                          forget_leases: Any, *, runs: Any = (), forget_runs: Any = ()) -> None:
        await asyncio.sleep(0)
        if self.fails:
            self.fails -= 1
            raise sqlite3.OperationalError("database or disk is full")
        for job_id in forget_jobs:
            self.jobs.pop(job_id, None)
            self.forgotten.add(job_id)
        self.jobs.update({j.id: j for j in jobs})


def _job(job_id: str, state: str = "queued") -> JobRecord:
    return JobRecord(id=job_id, origin="o", command=["true"], compute_milli=1000,
                     memory_mib=0, state=state)


def test_a_failed_write_is_retried_until_it_succeeds_and_a_submit_hears_at_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(commit, "RETRY_FIRST", 0.001)
    monkeypatch.setattr(commit, "RETRY_MAX", 0.001)

    async def scenario() -> FlakyJournal:
        journal = FlakyJournal(fails=3)
        group = GroupCommit(journal)  # type: ignore[arg-type]
        ended = asyncio.ensure_future(group.write([_job("a", "succeeded")]))
        submit = asyncio.ensure_future(group.write([_job("s")], retry=False))
        with pytest.raises(JournalWriteError) as info:
            await submit
        assert str(info.value).startswith("disk full")
        now = asyncio.get_running_loop().time()
        health = group.health(now + 5)  # (what `flexmesh status` shows meanwhile)
        assert health["ok"] is False and health["failing_for_s"] >= 5
        assert health["error"].startswith("disk full") and health["failed_tries"] >= 1
        warning = journal_warning({"journal": health})
        assert warning.startswith("\nWARNING: journal writes failing for")
        assert "disk full" in warning
        later = asyncio.ensure_future(group.write([_job("b")], forget_jobs=["gone"]))
        await asyncio.gather(ended, later)
        assert group.failures == 3 and group.failing_since is None
        assert group.health(now) == {"ok": True, "failed_tries": 3, "failing_for_s": None,
                                     "error": ""}
        assert journal_warning({"journal": group.health(now)}) == ""
        return journal

    with caplog.at_level(logging.WARNING, "flexmesh.agent"):
        journal = asyncio.run(scenario())
    assert set(journal.jobs) == {"a", "b"} and journal.jobs["a"].state == "succeeded"
    assert journal.forgotten == {"gone"}
    assert caplog.text.count("journal write failed: disk full") == 1
    assert "succeed again (after 3 failed tries)" in caplog.text


def test_a_refused_submission_alone_does_not_leave_the_journal_failing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing else to write, the failed batch of a refused submission is not
    retried: the status must not go on saying writes fail (the disk may have room by then);
    the next write says."""
    monkeypatch.setattr(commit, "RETRY_FIRST", 0.001)

    async def scenario() -> None:
        group = GroupCommit(FlakyJournal(fails=1))  # type: ignore[arg-type]
        with pytest.raises(JournalWriteError):
            await group.write([_job("s")], retry=False)
        assert group._task is not None
        await group._task
        assert group.health(asyncio.get_running_loop().time())["ok"] is True
        await group.write([_job("t")], retry=False)  # (room again: written)

    asyncio.run(scenario())


def test_describe_names_a_full_disk() -> None:
    assert describe(OSError(errno.ENOSPC, "No space left on device")).startswith("disk full")
    assert describe(sqlite3.OperationalError("database or disk is full")).startswith("disk")
    assert describe(OSError(errno.EIO, "I/O error")) == "[Errno 5] I/O error"


async def test_a_submit_the_journal_cannot_take_gets_507_with_the_cause(tmp_path: Path) -> None:
    async def refuse(job: JobRecord) -> JobRecord:
        raise JournalWriteError("disk full: database or disk is full")

    agent = SimpleNamespace(stopping=False, node=SimpleNamespace(name="n"), submit=refuse,
                            settings=SimpleNamespace(socket_group="nogroup-here"))
    runner = web.AppRunner(api.make_app(agent))  # type: ignore[arg-type]
    await runner.setup()
    path = str(tmp_path / "agent.sock")
    await web.UnixSite(runner, path).start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as s, \
                s.post("http://localhost/v1/jobs", json={"command": ["true"]}) as resp:
            status, body = resp.status, await resp.json()
    finally:
        await runner.cleanup()
    assert status == 507 and "disk full" in body["error"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_real_agents_refuse_a_shared_state_dir_and_an_emptied_journal(mesh: LocalMesh) -> None:
    a = mesh.start("a", sim="gpu:1x8GiB")
    state = a.dir / "state"
    twin = subprocess.run(
        [sys.executable, "-m", "flexmesh.agent.cli", "agent", "--name", "twin",
         "--bind", "127.0.0.1:0", "--socket", str(mesh.root / "twin.sock"),
         "--state-dir", str(state)], capture_output=True, text=True, timeout=60)
    assert twin.returncode == 2 and "in use by another agent" in twin.stderr
    job = json.loads(mesh.cli("a", "submit", "-o", "json", "--", "true").stdout)["id"]
    mesh.wait_for("the job to end", lambda: mesh.json("a", "show", job)["state"] == "succeeded")
    mesh.kill("a")
    (state / "journal.sqlite3").write_bytes(b"")  # a truncated journal
    for wal in state.glob("journal.sqlite3-*"):
        wal.unlink()
    res = subprocess.run(a.args, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "is empty" in res.stderr and "rm " in res.stderr


async def test_a_socket_a_running_agent_listens_on_is_not_taken(tmp_path: Path) -> None:
    agent = SimpleNamespace(settings=SimpleNamespace(socket_group="nogroup-here"))
    path = str(tmp_path / "agent.sock")
    first = web.AppRunner(web.Application())
    await first.setup()
    await api.listen(first, agent, path)  # type: ignore[arg-type]
    second = web.AppRunner(web.Application())
    await second.setup()
    try:
        with pytest.raises(OSError, match="socket of a running agent"):
            await api.listen(second, agent, path)  # type: ignore[arg-type]
        await first.cleanup()  # the first agent is gone; its socket file may stay behind
        await api.listen(second, agent, path)  # type: ignore[arg-type]  # stale: taken over
    finally:
        await first.cleanup()
        await second.cleanup()


def test_a_directory_jobs_cannot_search_is_named() -> None:
    """Borrowed jobs run as ``nobody``: a 0700 parent of the work dir (``mktemp -d``)
    keeps them out, and the reason says which directory and what to do."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="flexmesh-reach-"))  # (pytest's tmp is 0700 above)
    try:
        base.chmod(0o755)
        _check_reach(base)
    finally:
        shutil.rmtree(base)


def _check_reach(base: Path) -> None:
    closed = base / "closed"
    work = closed / "node-work"
    work.mkdir(parents=True)
    closed.chmod(0o700)
    owner = closed.stat().st_uid
    stranger = (owner + 54321, owner + 54321)
    assert statedir.closed_to(work, *stranger) == (closed, 0o700)
    why = statedir.unreachable("the work dir", work, stranger, "nobody")
    assert why is not None and f"{closed} has mode 0700" in why and "chmod o+x" in why
    assert statedir.closed_to(work, owner, owner) is None  # its owner may
    assert statedir.closed_to(work, 0, 0) is None  # root may
    closed.chmod(0o711)
    assert statedir.unreachable("the work dir", work, stranger) is None
    assert statedir.closed_to(closed / "not-yet" / "x", *stranger) is None  # made later
