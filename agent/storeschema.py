"""The journal's schema: its migrations, and how jobs, leases and meta values become rows
and come back.

``PRAGMA user_version`` holds the schema version; ``MIGRATIONS[i]`` brings a database
from version ``i`` to ``i + 1`` in one transaction. A database written by a newer agent
(a higher version than this code knows) is refused rather than guessed at.

A row whose data cannot be turned back into a ``JobRecord`` (or a lease dict) is logged and
skipped, so one damaged row never stops an agent from starting.

Nothing here opens, commits or closes anything: ``store.Journal`` owns the connection and
its transactions.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any, TypeVar

from flexmesh.agent.models import JobRecord, RunRecord

# Under the journal's name, as before this module was split from it: log filters still match.
log = logging.getLogger("flexmesh.agent.store")
R = TypeVar("R", JobRecord, RunRecord)

# JobRecord fields kept as their own columns (queryable, indexed); every other field goes
# into the ``data`` JSON column. On read the columns win over anything in ``data``.
JOB_COLUMNS = ("id", "state", "origin", "node", "lease_id", "created_at", "updated_at")
# The same for RunRecord, in the ``runs`` table.
RUN_COLUMNS = ("id", "state", "origin", "lease_id", "created_at", "updated_at")

# One entry per schema version: the statements that bring version i to version i + 1.
# Append only; never edit a released migration.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            id         TEXT PRIMARY KEY,
            state      TEXT NOT NULL,
            origin     TEXT NOT NULL DEFAULT '',
            node       TEXT NOT NULL DEFAULT '',
            lease_id   TEXT NOT NULL DEFAULT '',
            role       TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL DEFAULT 0,
            data       TEXT NOT NULL
        )""",
        "CREATE INDEX jobs_by_state ON jobs (state, created_at)",
        "CREATE INDEX jobs_by_created ON jobs (created_at)",
        """CREATE TABLE leases (
            id     TEXT PRIMARY KEY,
            job_id TEXT NOT NULL DEFAULT '',
            device TEXT NOT NULL DEFAULT '',
            data   TEXT NOT NULL
        )""",
        """CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
    ),
    # 2: an owner's runs apart from its origin's jobs. A job submitted and run on one node
    # (role 'both') becomes a job and a run; a run for another node moves; the ``role``
    # column is left, unused. (Rows keep ``device`` and ``more_devices`` in their data:
    # ``models`` reads them as ``devices``.)
    (
        """CREATE TABLE runs (
            id         TEXT PRIMARY KEY,
            state      TEXT NOT NULL,
            origin     TEXT NOT NULL DEFAULT '',
            lease_id   TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL DEFAULT 0,
            data       TEXT NOT NULL
        )""",
        "CREATE INDEX runs_by_created ON runs (created_at)",
        """INSERT INTO runs (id, state, origin, lease_id, created_at, updated_at, data)
           SELECT id, state, origin, lease_id, created_at, updated_at, data FROM jobs
           WHERE role IN ('owner', 'both')""",
        "DELETE FROM jobs WHERE role = 'owner'",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


def upsert_record(conn: sqlite3.Connection, record: JobRecord | RunRecord) -> None:
    """A job into ``jobs``, a run into ``runs``."""
    names: tuple[str, ...] = JOB_COLUMNS
    table = "jobs"
    if isinstance(record, RunRecord):
        table, names = "runs", RUN_COLUMNS
    fields = record.to_dict()
    columns = [fields.pop(name) for name in names]
    data = json.dumps(fields, separators=(",", ":"), sort_keys=True)
    conn.execute(
        f"INSERT INTO {table} ({', '.join(names)}, data) "
        f"VALUES ({', '.join('?' * (len(names) + 1))}) "
        "ON CONFLICT (id) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in (*names[1:], "data")),
        (*columns, data),
    )


def upsert_lease(conn: sqlite3.Connection, lease: dict[str, Any]) -> None:
    lease_id = _lease_id(lease)
    data = json.dumps(lease, separators=(",", ":"), sort_keys=True)
    job_id = lease.get("job_id", lease.get("job", ""))
    device = lease.get("device", "")
    conn.execute(
        "INSERT INTO leases (id, job_id, device, data) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET job_id = excluded.job_id, "
        "device = excluded.device, data = excluded.data",
        (lease_id, str(job_id or ""), str(device or ""), data),
    )


def upsert_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, str(value)),
    )


def _lease_id(lease: dict[str, Any]) -> str:
    lease_id = lease.get("id", lease.get("lease_id"))
    if not isinstance(lease_id, str) or not lease_id:
        raise ValueError("a lease needs a non-empty string 'id' (or 'lease_id')")
    return lease_id


# Types a JobRecord or RunRecord field must have to be usable; a row that fails this is
# corrupt.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "origin": str,
    "command": list,
    "compute_milli": int,
    "memory_mib": int,
    "kind": str,
    "priority": int,
    "env": dict,
    "state": str,
    "reason": str,
    "exit_code": (int, type(None)),
    "pid": (int, type(None)),
    "pid_start": (int, type(None)),
    "created_at": (int, float),
    "updated_at": (int, float),
    "devices": tuple,
}


def job_from_row(row: tuple[Any, ...]) -> JobRecord | None:
    """The job in a row of ``JOB_COLUMNS`` then ``data``; None, logged, if it is corrupt."""
    return _from_row(JobRecord, JOB_COLUMNS, row)


def run_from_row(row: tuple[Any, ...]) -> RunRecord | None:
    """The run in a row of ``RUN_COLUMNS`` then ``data``; None, logged, if it is corrupt."""
    return _from_row(RunRecord, RUN_COLUMNS, row)


def _from_row(kind: type[R], names: tuple[str, ...], row: tuple[Any, ...]) -> R | None:
    record_id = row[0]
    try:
        data = json.loads(row[-1])
        if not isinstance(data, dict):
            raise ValueError(f"data is a {type(data).__name__}, not an object")
        data.update(zip(names, row[:-1], strict=True))
        record = kind.from_dict(data)
        for name, want in _FIELD_TYPES.items():
            if name not in kind.__dataclass_fields__:
                continue
            value = getattr(record, name)
            if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
                raise ValueError(f"field {name!r} has type {type(value).__name__}")
        if not all(isinstance(a, str) for a in record.command):
            raise ValueError("command is not a list of strings")
        if not all(isinstance(d, str) for d in record.devices):
            raise ValueError("devices is not a list of strings")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in record.env.items()):
            raise ValueError("env is not a mapping of strings")
    except (ValueError, TypeError) as e:
        log.error("journal: skipping corrupt %s row %r: %s",
                  "run" if kind is RunRecord else "job", record_id, e)
        return None
    return record


def lease_from_row(lease_id: str, data: str) -> dict[str, Any] | None:
    """The lease in a row's ``data``; None, logged, if it is corrupt."""
    try:
        lease = json.loads(data)
        if not isinstance(lease, dict):
            raise ValueError(f"expected an object, got {type(lease).__name__}")
    except (ValueError, TypeError) as e:
        log.error("journal: skipping corrupt lease row %r: %s", lease_id, e)
        return None
    return lease
