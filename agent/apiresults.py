"""``GET /v1/jobs/{id}/results``: a job's results (what its run left under
``$FLEXMESH_OUTPUT``) as the tar archive its owner packed; and what ``show`` says of them.

The archive of the job's current attempt is served, or with ``?attempt=N`` that of an
earlier one (a requeued job's results are kept apart, as its logs are). An answer other
than the archive is JSON with an ``error``: 409 while the job runs or its results are on
their way here, 404 when there are none (the reason says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from flexmesh.agent.apicommon import AGENT_KEY, error, refuse
from flexmesh.agent.models import RESULTS_FETCHING, RESULTS_HERE, JobRecord
from flexmesh.agent.resultpack import list_results

if TYPE_CHECKING:
    from flexmesh.agent.runtime import Agent

SEND_BLOCK = 1 << 20  # bytes of an archive sent at a time
FETCH_WAIT = 20.0  # seconds a request waits for results on their way (a client: 30 s)
MAX_LISTED = 1000  # files ``show`` names at most
NONE = "the run left none (it never started, or its owner or process was lost)"


def results_view(job: JobRecord) -> dict[str, Any]:
    """Where the results of the job's current attempt stand: ``pending`` (it has not
    ended), ``fetching``, ``here``, ``failed`` or ``none``; their size and note."""
    current = job.results_attempt == job.attempts
    state = job.results_state if current and job.results_state else (
        "none" if job.terminal else "pending")
    note = job.results_note if current else ""
    if state == "none" and not note:
        note = NONE
    return {"state": state, "size": job.results_size if state == RESULTS_HERE else 0,
            "note": note, "attempt": job.attempts, "files": []}


async def show_files(agent: Agent, job: JobRecord, view: dict[str, Any]) -> None:
    """Name the files of results that are here, with their sizes, in ``view``."""
    if view["state"] != RESULTS_HERE:
        return
    path = agent.results.archive_path(job.id, job.attempts)
    try:
        view["files"] = await asyncio.to_thread(list_results, path, MAX_LISTED)
    except (OSError, EOFError, tarfile.TarError) as exc:  # said, not raised
        view["note"] = f"the archive cannot be read: {exc}"


async def serve_results(request: web.Request, job: JobRecord) -> web.StreamResponse:
    """The answer to ``GET /v1/jobs/{id}/results`` for ``job``."""
    refused = refuse(request, job, "read the results of")
    if refused is not None:
        return refused
    agent = request.app[AGENT_KEY]
    attempt = request.query.get("attempt")
    if attempt is not None:
        if not attempt.isdigit() or int(attempt) > job.attempts:
            return error(400, f"attempt must be a number from 0 to {job.attempts}")
        if int(attempt) != job.attempts:
            return await _send(request, agent.results.archive_path(job.id, int(attempt)),
                               f"attempt {attempt} of job {job.id} left no results here")
    view = await _settled(agent, job)
    if view["state"] == "pending":
        return error(409, f"job {job.id} is {job.state}: its results come when it ends")
    if view["state"] == RESULTS_FETCHING:
        return error(409, f"the results of job {job.id} are on their way from {job.node}")
    if view["state"] != RESULTS_HERE:
        return error(404, f"job {job.id} has no results: {view['note']}")
    return await _send(request, agent.results.archive_path(job.id, job.attempts),
                       f"the results of job {job.id} are gone from this node")


async def _settled(agent: Agent, job: JobRecord) -> dict[str, Any]:
    """Where the job's results stand, once they are no longer on their way (or after
    ``FETCH_WAIT`` s: a job just ended is read back at once, as ``--wait`` returns)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FETCH_WAIT
    view = results_view(job)
    while view["state"] == RESULTS_FETCHING and loop.time() < deadline:
        ev = agent.job_event(job.id)
        ev.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ev.wait(), min(1.0, deadline - loop.time()))
        job = agent.node.origin.jobs.get(job.id, job)
        view = results_view(job)
    return view


async def _send(request: web.Request, path: Path, missing: str) -> web.StreamResponse:
    try:
        f = await asyncio.to_thread(open, path, "rb")
    except FileNotFoundError:
        return error(404, missing)
    try:
        resp = web.StreamResponse()
        resp.content_type = "application/x-tar"
        resp.content_length = await asyncio.to_thread(lambda: Path(path).stat().st_size)
        await resp.prepare(request)
        while block := await asyncio.to_thread(f.read, SEND_BLOCK):
            await resp.write(block)
        await resp.write_eof()
        return resp
    finally:
        f.close()
