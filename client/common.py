"""What the sync and the async client share, none of it I/O on the agent: where the socket
is, the body of a submission, how an answer is decoded, and how results are unpacked.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import IO, Any, NamedTuple

from flexmesh.client.errors import (
    AgentUnavailable,
    BadRequest,
    ClientError,
    NotFound,
    ProtocolError,
    StreamEnded,
    WaitTimeout,
    from_status,
)

DEFAULT_SOCKET = "/run/flexmesh/agent.sock"
ENDED = ("succeeded", "failed", "cancelled", "preempted", "lost")
LONG_POLL = 30.0  # seconds one wait for a job's end may be held by the agent
LOG_READ_TIMEOUT = 60.0  # seconds a read of output that is not followed may take
MAX_RESULT_BYTES = 1 << 40  # what ``results`` unpacks at most, unless told otherwise
MAX_RESULT_FILES = 1_000_000


class LogChunk(NamedTuple):
    """A piece of a job's output as it was written: ``stream`` is stdout or stderr."""

    stream: str
    data: bytes


def unavailable(sock: str, exc: BaseException) -> AgentUnavailable:
    """The error for a request that did not reach the agent, or got no answer."""
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        text = (f"no flexmesh agent at {sock} (is it running? give its socket, or set "
                "FLEXMESH_SOCKET)")
    elif isinstance(exc, PermissionError):
        text = f"permission denied on {sock} (are you in the flexmesh group?)"
    else:
        text = f"talking to the agent at {sock} failed: {str(exc) or type(exc).__name__}"
    return AgentUnavailable(text, sock, exc)


def socket_path(socket: str | os.PathLike[str] | None) -> str:
    """The agent's socket: the one given, else ``$FLEXMESH_SOCKET``, else the default."""
    return str(os.fspath(socket) if socket else
               os.environ.get("FLEXMESH_SOCKET") or DEFAULT_SOCKET)


def submit_body(command: list[str], *, gpu: float | None, compute_milli: int | None,
                memory: int | str | None, kind: str, priority: int,
                env: dict[str, str] | None, devices: int, gang: int, requeue: bool,
                preemptible: bool, wait_for_capacity: bool,
                workdir: str | os.PathLike[str] | None, image: str | None = None,
                image_network: str | None = None) -> dict[str, Any]:
    """The body of ``POST /v1/jobs``; what it may ask for is the agent's to check (its 400
    says what is wrong). ``memory`` is MiB, or a size such as ``"4GiB"``."""
    from flexmesh.agent.units import parse_size

    if isinstance(memory, str):
        try:
            memory = parse_size(memory)
        except ValueError as exc:  # (checked here, as the agent would: no status)
            raise BadRequest(f"memory: {exc}") from None
    body: dict[str, Any] = {"command": list(command), "memory_mib": memory or 0,
                            "kind": kind, "priority": priority, "env": dict(env or {})}
    if not requeue:
        body["requeue"] = False
    if gpu is not None:
        body["gpu"] = gpu
    if compute_milli is not None:
        body["compute_milli"] = compute_milli
    if devices != 1:
        body["devices"] = devices
    if preemptible:
        body["preemptible"] = True
    if wait_for_capacity:
        body["wait_for_capacity"] = True
    if gang != 1:
        body["gang"] = gang
    if workdir:
        body["workdir"] = os.path.abspath(workdir)  # packed by the agent, as this user
    if image:
        body["image"] = image
    if image_network:
        body["image_network"] = image_network
    return body


def decode(what: str, status: int, data: bytes) -> Any:
    """The JSON of an answer to ``what`` (``"GET /v1/jobs"``), or its error raised with the
    agent's message."""
    try:
        decoded = json.loads(data) if data else None
    except ValueError:
        decoded = data.decode(errors="replace")
        if status < 400:
            raise ProtocolError(f"the agent's answer to {what} is not JSON: "
                                f"{decoded[:200]!r}", status) from None
    if status >= 400:
        msg = decoded.get("error") if isinstance(decoded, dict) else decoded
        raise from_status(status, f"{msg}")
    return decoded


def not_streamed(what: str, status: int, data: bytes) -> ClientError:
    """The error for an answer to a stream's request that is not 200."""
    try:
        decode(what, status, data)
    except ClientError as exc:
        return exc
    return ProtocolError(f"the agent answered {what} with {status}", status)


def results_path(job_id: str, attempt: int | None) -> str:
    """The path of ``GET /v1/jobs/{id}/results``, for one attempt if given."""
    path = f"/v1/jobs/{job_id}/results"
    return path if attempt is None else f"{path}?attempt={int(attempt)}"


def results_missing(job_id: str, status: int, data: bytes) -> ClientError:
    """The error for an answer to ``GET /v1/jobs/{id}/results`` that is not 200. A 404
    that is not the agent's JSON comes from an agent without the endpoint: it says so."""
    what = f"GET /v1/jobs/{job_id}/results"
    try:
        json.loads(data)
    except ValueError:
        if status == 404:
            text = data.decode(errors="replace").strip()[:200]
            return NotFound(f"this agent does not serve results ({what} answered {text!r}): "
                            "it is older than results", status)
    return not_streamed(what, status, data)


def read_limit(follow: bool, deadline: float | None, now: float) -> tuple[float | None, bool]:
    """How long the next read of a log stream may take, and whether that is the wait's
    deadline (then running out is a WaitTimeout): a read of output not followed takes at
    most LOG_READ_TIMEOUT; a followed one may wait as long as the job stays quiet."""
    limit = None if follow else LOG_READ_TIMEOUT
    if deadline is not None:
        left = max(deadline - now, 0.0)
        if limit is None or left <= limit:
            return left, True
    return limit, False


def timed_out(job_id: str, state: str | None) -> WaitTimeout:
    return WaitTimeout(f"job {job_id} is still {state or 'running'}: the time ran out", job_id)


def ended_early(job_id: str) -> StreamEnded:
    return StreamEnded(f"the output of {job_id} ended early: the agent closed the stream "
                       "(stopped or restarted?); read it again for the rest", job_id, None)


def chunk(rec: dict[str, Any]) -> LogChunk:
    return LogChunk(rec["stream"], base64.b64decode(rec["b64"]))


def ended(rec: dict[str, Any], job_id: str) -> dict[str, Any]:
    """What a log stream's end record says of the job; NotFound if it was forgotten."""
    if rec.get("forgotten"):
        raise NotFound(str(rec.get("reason")))
    return {k: rec.get(k) for k in ("state", "reason", "exit_code")}


def unpack_results(archive: IO[bytes], dest: str | os.PathLike[str], max_bytes: int,
                   max_files: int) -> list[Path]:
    """Unpack a job's results (a tar archive) into ``dest``, created if missing: the
    regular files written, sorted. Nothing that leaves ``dest`` (absolute paths, ``..``,
    links out), no devices, no setuid bits; ProtocolError for such an archive."""
    import tarfile  # (here: the command need not load it)

    from flexmesh.agent.bundle import BundleError, check_members

    top = Path(dest)
    top.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=archive, mode="r:*") as tar:
            check_members(tar, max_bytes, max_files)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(top, filter="data")
            else:  # (before 3.11.4: check_members refuses every link with "..")
                tar.extractall(top)
            names = [m.name for m in tar.getmembers() if m.isreg()]
    except BundleError as exc:
        raise ProtocolError(f"the results were refused: {exc}") from None
    except (tarfile.TarError, EOFError) as exc:
        raise ProtocolError(f"the results cannot be unpacked: {exc}") from None
    return sorted(top / name for name in names)
