"""The local HTTP API on the agent's Unix socket (aiohttp).

    POST   /v1/jobs                  submit (JSON body, validated; 400 says what is wrong)
    GET    /v1/jobs                  list jobs known here
    GET    /v1/jobs/{id}[?wait=S]    one job; with ``wait`` block up to S s for it to end
    DELETE /v1/jobs/{id}             cancel
    GET    /v1/jobs/{id}/logs        output: ``?stream=stdout|stderr`` as text, or
                                     ``?format=ndjson`` both streams; ``&follow=1`` to follow
    GET    /v1/nodes, /v1/devices    the mesh as this node sees it
    GET    /v1/status                this agent: name, address, coordinator, counters
    GET    /v1/keys, POST /v1/keys   the keyring's fingerprints; add, promote or remove a key
    GET    /metrics                  Prometheus text format
    GET    /ui, /ui/state            the read-only page of the mesh and the JSON it polls
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from flexmesh.agent import metrics, ui
from flexmesh.agent.jobs import read_at
from flexmesh.agent.models import (
    MAX_DEVICES,
    MAX_GANG,
    PLACED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    JobRecord,
    gang_members,
    member_id,
    request_problem,
)
from flexmesh.agent.runtime import Agent

log = logging.getLogger("flexmesh.api")

MAX_BODY = 256 * 1024
LOG_CHUNK = 1 << 20  # bytes of a log read at a time
_SUBMIT_KEYS = {"command", "compute_milli", "gpu", "memory_mib", "kind", "priority", "env",
                "requeue", "devices", "preemptible", "gang"}
AGENT_KEY = web.AppKey("agent", Agent)


class BadRequest(Exception):
    pass


def job_view(job: JobRecord) -> dict[str, Any]:
    return {
        "id": job.id, "state": job.state, "reason": job.reason, "node": job.node,
        "device": job.device, "devices": job.devices, "count": job.count,
        "compute_milli": job.compute_milli, "memory_mib": job.memory_mib,
        "exit_code": job.exit_code, "origin": job.origin, "kind": job.kind,
        "priority": job.priority, "preemptible": job.preemptible, "command": job.command,
        "created_at": job.created_at, "updated_at": job.updated_at, "attempts": job.attempts,
        "gang": job.gang, "rank": job.rank, "gang_size": job.gang_size,
    }


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def parse_submit(body: Any) -> dict[str, Any]:
    """Validate a submission; return normalised fields or raise BadRequest.

    The types are checked here; what a request may ask for is ``request_problem``'s to say.
    """
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - _SUBMIT_KEYS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    command = body.get("command")
    if (not isinstance(command, list) or not command
            or not all(isinstance(a, str) for a in command) or not command[0]):
        raise BadRequest("command must be a non-empty list of strings")
    if "gpu" in body and "compute_milli" in body:
        raise BadRequest("give either gpu (a fraction) or compute_milli, not both")
    if "gpu" in body:
        frac = body["gpu"]
        if isinstance(frac, bool) or not isinstance(frac, (int, float)):
            raise BadRequest("gpu must be a number between 0 and 1")
        if not 0 < frac <= 1:
            raise BadRequest(f"gpu fraction {frac} must be above 0 and at most 1 "
                             "(one whole device)")
        compute = max(1, round(frac * 1000))
    else:
        compute = _integer(body, "compute_milli", 1000, "compute_milli must be an integer")
    memory = _integer(body, "memory_mib", 0, "memory_mib must be an integer")
    kind = body.get("kind", "any")
    if kind not in ("gpu", "npu", "any"):
        raise BadRequest(f"kind {kind!r} must be gpu, npu or any")
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > 1000:
        raise BadRequest("priority must be an integer between -1000 and 1000")
    env = body.get("env", {})
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k
            for k, v in env.items()):
        raise BadRequest("env must be an object of string names to string values")
    requeue = body.get("requeue", True)
    if not isinstance(requeue, bool):
        raise BadRequest("requeue must be true or false")
    count = _integer(body, "devices", 1, f"devices must be an integer from 1 to {MAX_DEVICES}")
    preemptible = body.get("preemptible", False)
    if not isinstance(preemptible, bool):
        raise BadRequest("preemptible must be true or false")
    gang = _integer(body, "gang", 1, f"gang must be an integer from 1 to {MAX_GANG} (nodes, "
                    "one member each)")
    problem = request_problem(compute, memory, count, gang, preemptible)
    if problem is not None:
        raise BadRequest(problem)
    return {"command": command, "compute_milli": compute, "memory_mib": memory, "kind": kind,
            "priority": priority, "env": env, "requeue": requeue, "count": count,
            "preemptible": preemptible, "gang_size": gang if gang > 1 else 0}


def _integer(body: dict[str, Any], key: str, default: int, message: str) -> int:
    """``body[key]`` (or ``default``) if it is an integer (not a bool); else BadRequest."""
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(message)
    return value


async def submit(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    if agent.stopping:
        return _error(503, "the agent is shutting down")
    try:
        raw = await request.read()
        if len(raw) > MAX_BODY:
            raise BadRequest(f"the body is larger than {MAX_BODY} bytes")
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        fields = parse_submit(body)
    except BadRequest as exc:
        log.info("submit refused uid=%s reason=%r", peer_uid(request), str(exc))
        return _error(400, str(exc))
    job_id = uuid.uuid4().hex[:12]
    size = fields["gang_size"]
    if size:
        # A gang: one member job per rank, each placed on a node of its own, all at once.
        fields.pop("gang_size")
        members = gang_members(job_id, size, origin=agent.node.name, role="origin",
                               uid=peer_uid(request), **fields)
        await agent.submit_many(members)
        log.info("gang accepted gang=%s members=%d uid=%s compute_milli=%d memory_mib=%d",
                 job_id, size, members[0].uid, members[0].compute_milli,
                 members[0].memory_mib)
        return web.json_response(gang_view(job_id, members), status=201)
    job = JobRecord(id=job_id, origin=agent.node.name, role="origin",
                    uid=peer_uid(request), **fields)
    await agent.submit(job)
    log.info("job accepted job=%s uid=%s compute_milli=%d memory_mib=%d", job.id, job.uid,
             job.compute_milli, job.memory_mib)
    return web.json_response(job_view(job), status=201)


def gang_view(gang: str, members: list[JobRecord]) -> dict[str, Any]:
    """A gang as one job: its members, and a state that is the least advanced member's
    while any runs on, then ``succeeded`` if all did, else the first member's that did
    not (with its reason)."""
    live = [m for m in members if not m.terminal]
    if live:
        order = (QUEUED, PLACED, RUNNING)
        state = min((m.state for m in live), key=order.index)
        reason = next((m.reason for m in live if m.state == state and m.reason), "")
        exit_code = None
    else:
        bad = [m for m in members if m.state != SUCCEEDED]
        state = bad[0].state if bad else SUCCEEDED
        reason = bad[0].reason if bad else ""
        exit_code = bad[0].exit_code if bad else 0
    first = members[0]
    return {
        "id": gang, "gang": gang, "state": state, "reason": reason, "exit_code": exit_code,
        "node": ",".join(m.node for m in members if m.node), "device": "", "devices": [],
        "count": first.count, "compute_milli": first.compute_milli,
        "memory_mib": first.memory_mib, "origin": first.origin, "kind": first.kind,
        "priority": first.priority, "preemptible": False, "command": first.command,
        "created_at": first.created_at, "updated_at": max(m.updated_at for m in members),
        "attempts": max(m.attempts for m in members), "gang_size": len(members),
        "members": [job_view(m) for m in members],
    }


def _job(request: web.Request) -> JobRecord:
    agent = request.app[AGENT_KEY]
    job_id = request.match_info["id"]
    job = agent.node.origin.jobs.get(job_id)
    if job is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no job {job_id} was submitted here"}),
                               content_type="application/json")
    return job


async def list_jobs(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    jobs = list(agent.node.origin.jobs.values())
    jobs.sort(key=lambda j: j.created_at)
    return web.json_response([job_view(j) for j in jobs])


def _gang(request: web.Request) -> list[JobRecord] | None:
    """The members of the gang the request names, if it names one submitted here."""
    agent = request.app[AGENT_KEY]
    gang = request.match_info["id"]
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
            return _error(400, "wait must be a number of seconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        for job_id in ids:  # each in turn, within the one deadline
            while agent.node.origin.jobs[job_id].state not in TERMINAL and loop.time() < deadline:
                ev = agent.job_event(job_id)
                ev.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), min(1.0, deadline - loop.time()))
    jobs = [agent.node.origin.jobs[job_id] for job_id in ids]
    if members is not None:
        return web.json_response(gang_view(jobs[0].gang, jobs))
    return web.json_response(job_view(jobs[0]))


def _operator_gid(agent: Agent) -> int | None:
    name = agent.settings.operator_group
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def may_act_on(request: web.Request, job: JobRecord) -> tuple[bool, str]:
    """Whether the peer may cancel or read ``job``: its submitter, root, the agent's own
    user, or a member of the operator group."""
    uid = peer_uid(request)
    if uid is None or uid in (0, os.geteuid()) or uid == job.uid:
        return True, ""
    gid = _operator_gid(request.app[AGENT_KEY])
    if gid is not None:
        try:
            user = pwd.getpwuid(uid)
            if gid in os.getgrouplist(user.pw_name, user.pw_gid):
                return True, ""
        except KeyError:
            pass
    return False, f"uid {uid} is not the submitter (uid {job.uid}) nor an operator"


def _refuse(request: web.Request, job: JobRecord, action: str) -> web.Response | None:
    ok, why = may_act_on(request, job)
    if ok:
        return None
    log.warning("refused %s job=%s uid=%s reason=%r", action, job.id, peer_uid(request), why)
    return _error(403, f"not allowed to {action} job {job.id}: {why}")


async def cancel_job(request: web.Request) -> web.Response:
    members = _gang(request)
    if members is not None:  # a gang: every member
        agent = request.app[AGENT_KEY]
        for m in members:
            refused = _refuse(request, m, "cancel")
            if refused is not None:
                return refused
        results = [await agent.cancel(m.id) for m in members]
        gang = members[0].gang
        log.info("cancel gang=%s uid=%s results=%s", gang, peer_uid(request), results)
        members = [agent.node.origin.jobs[m.id] for m in members]
        return web.json_response({"id": gang, "result": ",".join(results),
                                  "job": gang_view(gang, members)}, status=202)
    job = _job(request)
    refused = _refuse(request, job, "cancel")
    if refused is not None:
        return refused
    agent = request.app[AGENT_KEY]
    result = await agent.cancel(job.id)
    log.info("cancel job=%s uid=%s result=%s", job.id, peer_uid(request), result)
    return web.json_response({"id": job.id, "result": result, "job": job_view(job)},
                             status=202)


async def job_logs(request: web.Request) -> web.StreamResponse:
    job = _job(request)
    refused = _refuse(request, job, "read the output of")
    if refused is not None:
        return refused
    agent = request.app[AGENT_KEY]
    follow = request.query.get("follow") in ("1", "true", "yes")
    ndjson = request.query.get("format") == "ndjson"
    stream = request.query.get("stream", "stdout")
    if stream not in ("stdout", "stderr"):
        return _error(400, "stream must be stdout or stderr")
    streams = ("stdout", "stderr") if ndjson else (stream,)
    base = agent.state_dir / "jobs" / job.id
    resp = web.StreamResponse()
    resp.content_type = "application/x-ndjson" if ndjson else "application/octet-stream"
    await resp.prepare(request)
    offsets = dict.fromkeys(streams, 0)
    while True:
        job = agent.node.origin.jobs[job.id]
        done = job.state in TERMINAL  # read state first: output written before it counts
        got = False
        for name in streams:
            data = await asyncio.to_thread(read_at, base / name, offsets[name], LOG_CHUNK)
            if data:
                got = True
                offsets[name] += len(data)
                if ndjson:
                    line = {"stream": name, "b64": base64.b64encode(data).decode()}
                    await resp.write(json.dumps(line).encode() + b"\n")
                else:
                    await resp.write(data)
        if not follow or (done and not got):
            break
        if not got:
            ev = agent.job_event(job.id)
            ev.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), 0.25)
    if ndjson:
        end = {"end": True, "state": job.state, "reason": job.reason, "exit_code": job.exit_code}
        await resp.write(json.dumps(end).encode() + b"\n")
    await resp.write_eof()
    return resp


async def nodes(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT_KEY].node.views.nodes())


async def devices(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT_KEY].node.views.devices())


async def status(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    st = agent.node.status()
    return web.json_response({
        "name": st.name, "address": agent.addr, "coordinator": st.coordinator,
        "term": st.term, "is_coordinator": st.is_coordinator,
        "queue": st.queue, "enforcement": agent.enforcement,
        "ui": agent.ui_url,
        "counters": {**st.counters, **agent.counters},
    })


def _may_manage(request: web.Request) -> bool:
    uid = peer_uid(request)
    return uid is not None and uid in (0, os.getuid())


async def keys_get(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT_KEY].keys_view())


async def keys_post(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    if not _may_manage(request):
        log.info("keys refused uid=%s reason=not root or the agent's user", peer_uid(request))
        return _error(403, "only root or the agent's own user may change the keyring")
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError:
        return _error(400, "the body is not JSON")
    if (not isinstance(body, dict) or set(body) != {"op", "key"}
            or not isinstance(body["op"], str) or not isinstance(body["key"], str)):
        return _error(400, 'the body must be {"op": "add|promote|remove", "key": "..."}')
    from flexmesh.protocol.crypto import KeyringError

    try:
        view = await agent.keys_change(body["op"], body["key"])
    except KeyringError as exc:
        return _error(400, str(exc))
    return web.json_response(view)


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except web.HTTPException:
        raise
    except Exception:
        log.exception("API handler failed path=%s", request.path)
        return _error(500, "internal error; see the agent's log")


def make_app(agent: Agent) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    app[AGENT_KEY] = agent
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{id}", show_job)
    app.router.add_delete("/v1/jobs/{id}", cancel_job)
    app.router.add_get("/v1/jobs/{id}/logs", job_logs)
    app.router.add_get("/v1/nodes", nodes)
    app.router.add_get("/v1/devices", devices)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/keys", keys_get)
    app.router.add_post("/v1/keys", keys_post)
    app.router.add_get("/metrics", metrics.metrics)
    ui.add_routes(app)  # GET /ui, /ui/ and /ui/state
    return app


async def serve(agent: Agent, path: str) -> web.AppRunner:
    runner = web.AppRunner(make_app(agent), access_log=None)
    await runner.setup()
    sock_path = Path(path)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    site = web.UnixSite(runner, str(sock_path))
    await site.start()
    os.chmod(sock_path, 0o660)
    _chgrp(sock_path, agent.settings.socket_group)
    return runner


def _chgrp(path: Path, group: str) -> None:
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        log.info("socket group %r does not exist; the socket keeps the agent's group", group)
        return
    try:
        os.chown(path, -1, gid)
    except OSError as exc:
        log.warning("cannot give the socket to group %s: %s", group, exc)
