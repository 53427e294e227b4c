"""The asyncio twin of ``Client``: the same calls, awaited, over aiohttp's UnixConnector.

    async with AsyncClient() as client:
        job = await client.submit(["python3", "train.py"], gpu=0.25)
        async for piece in job.logs(follow=True):
            ...
        print((await job.wait())["state"])
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from types import EllipsisType
from typing import Any

import aiohttp

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
from flexmesh.client.errors import ClientError, ProtocolError, StreamError

MAX_LINE = 8 << 20  # bytes of one log record at most (the agent sends 1 MiB of output each)


class AsyncClient:
    """The local agent over its Unix socket, for asyncio (see ``Client`` for ``socket``
    and ``timeout``). Close it (``async with``, or ``await close()``) when done."""

    def __init__(self, socket: str | os.PathLike[str] | None = None,
                 timeout: float | None = 30.0) -> None:
        self.socket = socket_path(socket)
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket),
                timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    # --- the API ------------------------------------------------------------------------

    async def submit(self, command: Sequence[str], *, gpu: float | None = None,
                     compute_milli: int | None = None, memory: int | str | None = None,
                     kind: str = "any", priority: int = 0, env: dict[str, str] | None = None,
                     devices: int = 1, gang: int = 1, requeue: bool = True,
                     preemptible: bool = False, wait_for_capacity: bool = False,
                     workdir: str | os.PathLike[str] | None = None, image: str | None = None,
                     image_network: str | None = None) -> AsyncJob:
        """As ``Client.submit``."""
        body = submit_body(list(command), gpu=gpu, compute_milli=compute_milli,
                           memory=memory, kind=kind, priority=priority, env=env,
                           devices=devices, gang=gang, requeue=requeue,
                           preemptible=preemptible, wait_for_capacity=wait_for_capacity,
                           workdir=workdir, image=image,
                           image_network=image_network)
        info = await self.request("POST", "/v1/jobs", body)
        return AsyncJob(self, info["id"], info)

    async def job(self, job_id: str) -> AsyncJob:
        info = await self.request("GET", f"/v1/jobs/{job_id}")
        return AsyncJob(self, info["id"], info)

    async def jobs(self, here: bool = False) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request(
            "GET", "/v1/jobs?here=1" if here else "/v1/jobs")
        return result

    async def nodes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request("GET", "/v1/nodes")
        return result

    async def devices(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request("GET", "/v1/devices")
        return result

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/status")
        return result

    async def keys(self, op: str = "list", key: str = "") -> dict[str, Any]:
        if op == "list":
            view: dict[str, Any] = await self.request("GET", "/v1/keys")
        else:
            view = await self.request("POST", "/v1/keys", {"op": op, "key": key})
        return view

    # --- HTTP ---------------------------------------------------------------------------

    async def request(self, method: str, path: str, body: Any = None,
                      timeout: float | EllipsisType | None = ...) -> Any:
        """As ``Client.request``."""
        limit = self.timeout if isinstance(timeout, EllipsisType) else timeout
        try:
            async with asyncio.timeout(limit):
                resp = await self.open(method, path, body)
                async with resp:
                    data = await resp.read()
        except TimeoutError:
            raise unavailable(self.socket, TimeoutError("timed out")) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._unavailable(exc) from None
        return decode(f"{method} {path}", resp.status, data)

    async def open(self, method: str, path: str, body: Any = None) -> aiohttp.ClientResponse:
        """``method path``, its answer not yet read (the caller releases it)."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            return await self._http().request(method, f"http://localhost{path}",
                                              data=payload, headers=headers)
        except (aiohttp.ClientError, OSError) as exc:
            raise self._unavailable(exc) from None

    async def stream(self, path: str) -> aiohttp.ClientResponse:
        """``GET path`` as a stream: a 200 answer to read from, else its error raised."""
        resp = await self.open("GET", path)
        if resp.status == 200:
            return resp
        async with resp:
            data = await resp.read()
        raise not_streamed(f"GET {path}", resp.status, data)

    def _unavailable(self, exc: BaseException) -> ClientError:
        if isinstance(exc, aiohttp.ClientConnectorError):
            exc = exc.os_error
        return unavailable(self.socket, exc)


class AsyncJob:
    """As ``Job``, awaited."""

    def __init__(self, client: AsyncClient, job_id: str,
                 info: dict[str, Any] | None = None) -> None:
        self.client = client
        self.id = job_id
        self.info: dict[str, Any] = dict(info or {})

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r}, state={self.state!r})"

    @property
    def state(self) -> str | None:
        state = self.info.get("state")
        return state if isinstance(state, str) else None

    async def refresh(self) -> dict[str, Any]:
        self.info = await self.client.request("GET", f"/v1/jobs/{self.id}")
        return self.info

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.state not in ENDED:
            wait = LONG_POLL
            if deadline is not None:
                wait = min(max(deadline - loop.time(), 0.0), LONG_POLL)
                if wait <= 0:
                    raise timed_out(self.id, self.state)
            self.info = await self.client.request(
                "GET", f"/v1/jobs/{self.id}?wait={wait:.3f}", timeout=wait + 10)
        return self.info

    async def cancel(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self.client.request("DELETE", f"/v1/jobs/{self.id}")
        if isinstance(answer.get("job"), dict):
            self.info = answer["job"]
        return answer

    async def logs(self, follow: bool = False,
                   timeout: float | None = None) -> AsyncIterator[LogChunk]:
        async for rec in self.log_records(follow, timeout):
            if rec.get("end"):
                ended(rec, self.id)
                return
            yield chunk(rec)

    async def log_records(self, follow: bool = False, timeout: float | None = None
                          ) -> AsyncGenerator[dict[str, Any], None]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        path = f"/v1/jobs/{self.id}/logs?format=ndjson" + ("&follow=1" if follow else "")
        async with asyncio.timeout(None if follow else LOG_READ_TIMEOUT):
            resp = await self.client.stream(path)
        buf = bytearray()
        try:
            while True:
                rec = json.loads(await self._readline(resp, buf, follow, deadline))
                if rec.get("end"):
                    self.info.update({k: rec.get(k) for k in ("state", "reason", "exit_code")})
                    yield rec
                    return
                yield rec
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise StreamError(f"reading the output of {self.id} failed: {exc}", self.id,
                              exc) from None
        finally:
            resp.close()

    async def _readline(self, resp: aiohttp.ClientResponse, buf: bytearray, follow: bool,
                        deadline: float | None) -> bytes:
        while (end := buf.find(b"\n")) < 0:
            if len(buf) > MAX_LINE:
                raise ValueError(f"a log record longer than {MAX_LINE} bytes")
            limit, by_deadline = read_limit(follow, deadline, asyncio.get_running_loop().time())
            if by_deadline and not limit:
                raise timed_out(self.id, self.state)
            try:
                async with asyncio.timeout(limit):
                    data = await resp.content.readany()
            except TimeoutError:
                if by_deadline:
                    raise timed_out(self.id, self.state) from None
                raise
            if not data:
                raise ended_early(self.id)
            buf += data
        line = bytes(buf[:end + 1])
        del buf[:end + 1]
        return line

    async def results(self, dest: str | os.PathLike[str], *,
                      max_bytes: int = MAX_RESULT_BYTES,
                      max_files: int = MAX_RESULT_FILES,
                      attempt: int | None = None) -> list[Path]:
        """As ``Job.results``."""
        what = f"GET /v1/jobs/{self.id}/results"
        resp = await self.client.open("GET", results_path(self.id, attempt))
        async with resp:
            if resp.status != 200:
                raise results_missing(self.id, resp.status, await resp.read())
            if not resp.content_type.startswith(("application/x-tar",
                                                 "application/octet-stream")):
                raise ProtocolError(f"the agent answered {what} with "
                                    f"{resp.content_type!r}, not a tar archive", resp.status)
            Path(dest).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=dest) as spool:
                try:
                    async for block in resp.content.iter_chunked(1 << 20):
                        spool.write(block)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise unavailable(self.client.socket, exc) from None
                spool.seek(0)
                return await asyncio.to_thread(unpack_results, spool, dest, max_bytes,
                                               max_files)


__all__ = ["AsyncClient", "AsyncJob"]
