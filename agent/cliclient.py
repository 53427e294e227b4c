"""How the ``flexmesh`` command talks to the local agent: through ``flexmesh.client`` (the
one place that speaks HTTP to the socket), and the error, with the command's exit code,
for each way that can fail.
"""

from __future__ import annotations

import argparse
from typing import Any

from flexmesh.client import (
    DEFAULT_SOCKET,
    AgentUnavailable,
    BadRequest,
    Client,
    ClientError,
    ProtocolError,
    UnixConnection,
)
from flexmesh.client import socket_path as _socket_path

__all__ = ["DEFAULT_SOCKET", "CliError", "UnixConnection", "cli_error", "client", "get_json",
           "request", "socket_path"]


class CliError(Exception):
    """A command failed; ``code`` is the exit code it ends with (see ``cli``)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def cli_error(exc: ClientError) -> CliError:
    """A client's error as the command says it: 3 when the agent cannot be reached or
    answers what the client does not understand, 2 for a bad request (the agent's 400),
    else 1; the agent's message as it gave it."""
    if isinstance(exc, AgentUnavailable):
        if isinstance(exc.cause, FileNotFoundError | ConnectionRefusedError):
            return CliError(f"no flexmesh agent at {exc.socket} (is it running? set --socket "
                            "or FLEXMESH_SOCKET)", 3)
        return CliError(exc.message, 3)
    if isinstance(exc, ProtocolError):
        return CliError(exc.message, 3)
    return CliError(exc.message, 2 if isinstance(exc, BadRequest) else 1)


def get_json(sock: str, path: str, timeout: float = 5.0) -> Any:
    """``GET path`` on an agent's socket: the decoded body, or None when the agent cannot
    be reached or does not answer 200 (for scripts that poll agents)."""
    try:
        return Client(sock, timeout).request("GET", path)
    except ClientError:
        return None


def socket_path(args: argparse.Namespace) -> str:
    return _socket_path(args.socket)


def client(args: argparse.Namespace) -> Client:
    """The client of the agent the command names (``--socket``, else FLEXMESH_SOCKET)."""
    return Client(args.socket)


def request(args: argparse.Namespace, method: str, path: str, body: Any = None,
            timeout: float | None = 30.0) -> Any:
    """``method path`` on the command's agent: the decoded answer; a CliError else."""
    try:
        return client(args).request(method, path, body, timeout=timeout)
    except ClientError as exc:
        raise cli_error(exc) from None
