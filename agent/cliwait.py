"""``flexmesh submit --wait``: follow a job to its end and exit as it did.

A job's output is copied as it comes, as ``docker run`` does: its stdout to stdout, its
stderr to stderr (the logs API with ``follow``), and nothing else on stdout; a job that did
not succeed is then named on stderr with its state and reason. With ``-o json`` (and for a
gang, whose members' output ``logs ID.RANK`` gives) only the job's JSON is printed once it
has ended. ``--timeout S`` gives up after S seconds, every wait on the agent bounded by the
time left, and says the job is still queued or running and how to cancel it.

Exit codes: 0 the job succeeded; its own exit code when it failed with one (1-255); 1 when
it ended otherwise (failed without a code, cancelled, preempted, lost); ``TIMED_OUT`` when
``--timeout`` passed first (the job goes on); 3 when the agent stopped answering.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import sys
import time
from typing import Any

from flexmesh.agent.cliclient import CliError, open_stream, request

TIMED_OUT = 124  # as timeout(1): the job is still queued or running
ENDED = ("succeeded", "failed", "cancelled", "preempted", "lost")
LONG_POLL = 30.0  # seconds one wait for a job's end may be held by the agent


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds if seconds > 0 else None

    def left(self, most: float | None = None) -> float | None:
        """Seconds left (at most ``most``); None without a deadline."""
        if self.at is None:
            return most
        left = max(self.at - time.monotonic(), 0.0)
        return left if most is None else min(left, most)


class _TimedOut(Exception):
    pass


def wait_for_job(args: argparse.Namespace, job: dict[str, Any]) -> int:
    """Wait for a submitted job (or gang) to end, printing as the module says; the exit
    code."""
    deadline = _Deadline(args.timeout)
    try:
        if args.output == "json" or job.get("members"):
            job = _poll(args, job, deadline)
            print(json.dumps(job) if args.output == "json" else _ended_text(job))
        else:
            job = {**job, **_follow(args, job["id"], deadline)}
            if job["state"] != "succeeded":
                with contextlib.suppress(CliError):  # where it ran, for the line below
                    job = request(args, "GET", f"/v1/jobs/{job['id']}", timeout=5)
                print(f"flexmesh: {_ended_text(job)}", file=sys.stderr)
    except _TimedOut:
        return _timed_out(args, job)
    if job["state"] == "succeeded":
        return 0
    code = job.get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else 1


def _poll(args: argparse.Namespace, job: dict[str, Any], deadline: _Deadline) -> dict[str, Any]:
    """The job once it has ended, asked with long polls that end by the deadline."""
    while job["state"] not in ENDED:
        wait = deadline.left(LONG_POLL)
        assert wait is not None
        if wait <= 0:
            raise _TimedOut
        job = request(args, "GET", f"/v1/jobs/{job['id']}?wait={wait:.3f}", timeout=wait + 10)
    return job


def _follow(args: argparse.Namespace, job_id: str, deadline: _Deadline) -> dict[str, Any]:
    """Copy the job's output as it comes until it has ended; its end record."""
    resp, sock = open_stream(args, f"/v1/jobs/{job_id}/logs?format=ndjson&follow=1")
    try:
        while True:
            left = deadline.left()
            if left is not None and left <= 0:
                raise _TimedOut
            sock.settimeout(left)
            line = resp.readline()
            if not line:
                break
            rec = json.loads(line)
            if rec.get("end"):
                if rec.get("forgotten"):
                    raise CliError(rec["reason"], 1)
                return {k: rec[k] for k in ("state", "reason", "exit_code")}
            out = sys.stdout if rec["stream"] == "stdout" else sys.stderr
            out.buffer.write(base64.b64decode(rec["b64"]))
            out.flush()
    except TimeoutError:
        raise _TimedOut from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise CliError(f"following job {job_id} failed: {exc}", 3) from None
    finally:
        resp.close()
        sock.close()
    raise CliError(f"the output of {job_id} ended early: the agent closed the stream "
                   f"(stopped or restarted?); `flexmesh show {job_id}` tells how it is", 3)


def _timed_out(args: argparse.Namespace, job: dict[str, Any]) -> int:
    with contextlib.suppress(CliError):  # (else: what was last known)
        job = request(args, "GET", f"/v1/jobs/{job['id']}", timeout=5)
    why = f" ({job['reason']})" if job.get("reason") else ""
    if job["state"] in ENDED:  # it ended just as the time ran out
        what = f"job {job['id']} {job['state']}{why} as the time ran out"
    else:
        what = (f"job {job['id']} is still {job['state']}{why} and goes on: "
                f"`flexmesh cancel {job['id']}` cancels it")
    print(f"flexmesh: gave up waiting after {args.timeout:g}s: {what}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps({**job, "timed_out": True}))
    return TIMED_OUT


def _ended_text(job: dict[str, Any]) -> str:
    if job.get("members"):  # a gang: a line for each member
        lines = [f"{job['id']} {job['state']}" + (f": {job['reason']}" if job["reason"] else "")]
        for m in job["members"]:
            where = ",".join(m.get("devices") or [m["device"] or "-"])
            lines.append(f"  {m['id']} {m['state']} on {m['node'] or '-'}/{where}: "
                         f"{m['reason']}")
        return "\n".join(lines)
    where = ",".join(job.get("devices") or [job.get("device") or "-"])
    return f"{job['id']} {job['state']} on {job.get('node') or '-'}/{where}: {job['reason']}"
