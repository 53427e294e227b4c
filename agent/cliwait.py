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
import contextlib
import json
import sys
from typing import Any

from flexmesh.agent.cliclient import CliError
from flexmesh.client import ENDED, ClientError, Job, StreamEnded, StreamError, WaitTimeout
from flexmesh.client.common import chunk

TIMED_OUT = 124  # as timeout(1): the job is still queued or running

__all__ = ["ENDED", "TIMED_OUT", "wait_for_job"]


def wait_for_job(args: argparse.Namespace, handle: Job) -> int:
    """Wait for a submitted job (or gang) to end, printing as the module says; the exit
    code."""
    timeout = args.timeout if args.timeout > 0 else None
    job = handle.info
    try:
        if args.output == "json" or job.get("members"):
            job = handle.wait(timeout)
            print(json.dumps(job) if args.output == "json" else _ended_text(job))
        else:
            job = {**job, **_follow(handle, timeout)}
            if job["state"] != "succeeded":
                with contextlib.suppress(ClientError):  # where it ran, for the line below
                    job = handle.client.request("GET", f"/v1/jobs/{job['id']}", timeout=5)
                print(f"flexmesh: {_ended_text(job)}", file=sys.stderr)
    except WaitTimeout:
        return _timed_out(args, handle)
    if job["state"] == "succeeded":
        return 0
    code = job.get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else 1


def _follow(handle: Job, timeout: float | None) -> dict[str, Any]:
    """Copy the job's output as it comes until it has ended; its end record."""
    records = handle.log_records(follow=True, timeout=timeout)
    try:
        for rec in records:
            if rec.get("end"):
                if rec.get("forgotten"):
                    raise CliError(rec["reason"], 1)
                return {k: rec[k] for k in ("state", "reason", "exit_code")}
            piece = chunk(rec)
            out = sys.stdout if piece.stream == "stdout" else sys.stderr
            out.buffer.write(piece.data)
            out.flush()
    except StreamEnded:
        pass
    except StreamError as exc:
        raise CliError(f"following job {handle.id} failed: {exc.cause}", 3) from None
    except (OSError, ValueError) as exc:  # (writing the output)
        raise CliError(f"following job {handle.id} failed: {exc}", 3) from None
    finally:
        records.close()
    raise CliError(f"the output of {handle.id} ended early: the agent closed the stream "
                   f"(stopped or restarted?); `flexmesh show {handle.id}` tells how it is", 3)


def _timed_out(args: argparse.Namespace, handle: Job) -> int:
    job = handle.info
    with contextlib.suppress(ClientError):  # (else: what was last known)
        job = handle.client.request("GET", f"/v1/jobs/{job['id']}", timeout=5)
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
