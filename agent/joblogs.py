"""Where a job's output lives, ``<state_dir>/jobs/<job_id>/stdout`` and ``.../stderr``,
and reading it from an offset: plain blocking file I/O, safe from any thread.
"""

from __future__ import annotations

from pathlib import Path

from flexmesh.agent.models import job_id_problem

STREAMS = ("stdout", "stderr")


def check_job_id(job_id: str) -> None:
    """A job id names a directory: refuse one that could name another (ValueError)."""
    problem = job_id_problem(job_id)
    if problem is not None:
        raise ValueError(problem)


def check_stream(stream: str) -> None:
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
