"""How the ``flexmesh`` command talks to the local agent: HTTP over its Unix socket, and
the error (with the command's exit code) for each way that can fail.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
from typing import Any

DEFAULT_SOCKET = "/run/flexmesh/agent.sock"


class CliError(Exception):
    """A command failed; ``code`` is the exit code it ends with (see ``cli``)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path
        self.unix_sock: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = self.unix_sock = sock  # (``sock`` is dropped once a response has it)


def get_json(sock: str, path: str, timeout: float = 5.0) -> Any:
    """``GET path`` on an agent's socket: the decoded body, or None when the agent cannot
    be reached or does not answer 200 (for scripts that poll agents)."""
    conn = UnixConnection(sock, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read()
        return json.loads(data) if resp.status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def socket_path(args: argparse.Namespace) -> str:
    return str(args.socket or os.environ.get("FLEXMESH_SOCKET") or DEFAULT_SOCKET)


def request(args: argparse.Namespace, method: str, path: str, body: Any = None,
            timeout: float | None = 30.0, stream: bool = False) -> Any:
    conn = UnixConnection(socket_path(args), timeout)
    resp = _request(conn, method, path, body)
    if stream and resp.status == 200:
        return resp
    return _decoded(conn, resp)


def open_stream(args: argparse.Namespace,
                path: str) -> tuple[http.client.HTTPResponse, socket.socket]:
    """``GET path`` as a stream, and its socket: the caller sets the socket's timeout
    before each read (a deadline for the whole stream, not for each read)."""
    conn = UnixConnection(socket_path(args), None)
    resp = _request(conn, "GET", path, None)
    if resp.status != 200 or conn.unix_sock is None:
        _decoded(conn, resp)  # raises the agent's error
        raise CliError(f"the agent answered GET {path} with {resp.status}", 3)
    return resp, conn.unix_sock


def _request(conn: UnixConnection, method: str, path: str,
             body: Any) -> http.client.HTTPResponse:
    sock = conn.path
    payload = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    try:
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
    except (FileNotFoundError, ConnectionRefusedError):
        raise CliError(f"no flexmesh agent at {sock} (is it running? set --socket or "
                       "FLEXMESH_SOCKET)", 3) from None
    except PermissionError:
        raise CliError(f"permission denied on {sock} (are you in the flexmesh group?)",
                       3) from None
    except (OSError, http.client.HTTPException) as exc:
        raise CliError(f"talking to the agent at {sock} failed: {exc}", 3) from None
    return resp


def _decoded(conn: UnixConnection, resp: http.client.HTTPResponse) -> Any:
    """The JSON of an answer read whole, or the agent's error raised as a CliError."""
    data = resp.read()
    conn.close()
    try:
        decoded = json.loads(data) if data else None
    except ValueError:
        decoded = data.decode(errors="replace")
    if resp.status >= 400:
        msg = decoded.get("error") if isinstance(decoded, dict) else decoded
        raise CliError(f"{msg}", 1 if resp.status != 400 else 2)
    return decoded
