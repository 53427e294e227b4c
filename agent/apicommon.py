"""What every route of the local API shares: the key under which the app holds the agent,
the error response, and who the peer on the Unix socket is and what it may do.

The peer is known by ``SO_PEERCRED``, never by anything the request says about itself.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import struct

from aiohttp import web

from flexmesh.agent.models import JobRecord
from flexmesh.agent.runtime import Agent

log = logging.getLogger("flexmesh.api")

AGENT_KEY = web.AppKey("agent", Agent)
MAX_BODY = 256 * 1024


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process at the other end of the Unix socket; None over TCP."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


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


def refuse(request: web.Request, job: JobRecord, action: str) -> web.Response | None:
    """None when the peer may ``action`` the job; else the 403 to answer (and log it)."""
    ok, why = may_act_on(request, job)
    if ok:
        return None
    log.warning("refused %s job=%s uid=%s reason=%r", action, job.id, peer_uid(request), why)
    return error(403, f"not allowed to {action} job {job.id}: {why}")


def may_manage(request: web.Request) -> bool:
    """Whether the peer may change the keyring: root or the agent's own user only."""
    uid = peer_uid(request)
    return uid is not None and uid in (0, os.getuid())
