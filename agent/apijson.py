"""The JSON the local API reads and writes: a submission checked into a job's fields, and
the views of a job and of a gang.

The types are checked here; what a request may ask for (sizes, counts, gangs) is
``models.request_problem``'s to say, so the coordinator checks the same rules.
"""

from __future__ import annotations

from typing import Any

from flexmesh.agent.containers import DEFAULT_NETWORK, image_problem, network_problem
from flexmesh.agent.jobenv import reserved_problem
from flexmesh.agent.models import (
    MAX_DEVICES,
    MAX_GANG,
    PLACED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    RunRecord,
    request_problem,
)

_SUBMIT_KEYS = {"command", "compute_milli", "gpu", "memory_mib", "kind", "priority", "env",
                "requeue", "devices", "preemptible", "gang", "workdir", "wait_for_capacity",
                "image", "image_network"}


class BadRequest(Exception):
    """The request is refused with 400; the message says why, for a person."""


def parse_submit(body: Any) -> dict[str, Any]:
    """Validate a submission; return normalised fields or raise BadRequest.

    The types are checked here; what a request may ask for is ``request_problem``'s to say.
    The checks run in a fixed order: the first problem found is the one reported.
    """
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - _SUBMIT_KEYS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    command = _command(body)
    memory = _integer(body, "memory_mib", 0, "memory_mib must be an integer")
    count = _integer(body, "devices", 1, f"devices must be an integer from 1 to {MAX_DEVICES}")
    # Unnamed compute: in proportion to the memory named for one device; else whole ones.
    compute = _compute(body, 0 if memory > 0 and count == 1 else 1000)
    kind = body.get("kind", "any")
    if kind not in ("gpu", "npu", "any"):
        raise BadRequest(f"kind {kind!r} must be gpu, npu or any")
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > 1000:
        raise BadRequest("priority must be an integer between -1000 and 1000")
    env = _env(body)
    requeue = _boolean(body, "requeue", True, "requeue must be true or false")
    preemptible = _boolean(body, "preemptible", False, "preemptible must be true or false")
    wait = _boolean(body, "wait_for_capacity", False, "wait_for_capacity must be true or false")
    gang = _integer(body, "gang", 1, f"gang must be an integer from 1 to {MAX_GANG} (nodes, "
                    "one member each)")
    problem = (request_problem(compute, memory, count, gang, preemptible)
               or exec_problem(command, env))
    if problem is not None:
        raise BadRequest(problem)
    workdir = body.get("workdir", "")
    if not isinstance(workdir, str) or (workdir and not workdir.startswith("/")):
        raise BadRequest("workdir must be an absolute path on this node")
    return {"command": command, "compute_milli": compute, "memory_mib": memory, "kind": kind,
            "priority": priority, "env": env, "requeue": requeue, "count": count,
            "preemptible": preemptible, "gang_size": gang if gang > 1 else 0,
            "workdir": workdir, "wait_for_capacity": wait, **_image(body)}


def _image(body: dict[str, Any]) -> dict[str, str]:
    """``image`` and its ``image_network`` (only with an image; "none" unless asked)."""
    image = body.get("image", "")
    network = body.get("image_network")
    if not isinstance(image, str) or (image and image_problem(image)):
        raise BadRequest(image_problem(image if isinstance(image, str) else "") or "")
    if network is not None and not image:
        raise BadRequest("image_network applies only to a job with an image")
    network = DEFAULT_NETWORK if network is None else network
    if not isinstance(network, str) or network_problem(network):
        raise BadRequest(network_problem(str(network)) or "")
    return {"image": image, "image_network": network if image else ""}


# What exec takes: one argument or variable at most 128 KiB (Linux's MAX_ARG_STRLEN), and
# all of them together well under the usual 2 MiB ARG_MAX.
MAX_ARG_BYTES = 128 * 1024 - 1
MAX_EXEC_BYTES = 1024 * 1024


def _command(body: dict[str, Any]) -> list[str]:
    command = body.get("command")
    if (not isinstance(command, list) or not command
            or not all(isinstance(a, str) for a in command) or not command[0]):
        raise BadRequest("command must be a non-empty list of strings")
    return command


def exec_problem(command: list[str], env: dict[str, str]) -> str | None:
    """Why exec could never take this command and environment, or None: text that is
    not UTF-8 (a lone surrogate), a NUL byte, or more than the kernel takes."""
    total = 0
    for what, text in [*(("command", a) for a in command),
                       *(("env", f"{k}={v}") for k, v in env.items())]:
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            return f"{what} is not valid UTF-8 text: {text[:40]!r}"
        if "\0" in text:
            return f"{what} holds a NUL byte: {text[:40]!r}"
        if size > MAX_ARG_BYTES:
            return f"{what} has a string of {size} bytes; exec takes at most {MAX_ARG_BYTES}"
        total += size + 1
    if total > MAX_EXEC_BYTES:
        return (f"command and env are {total} bytes together; at most {MAX_EXEC_BYTES} "
                "are accepted")
    return None


def _compute(body: dict[str, Any], default: int) -> int:
    """Milli-devices from ``gpu`` (a fraction) or ``compute_milli``; ``default`` if neither
    (0, in proportion to memory, when memory is named; else a whole device)."""
    if "gpu" in body and "compute_milli" in body:
        raise BadRequest("give either gpu (a fraction) or compute_milli, not both")
    if "gpu" not in body:
        return _integer(body, "compute_milli", default, "compute_milli must be an integer")
    frac = body["gpu"]
    if isinstance(frac, bool) or not isinstance(frac, (int, float)):
        raise BadRequest("gpu must be a number between 0 and 1")
    if not 0 < frac <= 1:
        raise BadRequest(f"gpu fraction {frac} must be above 0 and at most 1 "
                         "(one whole device)")
    return max(1, round(frac * 1000))


def _env(body: dict[str, Any]) -> dict[str, str]:
    env = body.get("env", {})
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k
            and k.isprintable() and not any(c.isspace() for c in k)
            for k, v in env.items()):
        raise BadRequest("env must be an object of string names (no '=', spaces or control "
                         "characters) to string values")
    problem = reserved_problem(env)
    if problem:
        raise BadRequest(problem)
    return env


def _boolean(body: dict[str, Any], key: str, default: bool, message: str) -> bool:
    """``body[key]`` (or ``default``) if it is true or false; else BadRequest."""
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(message)
    return value


def _integer(body: dict[str, Any], key: str, default: int, message: str) -> int:
    """``body[key]`` (or ``default``) if it is an integer (not a bool); else BadRequest."""
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(message)
    return value


def job_view(job: JobRecord) -> dict[str, Any]:
    return {
        "id": job.id, "state": job.state, "reason": job.reason, "node": job.node,
        "device": job.devices[0] if job.devices else "", "devices": list(job.devices),
        "count": job.count,
        "compute_milli": job.compute_milli, "memory_mib": job.memory_mib,
        "exit_code": job.exit_code, "origin": job.origin, "kind": job.kind,
        "priority": job.priority, "preemptible": job.preemptible, "command": job.command,
        "created_at": job.created_at, "updated_at": job.updated_at, "attempts": job.attempts,
        "gang": job.gang, "rank": job.rank, "gang_size": job.gang_size,
        "workdir": job.workdir, "bundle": job.bundle, "bundle_size": job.bundle_size,
        "wait_for_capacity": job.wait_for_capacity, "image": job.image,
        "image_network": job.image_network,
    }


def run_view(run: RunRecord, node: str) -> dict[str, Any]:
    """A run on ``node``'s devices (of a job submitted there or elsewhere)."""
    return {
        "id": run.id, "state": run.state, "reason": run.reason, "node": node,
        "device": run.devices[0] if run.devices else "", "devices": list(run.devices),
        "count": len(run.devices), "compute_milli": run.compute_milli,
        "memory_mib": run.memory_mib, "exit_code": run.exit_code, "origin": run.origin,
        "command": run.command, "created_at": run.created_at, "updated_at": run.updated_at,
        "attempts": run.attempts, "lease_id": run.lease_id, "bundle": run.bundle,
    }


def gang_view(gang: str, members: list[JobRecord]) -> dict[str, Any]:
    """A gang as one job: its members, and a state that is the least advanced member's
    while any runs on, then ``succeeded`` if all did, else the first member's that did
    not (with its reason)."""
    live = [m for m in members if not m.terminal]
    if live:
        order = (QUEUED, PLACED, RUNNING)
        state = min((m.state for m in live), key=order.index)
        reason = next((m.reason for m in live if m.state == state and m.reason), "")
        exit_code = None
    else:
        bad = [m for m in members if m.state != SUCCEEDED]
        state = bad[0].state if bad else SUCCEEDED
        reason = bad[0].reason if bad else ""
        exit_code = bad[0].exit_code if bad else 0
    first = members[0]
    return {
        "id": gang, "gang": gang, "state": state, "reason": reason, "exit_code": exit_code,
        "node": ",".join(m.node for m in members if m.node), "device": "", "devices": [],
        "count": first.count, "compute_milli": first.compute_milli,
        "memory_mib": first.memory_mib, "origin": first.origin, "kind": first.kind,
        "priority": first.priority, "preemptible": False, "command": first.command,
        "created_at": first.created_at, "updated_at": max(m.updated_at for m in members),
        "attempts": max(m.attempts for m in members), "gang_size": len(members),
        "wait_for_capacity": first.wait_for_capacity,
        "members": [job_view(m) for m in members],
    }
