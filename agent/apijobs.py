"""The routes under ``/v1/jobs``: submit, list, show (and wait for), cancel, and the output.

A gang is submitted as one request and shown and cancelled by its id as one job; its
members are jobs of their own here, each with an id of its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import pwd
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from flexmesh.agent.apicommon import AGENT_KEY, MAX_BODY, error, peer_uid, refuse
from flexmesh.agent.apijson import BadRequest, gang_view, job_view, parse_submit, run_view
from flexmesh.agent.apiresults import results_view, serve_results, show_files
from flexmesh.agent.bundle import BundleError
from flexmesh.agent.joblogs import read_at
from flexmesh.agent.models import TERMINAL, JobRecord, RunRecord, gang_members, member_id
from flexmesh.agent.runtime.commit import JournalWriteError

if TYPE_CHECKING:
    from flexmesh.agent.runtime import Agent

log = logging.getLogger("flexmesh.api")

LOG_CHUNK = 1 << 20  # bytes of a log read at a time


async def submit(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    if agent.stopping:
        return error(503, "the agent is shutting down")
    try:
        raw = await request.read()
        if len(raw) > MAX_BODY:
            raise BadRequest(f"the body is larger than {MAX_BODY} bytes")
        try:
            body = json.loads(raw or b"null")
        except (ValueError, RecursionError) as exc:  # (nested too deep for the parser)
            raise BadRequest(f"the body is not JSON: {str(exc)[:200]}") from None
        fields = parse_submit(body)
    except BadRequest as exc:
        log.info("submit refused uid=%s reason=%r", peer_uid(request), str(exc))
        return error(400, str(exc))
    bundle = ""
    if fields["workdir"]:
        try:
            packed = await agent.payload.pack(fields["workdir"], peer_uid(request))
        except BundleError as exc:
            log.info("submit refused uid=%s reason=%r", peer_uid(request), str(exc))
            return error(400, str(exc))
        bundle = fields["bundle"] = packed.sha256
        fields["bundle_size"] = packed.size
    try:
        return await _accept(request, fields)
    finally:
        if bundle:  # the job holds it from now on (or was refused)
            agent.payload.unpin(bundle)


async def _accept(request: web.Request, fields: dict[str, Any]) -> web.Response:
    agent = request.app[AGENT_KEY]
    job_id = uuid.uuid4().hex[:12]
    size = fields["gang_size"]
    if size:
        # A gang: one member job per rank, each placed on a node of its own, all at once.
        fields.pop("gang_size")
        members = gang_members(job_id, size, origin=agent.node.name,
                               uid=peer_uid(request), **fields)
        try:
            await agent.submit_many(members)
        except JournalWriteError as exc:
            return _not_journaled(exc)
        log.info("gang accepted gang=%s members=%d uid=%s compute_milli=%d memory_mib=%d",
                 job_id, size, members[0].uid, members[0].compute_milli,
                 members[0].memory_mib)
        return web.json_response(gang_view(job_id, members), status=201)
    job = JobRecord(id=job_id, origin=agent.node.name, uid=peer_uid(request), **fields)
    try:
        await agent.submit(job)
    except JournalWriteError as exc:
        return _not_journaled(exc)
    log.info("job accepted job=%s uid=%s compute_milli=%d memory_mib=%d", job.id, job.uid,
             job.compute_milli, job.memory_mib)
    return web.json_response(job_view(job), status=201)


def _not_journaled(exc: JournalWriteError) -> web.Response:
    log.error("submit failed: the journal cannot be written: %s", exc)
    status = 507 if str(exc).startswith("disk full") else 503
    return error(status, f"not accepted: the journal cannot be written ({exc})")


def _full_id(request: web.Request) -> str:
    """The job or gang id the request names: as given, or the one id it is a prefix of
    (as git and docker take them); a prefix of several is a 400 naming them."""
    jobs = request.app[AGENT_KEY].node.origin.jobs
    given = request.match_info["id"]
    if not given or given in jobs or member_id(given, 0) in jobs:
        return given
    found = sorted({j.gang or j.id for j in jobs.values() if (j.gang or j.id).startswith(given)})
    if len(found) > 1:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"{given} is the start of {len(found)} job ids: "
                                      f"{shown}; give more of it"}),
            content_type="application/json")
    return found[0] if found else given


def _job(request: web.Request) -> JobRecord:
    agent = request.app[AGENT_KEY]
    job_id = _full_id(request)
    job = agent.node.origin.jobs.get(job_id)
    if job is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no job {job_id} was submitted here"}),
                               content_type="application/json")
    return job


async def list_jobs(request: web.Request) -> web.Response:
    """Jobs submitted here; with ``?here=1``, the runs on this node's devices instead,
    whoever submitted them, with the origin, the user each runs as, and its lease."""
    agent = request.app[AGENT_KEY]
    if request.query.get("here") not in (None, "", "0"):
        runs = sorted(agent.node.owner.runs.values(), key=lambda j: j.created_at)
        return web.json_response(await asyncio.to_thread(_runs_view, agent, runs))
    jobs = list(agent.node.origin.jobs.values())
    jobs.sort(key=lambda j: j.created_at)
    return web.json_response([job_view(j) for j in jobs])


def _runs_view(agent: Agent, runs: list[RunRecord]) -> list[dict[str, object]]:
    """(On a thread: the user names are NSS lookups.)"""
    out: list[dict[str, object]] = []
    for job in runs:
        view = run_view(job, agent.node.name)
        view["device_use"] = _use(agent, job.id)
        ids = agent.processes.job_user(job)
        uid = os.geteuid() if ids is None else ids[0]
        try:
            view["user"] = pwd.getpwuid(uid).pw_name
        except KeyError:
            view["user"] = str(uid)
        out.append(view)
    return out


def _gang(request: web.Request) -> list[JobRecord] | None:
    """The members of the gang the request names, if it names one submitted here."""
    agent = request.app[AGENT_KEY]
    gang = _full_id(request)
    mine = agent.node.origin.jobs
    first = mine.get(member_id(gang, 0))
    if gang in mine or first is None or first.gang != gang:
        return None
    members = [agent.node.origin.jobs.get(member_id(gang, r)) for r in range(first.gang_size)]
    return [m for m in members if m is not None]


async def show_job(request: web.Request) -> web.Response:
    """One job, or a gang by its id; with ``?wait=S``, once it has ended or S s passed."""
    agent = request.app[AGENT_KEY]
    members = _gang(request)
    ids = [m.id for m in members] if members is not None else [_job(request).id]
    wait = request.query.get("wait")
    if wait:
        try:
            seconds = min(max(float(wait), 0.0), 300.0)
        except ValueError:
            return error(400, "wait must be a number of seconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        for job_id in ids:  # each in turn, within the one deadline
            while _state(agent, job_id) not in TERMINAL and loop.time() < deadline:
                ev = agent.job_event(job_id)
                ev.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), min(1.0, deadline - loop.time()))
    jobs = [j for j in map(agent.node.origin.jobs.get, ids) if j is not None]
    if not jobs:  # forgotten while we waited (its retention ran out)
        return error(404, f"no job {request.match_info['id']}")
    if members is not None:
        return web.json_response(gang_view(jobs[0].gang, jobs))
    view = job_view(jobs[0])
    view["results"] = results_view(jobs[0])
    await show_files(agent, jobs[0], view["results"])
    if jobs[0].id in agent.node.owner.runs:  # it runs here: what it holds, as measured
        view["device_use"] = _use(agent, jobs[0].id)
    return web.json_response(view)


def _use(agent: Agent, job_id: str) -> dict[str, int | None] | None:
    """A job's measured device memory and utilization (None: not measured here)."""
    use = agent.sampler.job_use.get(job_id)
    if use is None:
        return None
    return {"memory_mib": use.memory_mib, "utilization_pct": use.utilization_pct}


def _state(agent: Agent, job_id: str) -> str:
    """A job's state now; a job forgotten meanwhile counts as ended."""
    job = agent.node.origin.jobs.get(job_id)
    return job.state if job is not None else "forgotten"


async def cancel_job(request: web.Request) -> web.Response:
    members = _gang(request)
    if members is not None:  # a gang: every member
        agent = request.app[AGENT_KEY]
        for m in members:
            refused = refuse(request, m, "cancel")
            if refused is not None:
                return refused
        results = [await agent.cancel(m.id) for m in members]
        gang = members[0].gang
        log.info("cancel gang=%s uid=%s results=%s", gang, peer_uid(request), results)
        members = [agent.node.origin.jobs[m.id] for m in members]
        return web.json_response({"id": gang, "result": ",".join(results),
                                  "job": gang_view(gang, members)}, status=202)
    job = _job(request)
    refused = refuse(request, job, "cancel")
    if refused is not None:
        return refused
    agent = request.app[AGENT_KEY]
    result = await agent.cancel(job.id)
    log.info("cancel job=%s uid=%s result=%s", job.id, peer_uid(request), result)
    return web.json_response({"id": job.id, "result": result, "job": job_view(job)},
                             status=202)


async def job_results(request: web.Request) -> web.StreamResponse:
    """The job's results as a tar archive (see ``apiresults``)."""
    return await serve_results(request, _job(request))


async def job_logs(request: web.Request) -> web.StreamResponse:
    job = _job(request)
    refused = refuse(request, job, "read the output of")
    if refused is not None:
        return refused
    agent = request.app[AGENT_KEY]
    follow = request.query.get("follow") in ("1", "true", "yes")
    ndjson = request.query.get("format") == "ndjson"
    stream = request.query.get("stream", "stdout")
    if stream not in ("stdout", "stderr"):
        return error(400, "stream must be stdout or stderr")
    streams = ("stdout", "stderr") if ndjson else (stream,)
    base = agent.state_dir / "jobs" / job.id
    resp = web.StreamResponse()
    resp.content_type = "application/x-ndjson" if ndjson else "application/octet-stream"
    await resp.prepare(request)
    offsets = dict.fromkeys(streams, 0)
    try:
        job = await _stream_logs(agent, job, resp, base, offsets, follow, ndjson)
        if ndjson:
            end = {"end": True, "state": job.state, "reason": job.reason,
                   "exit_code": job.exit_code,
                   "forgotten": job.id not in agent.node.origin.jobs}
            await resp.write(json.dumps(end).encode() + b"\n")
    except ConnectionResetError:  # the reader went away: nothing more to do
        return resp
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


async def _stream_logs(agent: Agent, job: JobRecord, resp: web.StreamResponse, base: Path,
                       offsets: dict[str, int], follow: bool, ndjson: bool) -> JobRecord:
    """Write a job's output from ``offsets`` on: all there is now, and with ``follow``
    until the job has ended and all of it is written. Returns the job as it ended (or as
    it was last seen, with its reason saying so, if it was forgotten meanwhile)."""
    while True:
        now = agent.node.origin.jobs.get(job.id)
        if now is None:  # past its retention, its output deleted with it
            return replace(job, reason=f"job {job.id} was forgotten (retention) while "
                                       "its output was read")
        job = now
        done = job.state in TERMINAL  # read state first: output written before it counts
        got = False
        for name in offsets:
            data = await asyncio.to_thread(read_at, base / name, offsets[name], LOG_CHUNK)
            if data:
                got = True
                offsets[name] += len(data)
                if ndjson:
                    line = {"stream": name, "b64": base64.b64encode(data).decode()}
                    await resp.write(json.dumps(line).encode() + b"\n")
                else:
                    await resp.write(data)
        if not got and (done or not follow):
            return job
        if not got:
            ev = agent.job_event(job.id)
            ev.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), 0.25)
