"""A Python client of the local flexmesh agent (its HTTP API on the Unix socket).

    from flexmesh.client import Client

    client = Client()  # the socket: given, else $FLEXMESH_SOCKET, else the default
    job = client.submit(["python3", "train.py"], gpu=0.25, memory="4GiB")
    for piece in job.logs(follow=True):
        print(piece.data.decode(), end="")
    print(job.info["state"], job.info["exit_code"])

``Client`` is synchronous and needs only the standard library; ``AsyncClient`` (in
``flexmesh.client.aio``) is its twin for asyncio. Every failure is a ``ClientError``
carrying the agent's message and the HTTP status. The ``flexmesh`` command talks to the
agent through this client.
"""

from __future__ import annotations

from flexmesh.client.common import DEFAULT_SOCKET, ENDED, LogChunk, socket_path
from flexmesh.client.errors import (
    AgentUnavailable,
    BadRequest,
    ClientError,
    Forbidden,
    NotFound,
    ProtocolError,
    StreamEnded,
    StreamError,
    WaitTimeout,
)
from flexmesh.client.sync import Client, Job, UnixConnection

__all__ = [
    "DEFAULT_SOCKET",
    "ENDED",
    "AgentUnavailable",
    "BadRequest",
    "Client",
    "ClientError",
    "Forbidden",
    "Job",
    "LogChunk",
    "NotFound",
    "ProtocolError",
    "StreamEnded",
    "StreamError",
    "UnixConnection",
    "WaitTimeout",
    "socket_path",
]
