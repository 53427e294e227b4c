"""A job that ends before its start was told to the node: the node hears the start first,
then the end (no "stale_start", and its pid is known)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flexmesh.agent.config import Settings
from flexmesh.agent.models import RunRecord
from flexmesh.agent.node import RunJob
from flexmesh.agent.runtime.processes import Processes


class _Node:
    def __init__(self) -> None:
        self.told: list[tuple[str, Any]] = []
        self.name = "n"
        self.origin = SimpleNamespace(jobs={})
        self.owner = SimpleNamespace(runs={})  # (no run record: its end is told at once)

    def job_started(self, job_id: str, pid: int, *args: Any, **kw: Any) -> None:
        self.told.append(("started", pid))

    def job_exited(self, job_id: str, code: int | None, reason: str, *args: Any,
                   **kw: Any) -> None:
        self.told.append(("exited", code))


def test_the_start_is_told_before_an_exit_that_came_first(tmp_path: Path) -> None:
    async def scenario() -> list[tuple[str, Any]]:
        node = _Node()

        async def flush() -> None:
            return None

        agent = SimpleNamespace(state_dir=tmp_path, node=node, loop=asyncio.get_running_loop(),
                                settings=Settings(state_dir=str(tmp_path)), flush=flush,
                                sampler=SimpleNamespace(enforcement="none"), kick=lambda: None,
                                results=SimpleNamespace(make=lambda job, user: tmp_path / "out"))
        procs = Processes(agent)  # type: ignore[arg-type]

        async def start(job_id: str, *args: Any, **kw: Any) -> tuple[int, int]:
            procs._on_exit(job_id, 0, "exited with code 0")  # the exit watcher was quicker
            return 4242, 1

        procs.runner.start = start  # type: ignore[method-assign]
        job = RunRecord(id="j1", origin="o", command=["true"], compute_milli=1000,
                        memory_mib=0, lease_id="L1")
        job.uid = None
        await procs.run(RunJob(job, ()))
        return node.told

    assert asyncio.run(scenario()) == [("started", 4242), ("exited", 0)]


def test_an_image_job_before_the_runtime_is_found_is_handed_back(tmp_path: Path) -> None:
    """Right after a restart the node has not found its container runtime yet, but a
    coordinator acting on its earlier facts may give it an image job: that run ends
    ``preempted`` (its origin places it again), not ``failed``."""
    async def scenario() -> list[tuple[str, Any]]:
        node = _Node()
        ends: list[tuple[str, Any]] = []
        node.job_exited = lambda job_id, code, reason, *a, **kw: ends.append(  # type: ignore
            (kw.get("state"), reason))

        async def flush() -> None:
            return None

        agent = SimpleNamespace(state_dir=tmp_path, node=node, loop=asyncio.get_running_loop(),
                                settings=Settings(state_dir=str(tmp_path)), flush=flush,
                                sampler=SimpleNamespace(enforcement="none"), kick=lambda: None,
                                results=SimpleNamespace(make=lambda job, user: tmp_path / "out",
                                                        discard=_nothing))
        procs = Processes(agent)  # type: ignore[arg-type]
        assert procs.containers.runtime == ""  # (not found yet)
        job = RunRecord(id="j2", origin="o", command=["true"], compute_milli=1000,
                        memory_mib=0, lease_id="L2", image="busybox")
        await procs.run(RunJob(job, ()))
        return ends

    (state, reason), = asyncio.run(scenario())
    assert state == "preempted" and reason.startswith("container: this node has no "), reason


async def _nothing(*args: Any) -> None:
    return None
