"""The SQLite journal: schema, durability across reopen and kill -9, corrupt rows, async use."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from flexmesh.agent.models import FAILED, QUEUED, RUNNING, JobRecord, RunRecord
from flexmesh.agent.store import SCHEMA_VERSION, AsyncJournal, Journal, JournalError


def make_job(job_id: str, created_at: float = 1.0, state: str = QUEUED) -> JobRecord:
    return JobRecord(
        id=job_id,
        origin="node-a",
        command=["python", "-c", "print('hi')"],
        compute_milli=250,
        memory_mib=1024,
        env={"FOO": "bar"},
        state=state,
        created_at=created_at,
        updated_at=created_at,
    )


def job_in(j: Journal, job_id: str) -> JobRecord | None:
    return next((x for x in j.list_jobs() if x.id == job_id), None)


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.db"


def test_schema_wal_and_durability_settings(db: Path) -> None:
    with Journal(db) as j:
        assert j.schema_version == SCHEMA_VERSION
        assert j._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    conn = raw(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"jobs", "leases", "meta"} <= tables
    finally:
        conn.close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_normal_synchronous_is_selectable(db: Path) -> None:
    with Journal(db, synchronous="NORMAL") as j:
        assert j._conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(ValueError):
        Journal(db, synchronous="OFF")  # type: ignore[arg-type]


def test_job_roundtrip_survives_reopen(db: Path) -> None:
    job = make_job("j1")
    job.exit_code = 3
    job.token, job.term, job.lease_id, job.node = 7, 2, "lease-1", "node-b"
    job.devices = ("gpu0", "gpu1")
    with Journal(db) as j:
        j.write_batch([job])
        assert j.list_jobs() == [job]
        assert job_in(j, "nope") is None
        assert j.list_runs() == []
    with Journal(db) as j:
        assert j.list_jobs() == [job]


def make_run(job_id: str, origin: str = "node-b") -> RunRecord:
    return RunRecord(id=job_id, origin=origin, command=["sleep", "1"], compute_milli=250,
                     memory_mib=512, env={"X": "y"}, state=RUNNING, devices=("gpu0",),
                     lease_id="L1", token=3, term=1, pid=1234, pid_start=98765,
                     created_at=2.0, updated_at=2.0, attempts=1)


def test_runs_apart_from_jobs(db: Path) -> None:
    """An owner's record of a run and its origin's record of the job share an id (a job
    submitted and run on one node) and are two rows, each forgotten on its own."""
    job, run = make_job("j1"), make_run("j1", origin="node-a")
    with Journal(db) as j:
        j.write_batch([job], runs=[run])
        assert j.list_jobs() == [job] and j.list_runs() == [run]
        assert j.list_runs([RUNNING]) == [run] and j.list_runs([QUEUED]) == []
    with Journal(db) as j:
        assert j.list_runs() == [run]
        j.write_batch(forget_runs=["j1"])
        assert j.list_runs() == [] and j.list_jobs() == [job]


def test_journal_of_the_previous_version_migrates(tmp_path: Path) -> None:
    """A journal written by the agent before runs had a table of their own (schema 1,
    tests/data/journal-v1.sqlite3): a job run where it was submitted becomes a job and a
    run, a run for another node moves to the runs, and devices become one tuple."""
    db = tmp_path / "journal.sqlite3"
    db.write_bytes((Path(__file__).parent / "data" / "journal-v1.sqlite3").read_bytes())
    with Journal(db) as j:
        assert j.schema_version == SCHEMA_VERSION
        jobs = {x.id: x for x in j.list_jobs()}
        runs = {x.id: x for x in j.list_runs()}
        assert j.list_leases()[0]["id"] == "n1-L7" and j.get_meta("token") == "9"
    assert set(jobs) == {"queued1", "remote1", "local1"}
    assert set(runs) == {"local1", "borrowed1"}
    assert jobs["queued1"].devices == () and jobs["queued1"].uid == 1000
    assert jobs["remote1"].devices == ("gpu0", "gpu1") and jobs["remote1"].node == "n2"
    local = runs["local1"]
    assert (local.pid, local.pid_start, local.devices, local.lease_id) == (4242, 777, ("gpu0",),
                                                                           "n1-L7")
    assert local.state == jobs["local1"].state == RUNNING and local.uid == 1000
    assert local.bundle == "ab" * 32 and local.origin == "n1"
    borrowed = runs["borrowed1"]
    assert (borrowed.origin, borrowed.state, borrowed.exit_code) == ("n3", "succeeded", 0)
    with Journal(db) as j:  # (opened again: nothing is migrated twice)
        assert len(j.list_runs()) == 2 and len(j.list_jobs()) == 3


def test_second_journal_sees_committed_write(db: Path) -> None:
    first = Journal(db)
    try:
        first.write_batch([make_job("j1")])
        with Journal(db) as second:
            assert second.list_jobs() == [make_job("j1")]
    finally:
        first.close()


def test_upsert_and_list_order_and_state_filter(db: Path) -> None:
    with Journal(db) as j:
        j.write_batch([make_job("late", created_at=30.0)])
        j.write_batch([make_job("early", created_at=10.0), make_job("mid", created_at=20.0)])
        updated = make_job("early", created_at=10.0, state=RUNNING)
        updated.reason = "started"
        j.write_batch([updated])
        assert [x.id for x in j.list_jobs()] == ["early", "mid", "late"]
        assert job_in(j, "early") == updated
        assert [x.id for x in j.list_jobs([RUNNING])] == ["early"]
        assert [x.id for x in j.list_jobs(RUNNING)] == ["early"]
        assert [x.id for x in j.list_jobs({QUEUED, FAILED})] == ["mid", "late"]
        assert j.list_jobs([]) == []


def test_leases_and_meta(db: Path) -> None:
    lease = {"id": "l1", "job_id": "j1", "device": "gpu0", "compute_milli": 500, "token": 3}
    other = {"id": "l2", "job_id": "j2", "device": "gpu1", "token": 4}
    with Journal(db) as j:
        j.write_batch(leases=[lease, other])
        j.write_batch(leases=[{**lease, "token": 5}])
        assert j.list_leases() == [{**lease, "token": 5}, other]
        with pytest.raises(ValueError):  # no id: nothing of the batch is written
            j.write_batch([make_job("j9")], [{"id": "l3"}, {"job_id": "x"}],
                          {"incarnation": "1"})
        assert j.list_jobs() == [] and len(j.list_leases()) == 2
        assert j.get_meta("incarnation") is None
        j.write_batch(meta={"incarnation": "4"})
        assert j.bump_meta("token") == 1
        assert j.bump_meta("token", at_least=100) == 100
    with Journal(db) as j:
        assert j.list_leases() == [{**lease, "token": 5}, other]
        assert j.get_meta("incarnation") == "4"
        assert j.bump_meta("token") == 101
        assert j.bump_meta("incarnation") == 5


def test_corrupt_rows_are_skipped_and_logged(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Journal(db) as j:
        j.write_batch([make_job(f"j{i}", created_at=float(i)) for i in range(5)],
                      [{"id": "good", "job_id": "j0"}, {"id": "bad", "job_id": "j1"}])
    conn = raw(db)
    try:
        conn.execute("UPDATE jobs SET data = '{not json' WHERE id = 'j1'")
        conn.execute("UPDATE jobs SET data = '[1, 2]' WHERE id = 'j2'")
        conn.execute("""UPDATE jobs SET data = '{"command": 5}' WHERE id = 'j3'""")
        conn.execute("UPDATE leases SET data = 'garbage' WHERE id = 'bad'")
    finally:
        conn.close()
    with caplog.at_level(logging.ERROR, logger="flexmesh.agent.store"), Journal(db) as j:
        assert j.list_jobs() == [make_job("j0", created_at=0.0), make_job("j4", created_at=4.0)]
        assert j.list_leases() == [{"id": "good", "job_id": "j0"}]
    messages = " ".join(r.getMessage() for r in caplog.records)
    for bad in ("'j1'", "'j2'", "'j3'", "'bad'"):
        assert bad in messages


def test_newer_schema_and_garbage_file_are_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    Journal(newer).close()
    conn = raw(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(JournalError, match="newer than this agent supports"):
        Journal(newer)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(JournalError, match="unreadable"):
        Journal(garbage)


def test_migration_from_empty_database_keeps_file(db: Path) -> None:
    db.parent.mkdir(parents=True)
    raw(db).close()  # an empty database at version 0
    with Journal(db) as j:
        assert j.schema_version == SCHEMA_VERSION
        j.write_batch([make_job("j1")])


_KILL_SCRIPT = textwrap.dedent(
    """
    import signal, sys
    from flexmesh.agent.models import JobRecord
    from flexmesh.agent.store import Journal

    j = Journal(sys.argv[1])
    j.write_batch([JobRecord(id="survivor", origin="n", command=["true"], compute_milli=1000,
                             memory_mib=1, created_at=5.0)], meta={"incarnation": "9"})
    print("ok", flush=True)
    signal.pause()
    """
)


def test_job_survives_kill_9_after_write_batch(db: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(db)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ok\n"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with Journal(db) as j:
        job = job_in(j, "survivor")
        assert job is not None and job.command == ["true"] and job.created_at == 5.0
        assert j.get_meta("incarnation") == "9"


async def test_async_journal(db: Path) -> None:
    aj = await AsyncJournal.open(db)
    try:
        jobs = [make_job(f"j{i}", created_at=float(i)) for i in range(20)]
        await asyncio.gather(*(aj.write_batch([job]) for job in jobs))
        assert await aj.list_jobs() == jobs
        assert await aj.list_jobs(x for x in [QUEUED]) == jobs
        assert await aj.list_jobs([RUNNING]) == []
        await aj.write_batch(leases=(x for x in [{"id": "l1", "device": "gpu0"}]),
                             meta={"k": "v"})
        assert await aj.list_leases() == [{"id": "l1", "device": "gpu0"}]
        assert await aj.get_meta("k") == "v"
        assert await aj.bump_meta("n") == 1
        # Every call runs on the same worker thread, never on the loop's.
        idents = {await aj._call(threading.get_ident) for _ in range(5)}
        assert len(idents) == 1 and threading.get_ident() not in idents
    finally:
        await aj.close()
    await aj.close()  # idempotent
    with pytest.raises(JournalError):
        await aj.list_jobs()
    wrapped = AsyncJournal(Journal(db))
    try:
        assert len(await wrapped.list_jobs()) == 20
    finally:
        await wrapped.close()


async def test_async_journal_open_error_is_raised(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"x" * 4096)
    with pytest.raises(JournalError):
        await AsyncJournal.open(garbage)


def test_forgotten_jobs_and_leases_are_deleted_in_the_same_transaction(db: Path) -> None:
    with Journal(db) as j:
        j.write_batch([make_job("old", 1.0, FAILED), make_job("kept", 2.0)],
                      [{"id": "l1", "job_id": "old"}, {"id": "l2", "job_id": "kept"}])
        j.write_batch([make_job("new", 3.0)], forget_jobs=["old", "absent"],
                      forget_leases=["l1"])
        assert [x.id for x in j.list_jobs()] == ["kept", "new"]
        assert [x["id"] for x in j.list_leases()] == ["l2"]


async def test_group_commit_keeps_the_last_word_on_a_record(db: Path) -> None:
    from flexmesh.agent.runtime.commit import GroupCommit

    aj = await AsyncJournal.open(db)
    try:
        commits = GroupCommit(aj)
        await commits.write([make_job("a"), make_job("b")], [{"id": "l1"}])
        # In one batch: "a" written then forgotten (gone), "b" forgotten then written
        # again (a new attempt under the same id: kept), lease l1 forgotten.
        await asyncio.gather(commits.write([make_job("a", 5.0)]),
                             commits.write(forget_jobs=["a", "b"], forget_leases=["l1"]),
                             commits.write([make_job("b", 6.0)]))
        assert [(x.id, x.created_at) for x in await aj.list_jobs()] == [("b", 6.0)]
        assert await aj.list_leases() == []
    finally:
        await aj.close()
