"""The flexmesh client: HTTP over the local agent's Unix socket, with the standard library
only (``http.client``). Every failure is a ``ClientError`` (see ``errors``)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import tempfile
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from types import EllipsisType
from typing import Any

from flexmesh.client.common import (
    ENDED,
    LOG_READ_TIMEOUT,
    LONG_POLL,
    MAX_RESULT_BYTES,
    MAX_RESULT_FILES,
    LogChunk,
    chunk,
    decode,
    ended,
    ended_early,
    not_streamed,
    read_limit,
    results_missing,
    results_path,
    socket_path,
    submit_body,
    timed_out,
    unavailable,
    unpack_results,
)
from flexmesh.client.errors import (
    ClientError,
    ProtocolError,
    StreamError,
)

READ_BLOCK = 1 << 20  # bytes of results read at a time


class UnixConnection(http.client.HTTPConnection):
    """An HTTP connection to the agent's Unix socket at ``path``."""

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


class Client:
    """The local agent, reached over its Unix socket: ``socket`` (a path), else
    ``$FLEXMESH_SOCKET``, else ``/run/flexmesh/agent.sock``. ``timeout`` bounds each
    request (seconds; None waits as long as the agent takes). Each call opens a connection
    of its own, so one client may be used from several threads."""

    def __init__(self, socket: str | os.PathLike[str] | None = None,
                 timeout: float | None = 30.0) -> None:
        self.socket = socket_path(socket)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Client(socket={self.socket!r})"

    # --- the API ------------------------------------------------------------------------

    def submit(self, command: Sequence[str], *, gpu: float | None = None,
               compute_milli: int | None = None, memory: int | str | None = None,
               kind: str = "any", priority: int = 0, env: dict[str, str] | None = None,
               devices: int = 1, gang: int = 1, requeue: bool = True,
               preemptible: bool = False, wait_for_capacity: bool = False,
               workdir: str | os.PathLike[str] | None = None, image: str | None = None,
               image_network: str | None = None) -> Job:
        """Submit ``command`` (a list of arguments, not a shell line): the job's handle.
        ``gpu`` is a fraction of one device (0.25) or ``compute_milli`` milli-devices;
        ``memory`` MiB or a size (``"4GiB"``); ``workdir`` a directory the job runs in a
        copy of, wherever it is placed; ``image`` an OCI image to run it in (``image_network``:
        none, host or bridge). The rest as ``flexmesh submit``'s flags."""
        body = submit_body(list(command), gpu=gpu, compute_milli=compute_milli,
                           memory=memory, kind=kind, priority=priority, env=env,
                           devices=devices, gang=gang, requeue=requeue,
                           preemptible=preemptible, wait_for_capacity=wait_for_capacity,
                           workdir=workdir, image=image,
                           image_network=image_network)
        info = self.request("POST", "/v1/jobs", body)
        return Job(self, info["id"], info)

    def job(self, job_id: str) -> Job:
        """The handle of a job (or gang) submitted here, by its id or a unique prefix."""
        info = self.request("GET", f"/v1/jobs/{job_id}")
        return Job(self, info["id"], info)

    def jobs(self, here: bool = False) -> list[dict[str, Any]]:
        """The jobs submitted here, oldest first; ``here``: the runs on this node's devices
        instead, whoever submitted them."""
        result: list[dict[str, Any]] = self.request("GET", "/v1/jobs?here=1" if here
                                                    else "/v1/jobs")
        return result

    def nodes(self) -> list[dict[str, Any]]:
        """The mesh's nodes as this agent sees them (``name``, ``address``, ``state``,
        ``coordinator``, ...)."""
        result: list[dict[str, Any]] = self.request("GET", "/v1/nodes")
        return result

    def devices(self) -> list[dict[str, Any]]:
        """The mesh's devices: what each has, what is leased and what is lendable."""
        result: list[dict[str, Any]] = self.request("GET", "/v1/devices")
        return result

    def status(self) -> dict[str, Any]:
        """This agent: its name, address, the coordinator, the queue, counters."""
        result: dict[str, Any] = self.request("GET", "/v1/status")
        return result

    def keys(self, op: str = "list", key: str = "") -> dict[str, Any]:
        """The keyring's fingerprints; with ``op`` add, promote or remove, change it."""
        if op == "list":
            view: dict[str, Any] = self.request("GET", "/v1/keys")
        else:
            view = self.request("POST", "/v1/keys", {"op": op, "key": key})
        return view

    # --- HTTP ---------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None,
                timeout: float | EllipsisType | None = ...) -> Any:
        """``method path`` with ``body`` as JSON: the decoded answer, or its error raised.
        ``timeout``, when given, replaces the client's for this request."""
        limit = self.timeout if isinstance(timeout, EllipsisType) else timeout
        conn, resp = self._open(method, path, body, limit)
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise unavailable(self.socket, exc) from None
        finally:
            conn.close()
        return decode(f"{method} {path}", resp.status, data)

    def _open(self, method: str, path: str, body: Any,
              timeout: float | None) -> tuple[UnixConnection, http.client.HTTPResponse]:
        conn = UnixConnection(self.socket, timeout)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise unavailable(self.socket, exc) from None

    def stream(self, path: str,
               timeout: float | None) -> tuple[http.client.HTTPResponse, socket.socket]:
        """``GET path`` as a stream (200, else its error raised), and its socket: the
        caller closes both, and may set the socket's timeout before each read."""
        conn, resp = self._open("GET", path, None, timeout)
        if resp.status == 200 and conn.unix_sock is not None:
            return resp, conn.unix_sock
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise unavailable(self.socket, exc) from None
        finally:
            conn.close()
        raise not_streamed(f"GET {path}", resp.status, data)


class Job:
    """A job (or gang) submitted on the agent of ``client``. ``info`` is the job as last
    seen (the API's JSON: ``id``, ``state``, ``reason``, ``node``, ``exit_code``, ...)."""

    def __init__(self, client: Client, job_id: str,
                 info: dict[str, Any] | None = None) -> None:
        self.client = client
        self.id = job_id
        self.info: dict[str, Any] = dict(info or {})

    def __repr__(self) -> str:
        return f"Job({self.id!r}, state={self.state!r})"

    @property
    def state(self) -> str | None:
        state = self.info.get("state")
        return state if isinstance(state, str) else None

    def refresh(self) -> dict[str, Any]:
        """The job as it is now (``info`` updated)."""
        self.info = self.client.request("GET", f"/v1/jobs/{self.id}")
        return self.info

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """The job once it has ended (``info`` updated), asked with long polls; WaitTimeout
        when ``timeout`` seconds pass first (the job goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state not in ENDED:
            wait = LONG_POLL
            if deadline is not None:
                wait = min(max(deadline - time.monotonic(), 0.0), LONG_POLL)
                if wait <= 0:
                    raise timed_out(self.id, self.state)
            self.info = self.client.request("GET", f"/v1/jobs/{self.id}?wait={wait:.3f}",
                                            timeout=wait + 10)
        return self.info

    def cancel(self) -> dict[str, Any]:
        """Cancel the job: the agent's answer (``id``, ``result``, ``job``)."""
        answer: dict[str, Any] = self.client.request("DELETE", f"/v1/jobs/{self.id}")
        if isinstance(answer.get("job"), dict):
            self.info = answer["job"]
        return answer

    def logs(self, follow: bool = False, timeout: float | None = None) -> Iterator[LogChunk]:
        """The job's output, stdout and stderr as they were written; with ``follow`` on
        until the job ends (``info`` then has its end). NotFound when the job was forgotten
        meanwhile; the rest as ``log_records``."""
        for rec in self.log_records(follow, timeout):
            if rec.get("end"):
                ended(rec, self.id)
                return
            yield chunk(rec)

    def log_records(self, follow: bool = False, timeout: float | None = None
                    ) -> Generator[dict[str, Any], None, None]:
        """The API's log records as they come (``{"stream", "b64"}``, then the end record,
        which updates ``info``). WaitTimeout when ``timeout`` seconds pass first,
        StreamEnded when the agent closes the stream before the end, StreamError when
        reading fails."""
        deadline = None if timeout is None else time.monotonic() + timeout
        path = f"/v1/jobs/{self.id}/logs?format=ndjson" + ("&follow=1" if follow else "")
        resp, sock = self.client.stream(path, None if follow else LOG_READ_TIMEOUT)
        try:
            while True:
                line = self._readline(resp, sock, follow, deadline)
                rec = json.loads(line)
                if rec.get("end"):
                    self.info.update({k: rec.get(k) for k in ("state", "reason", "exit_code")})
                    yield rec
                    return
                yield rec
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise StreamError(f"reading the output of {self.id} failed: {exc}", self.id,
                              exc) from None
        finally:
            resp.close()
            sock.close()

    def _readline(self, resp: http.client.HTTPResponse, sock: socket.socket, follow: bool,
                  deadline: float | None) -> bytes:
        """The next line, read within the time left (WaitTimeout) and, when not following,
        within LOG_READ_TIMEOUT (a StreamError)."""
        limit, by_deadline = read_limit(follow, deadline, time.monotonic())
        if by_deadline and not limit:
            raise timed_out(self.id, self.state)
        sock.settimeout(limit)
        try:
            line = resp.readline()
        except TimeoutError:
            if by_deadline:
                raise timed_out(self.id, self.state) from None
            raise
        if not line:
            raise ended_early(self.id)
        return line

    def results(self, dest: str | os.PathLike[str], *, max_bytes: int = MAX_RESULT_BYTES,
                max_files: int = MAX_RESULT_FILES, attempt: int | None = None) -> list[Path]:
        """Copy the files the job left under ``$FLEXMESH_OUTPUT`` into ``dest`` (made if
        missing): the files written. The agent serves them as a tar archive at
        ``GET /v1/jobs/{id}/results``; an agent without that endpoint answers 404, raised
        as NotFound saying so. ProtocolError for an archive that is not one or would write
        outside ``dest``. ``attempt``: the results of that attempt of a requeued job
        (default: the current one's)."""
        what = f"GET /v1/jobs/{self.id}/results"
        conn, resp = self.client._open("GET", results_path(self.id, attempt), None,
                                       self.client.timeout)
        try:
            if resp.status != 200:
                raise results_missing(self.id, resp.status, resp.read())
            kind = resp.getheader("Content-Type", "")
            if not kind.startswith(("application/x-tar", "application/octet-stream")):
                raise ProtocolError(f"the agent answered {what} with {kind!r}, not a tar "
                                    "archive", resp.status)
            Path(dest).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=dest) as spool:
                while block := resp.read(READ_BLOCK):
                    spool.write(block)
                spool.seek(0)
                return unpack_results(spool, dest, max_bytes, max_files)
        except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            raise unavailable(self.client.socket, exc) from None
        finally:
            conn.close()


__all__ = ["Client", "ClientError", "Job", "LogChunk", "UnixConnection"]
