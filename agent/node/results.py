"""Results: what a run left under ``$FLEXMESH_OUTPUT``, brought back to its origin; sans-IO.

Theory of operation. The owner's runtime packs the output directory when the process has
exited, before the node hears of the end (``packed``), so the run's record carries the
archive's SHA-256, size and note from its first terminal journal write on. The origin
learns them with the run's end: from the ``JobSync`` answer that ends the job (a job run
on another node, ``learned``) or at once (a job run here). It records them on the job,
for the attempt the run was (a requeued job's earlier results stay apart), and emits
``CollectResults``; the runtime fetches the archive chunk by chunk (``FetchResults``) or,
from this node's own store, moves it, and tells ``collected``. The origin then tells the
owner (``ResultsTaken``), which deletes its copy; until then the owner keeps the run (and
its archive) up to its retention's age, however many runs end meanwhile.

A run that ended with no results record (its owner died, its process vanished while its
agent was down) has none, and ``results_note`` says why.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

from flexmesh.agent.models import (
    RESULTS_FAILED,
    RESULTS_FETCHING,
    RESULTS_HERE,
    TERMINAL,
    JobRecord,
    RunRecord,
)
from flexmesh.agent.node.effects import CollectResults
from flexmesh.protocol import wire

if TYPE_CHECKING:
    from flexmesh.agent.node.core import Node
    from flexmesh.agent.node.origin import Origin

MAX_NOTE = 1024  # characters of an owner's note on results taken at most
MAX_CARRIED = 8  # earlier runs' archives a run keeps for its origin, at most
_SHA256 = re.compile(r"[0-9a-f]{64}")


def with_results(node: Node, msg: wire.JobSync, reply: wire.Message) -> wire.Message:
    """Owner: the answer to a ``JobSync``; one that says a run here ended carries its
    results."""
    run = node.owner.runs.get(msg.job_id)
    if not isinstance(reply, wire.JobSyncReply) or run is None or reply.state not in TERMINAL:
        return reply
    return replace(reply, results=run.results, results_size=run.results_size,
                   results_note=run.results_note)


def packed(node: Node, job_id: str, lease_id: str, sha: str, size: int, note: str) -> bool:
    """Owner: the results of run ``lease_id`` of ``job_id`` are packed (its end is told
    next). A job submitted here learns of them at once. False: not that run any more."""
    run = node.owner.runs.get(job_id)
    if run is None or run.lease_id != lease_id or run.terminal:
        return False
    run.results, run.results_size, run.results_note = sha, size, note
    node.persist_run(run)
    if run.origin == node.name:
        job = node.origin.jobs.get(job_id)
        if job is not None and job.lease_id == lease_id and not job.terminal:
            learn(node.origin, job, node.name, sha, size, note)
    return True


def learned(origin: Origin, job: JobRecord, owner: str, reply: wire.JobSyncReply) -> None:
    """Origin: the answer that ends a job followed on ``owner`` names its results."""
    if reply.state in TERMINAL and not job.terminal:
        learn(origin, job, owner, reply.results, reply.results_size, reply.results_note)


def learn(origin: Origin, job: JobRecord, owner: str, sha: str, size: int,
          note: str) -> None:
    """Record a run's results on its job, for the attempt it was, and fetch them."""
    job.results_attempt = job.attempts
    job.results_note = note[:MAX_NOTE]
    job.results, job.results_size, job.results_state = "", 0, ""
    job.results_node = owner  # (``node`` moves on with a requeue; a restart asks here)
    if sha and (not _SHA256.fullmatch(sha) or size < 0):
        origin.out.count("results_invalid")
        job.results_state = RESULTS_FAILED
        job.results_note = f"{owner} named results that are not an archive's SHA-256"
    elif sha:
        job.results, job.results_size, job.results_state = sha, size, RESULTS_FETCHING
        origin.out.emit(CollectResults(job.id, job.attempts, owner, sha, size))
    origin.node.persist(job)


def collected(node: Node, job_id: str, attempt: int, sha: str, error: str) -> None:
    """Origin: the results of ``attempt`` are here ("" ``error``) or cannot be had."""
    job = node.origin.jobs.get(job_id)
    if job is None or job.results_attempt != attempt or job.results != sha:
        return  # forgotten, or a later attempt's results are what it names now
    job.results_state = RESULTS_FAILED if error else RESULTS_HERE
    if error:
        job.results_note = error[:MAX_NOTE]
    node.persist(job)
    node.out.count("results_collected" if not error else "results_failed")


def pending(origin: Origin) -> list[CollectResults]:
    """Origin, after a restart: the results still to be fetched, as when first learned."""
    return [CollectResults(j.id, j.results_attempt, j.results_node or j.node, j.results,
                           j.results_size)
            for j in origin.jobs.values() if j.results_state == RESULTS_FETCHING]


def carried(earlier: RunRecord | None) -> list[str]:
    """Owner, starting a new run of a job that ran here before: the earlier runs' archives
    its origin has not taken yet (the new run's record replaces the earlier one's)."""
    if earlier is None:
        return []
    shas = list(earlier.earlier_results)
    if earlier.results and not earlier.results_taken and earlier.results not in shas:
        shas.append(earlier.results)
    return shas[-MAX_CARRIED:]


def taken(node: Node, msg: wire.ResultsTaken) -> wire.Message:
    """Owner: the origin has the results of a run here; its copy may go."""
    run = node.owner.runs.get(msg.job_id)
    if run is not None and msg.results in run.earlier_results:
        run.earlier_results = [s for s in run.earlier_results if s != msg.results]
        node.persist_run(run)
        return wire.Ok("taken")
    if run is None or run.results != msg.results:
        return wire.Error(f"no run of {msg.job_id[:80]} here has results {msg.results[:80]}")
    if not run.results_taken:
        run.results_taken = True
        node.persist_run(run)
    return wire.Ok("taken")


def held(node: Node, job_id: str) -> bool:
    """Owner: a run kept for its results (packed, not yet taken by its origin)."""
    run = node.owner.runs.get(job_id)
    return run is not None and ((bool(run.results) and not run.results_taken)
                                or bool(run.earlier_results))


def wanted(node: Node, sha: str) -> bool:
    """Owner: whether a run here still needs the archive ``sha`` kept."""
    return any((r.results == sha and not r.results_taken) or sha in r.earlier_results
               for r in node.owner.runs.values())


def served(node: Node, msg: wire.FetchResults) -> bool:
    """Owner: whether ``msg`` asks for the results of a run here (not yet taken)."""
    run = node.owner.runs.get(msg.job_id)
    return run is not None and bool(msg.results) and (
        (run.results == msg.results and not run.results_taken)
        or msg.results in run.earlier_results)


def owner_lost(job: JobRecord, why: str) -> None:
    """Origin: the job's owner was given up on; its results with it."""
    if not job.results_state:
        job.results_attempt, job.results_note = job.attempts, why
