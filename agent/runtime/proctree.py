"""A job's processes: the one the agent started and everything it started in turn.

A job that runs ``sh -c "python train.py"`` or a launcher that forks workers holds the
device from a child, not from the pid the agent knows. Device memory and utilization are
counted for the whole tree (so the child's use is the job's, not foreign load, and the
watchdog sees it), read from ``/proc/PID/task/TID/children``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

MAX_TREE = 4096  # processes followed per job at most (a fork bomb is not walked forever)


def tree(pid: int, proc: str = "/proc") -> set[int]:
    """``pid`` and its descendants now alive (just ``pid`` where /proc cannot tell)."""
    seen = {pid}
    todo = [pid]
    while todo and len(seen) < MAX_TREE:
        for child in _children(todo.pop(), proc):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def _children(pid: int, proc: str) -> Iterable[int]:
    try:
        tasks = os.listdir(f"{proc}/{pid}/task")
    except OSError:
        return ()
    out: list[int] = []
    for tid in tasks:
        try:
            with open(f"{proc}/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return out
