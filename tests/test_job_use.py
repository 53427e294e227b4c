"""What a job really uses of its devices: its whole process tree, measured per job."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

from flexmesh.agent.config import Settings
from flexmesh.agent.devices.base import Device, DeviceSample
from flexmesh.agent.runtime import proctree
from flexmesh.agent.runtime.sampling import JobUse, Sampler, measured_use


def test_a_jobs_tree_holds_its_children_and_grandchildren() -> None:
    proc = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & (sleep 30 & wait) & wait"])
    try:
        deadline = time.monotonic() + 10
        found: set[int] = set()
        while len(found) < 4 and time.monotonic() < deadline:
            found = proctree.tree(proc.pid)  # sh, sleep, subshell, sleep (a few ms to fork)
        assert proc.pid in found and len(found) >= 4
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], check=False)
        proc.kill()
        proc.wait()
    assert proctree.tree(proc.pid) == {proc.pid}  # gone: only what we asked about


def test_measured_use_sums_memory_and_takes_the_busiest_process() -> None:
    samples = [DeviceSample("gpu0", True, job_memory_mib={10: 1000, 11: 500, 99: 7},
                            job_util_pct={11: 40, 99: 90}),
               DeviceSample("gpu1", True, job_memory_mib={12: 2000})]
    assert measured_use(samples, {10, 11, 12}) == JobUse(3500, 40)
    assert measured_use(samples, {50}) is None


class _Backend:
    """The job's child (pid 2 of the tree) holds 3 GiB; a foreign process 1 GiB."""

    name = "fake"

    def __init__(self, child: int) -> None:
        self.child = child
        self.seen: frozenset[int] = frozenset()

    def discover(self) -> list[Device]:
        return [Device("gpu0", "gpu", "T4", 16384, "sim")]

    def sample(self, pids: frozenset[int]) -> list[DeviceSample]:
        self.seen = pids
        held = {self.child: 3072} if self.child in pids else {}
        foreign = 1024 + (0 if held else 3072)
        return [DeviceSample("gpu0", True, foreign_memory_mib=foreign, job_memory_mib=held)]


def test_a_childs_device_memory_is_the_jobs_not_foreign(tmp_path: Path) -> None:
    parent = subprocess.Popen(["/bin/sh", "-c", "sleep 30; true"])
    try:
        child, deadline = 0, time.monotonic() + 10
        while not child and time.monotonic() < deadline:
            child = next(iter(proctree.tree(parent.pid) - {parent.pid}), 0)
        assert child, "sh did not start its child"

        async def scenario() -> tuple[dict[str, JobUse], frozenset[int]]:
            runner = SimpleNamespace(running=lambda: {"j1": parent.pid})
            agent = SimpleNamespace(settings=Settings(state_dir=str(tmp_path)),
                                    loop=asyncio.get_running_loop(),
                                    processes=SimpleNamespace(runner=runner))
            sampler = Sampler(agent)  # type: ignore[arg-type]
            backend = _Backend(child)
            sampler.backends = [backend]  # type: ignore[list-item]
            samples = await sampler.sample()
            assert samples["gpu0"].foreign_memory_mib == 1024
            return sampler.job_use, backend.seen

        use, seen = asyncio.run(scenario())
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(parent.pid)], check=False)
        parent.kill()
        parent.wait()
    assert {parent.pid, child} <= seen
    assert use == {"j1": JobUse(3072, None)}
