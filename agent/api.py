"""The local HTTP API on the agent's Unix socket (aiohttp).

    POST   /v1/jobs                  submit (JSON body, validated; 400 says what is wrong)
    GET    /v1/jobs                  list jobs known here
    GET    /v1/jobs/{id}[?wait=S]    one job; with ``wait`` block up to S s for it to end
    DELETE /v1/jobs/{id}             cancel
    GET    /v1/jobs/{id}/logs        output: ``?stream=stdout|stderr`` as text, or
                                     ``?format=ndjson`` both streams; ``&follow=1`` to follow
    GET    /v1/nodes, /v1/devices    the mesh as this node sees it
    GET    /v1/status                this agent: name, address, coordinator, counters, journal
    GET    /v1/keys, POST /v1/keys   the keyring's fingerprints; add, promote or remove a key
    GET    /metrics                  Prometheus text format
    GET    /ui, /ui/state            the read-only page of the mesh and the JSON it polls
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from flexmesh.agent import metrics, ui
from flexmesh.agent.apicommon import (
    AGENT_KEY,
    MAX_BODY,
    error,
    may_act_on,
    may_manage,
    peer_uid,
)
from flexmesh.agent.apijobs import (
    cancel_job,
    job_logs,
    job_results,
    list_jobs,
    show_job,
    submit,
)
from flexmesh.agent.apijson import BadRequest, gang_view, job_view, parse_submit
from flexmesh.agent.models import MAX_DEVICES
from flexmesh.agent.runtime import Agent

# Still importable from here: metrics, ui and the tests import these from api.
__all__ = [
    "AGENT_KEY",
    "MAX_BODY",
    "MAX_DEVICES",
    "BadRequest",
    "gang_view",
    "job_view",
    "make_app",
    "may_act_on",
    "parse_submit",
    "peer_uid",
    "serve",
]

log = logging.getLogger("flexmesh.api")


async def nodes(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT_KEY].node.views.nodes())


async def devices(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT_KEY].node.views.devices())


async def status(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    st = agent.node.views.status()
    return web.json_response({
        "name": st.name, "address": agent.addr, "coordinator": st.coordinator,
        "term": st.term, "is_coordinator": st.is_coordinator,
        "queue": st.queue, "enforcement": agent.enforcement,
        "ui": agent.ui_url,
        "counters": {**st.counters, **agent.counters},
        # Journal writes failing (a full disk): the node cannot record what it does.
        "journal": agent.commits.health(agent.loop.time()),
    })


async def keys_get(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT_KEY].keys.view())


async def keys_post(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    if not may_manage(request):
        log.info("keys refused uid=%s reason=not root or the agent's user", peer_uid(request))
        return error(403, "only root or the agent's own user may change the keyring")
    try:
        body = json.loads(await request.read() or b"null")
    except (ValueError, RecursionError):
        return error(400, "the body is not JSON")
    if (not isinstance(body, dict) or set(body) != {"op", "key"}
            or not isinstance(body["op"], str) or not isinstance(body["key"], str)):
        return error(400, 'the body must be {"op": "add|promote|remove", "key": "..."}')
    from flexmesh.protocol.crypto import KeyringError

    try:
        view = await agent.keys.change(body["op"], body["key"])
    except KeyringError as exc:
        return error(400, str(exc))
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
        return error(500, "internal error; see the agent's log")


def make_app(agent: Agent) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    app[AGENT_KEY] = agent
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{id}", show_job)
    app.router.add_delete("/v1/jobs/{id}", cancel_job)
    app.router.add_get("/v1/jobs/{id}/logs", job_logs)
    app.router.add_get("/v1/jobs/{id}/results", job_results)
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
    await listen(runner, agent, path)
    return runner


async def listen(runner: web.AppRunner, agent: Agent, path: str) -> None:
    """Bind the socket at ``path`` (again, when it was deleted: on SIGHUP)."""
    sock_path = Path(path)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    if _in_use(sock_path):
        raise OSError(f"{path} is the socket of a running agent: give each agent a socket "
                      "of its own (--socket)")
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()  # a stale socket of an agent that is gone
    site = web.UnixSite(runner, str(sock_path))
    await site.start()
    os.chmod(sock_path, 0o660)
    _chgrp(sock_path, agent.settings.socket_group)


def _in_use(path: Path) -> bool:
    """Whether something listens on the Unix socket at ``path`` (then it is not ours to
    remove)."""
    if not path.is_socket():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False  # nobody listens: a stale socket of an agent that is gone
    except OSError:
        return True  # busy, not ours to reach, slow: taken to be alive
    finally:
        probe.close()
    return True


def _chgrp(path: Path, group: str) -> None:
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        log.info("socket group %s does not exist; the socket keeps the agent's group", group)
        return
    try:
        os.chown(path, -1, gid)
    except OSError as exc:
        log.warning("cannot give the socket to group %s: %s", group, exc)
