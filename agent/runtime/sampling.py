"""Device discovery and sampling: what this node's devices are, what its own workload
uses of them (smoothed, with hysteresis), how it holds jobs to their fractions, the
watchdog that stops a job using more device memory than it leased, and the battery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from flexmesh.agent import power
from flexmesh.agent.devices.base import Backend, Device, DeviceSample
from flexmesh.agent.devices.discovery import JetsonOptions, discover_backends
from flexmesh.agent.devices.enforcement import (
    WATCHDOG,
    detect_enforcement,
    effective_mode,
    job_memory_used,
    watchdog_verdict,
)
from flexmesh.agent.devices.idle import IdleEstimator, lendable
from flexmesh.agent.models import FAILED
from flexmesh.agent.node.power import PowerPolicy, PowerReading
from flexmesh.agent.runtime import proctree

if TYPE_CHECKING:
    from flexmesh.agent.runtime.agent import Agent

log = logging.getLogger("flexmesh.agent")

SAMPLE_INTERVAL = 1.0  # seconds between device readings (the watchdog checks this often)


@dataclass(frozen=True, slots=True)
class JobUse:
    """What a running job's processes were measured holding, over all its devices; None
    where the backend cannot see processes (or, for utilization, per-process load)."""

    memory_mib: int | None
    utilization_pct: int | None


def measured_use(samples: Iterable[DeviceSample], pids: set[int]) -> JobUse | None:
    """What ``pids`` hold of the sampled devices; None where no backend saw any of them."""
    memory: int | None = None
    util: int | None = None
    for s in samples:
        held = [mib for pid, mib in s.job_memory_mib.items() if pid in pids]
        if held:
            memory = (memory or 0) + sum(held)
        busy = [pct for pid, pct in s.job_util_pct.items() if pid in pids]
        if busy:
            util = max(util or 0, *busy)
    return None if memory is None and util is None else JobUse(memory, util)


class Sampler:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.backends: list[Backend] = []
        self.devices: list[Device] = []
        self.enforcement = "none"
        self.last_samples: dict[str, DeviceSample] = {}
        self._estimators: dict[str, IdleEstimator] = {}
        self._applied: tuple[list[Device], dict[str, tuple[int, int]]] | None = None
        self._measured: set[str] = set()  # devices read at least once (others lend nothing)
        self._trees: dict[str, set[int]] = {}  # job -> its processes, at the last reading
        self.job_use: dict[str, JobUse] = {}  # job -> what it was measured holding
        self._power: tuple[PowerReading, PowerPolicy] | None = None  # as last told the node

    async def discover(self) -> None:
        s = self.agent.settings
        jetson = JetsonOptions(s.jetson, s.jetson_memory_share, Path(
            s.jetson_tegrastats_log) if s.jetson_tegrastats_log else None)
        self.backends = await asyncio.to_thread(
            discover_backends, s.sim_devices or None,
            Path(s.sim_load_file) if s.sim_load_file else None, s.npu_smi or None, s.nvml,
            jetson=jetson)
        for backend in self.backends:
            try:
                self.devices.extend(await asyncio.to_thread(backend.discover))
            except Exception as exc:  # a broken backend must not stop the agent
                log.warning("device backend %s failed: %s", backend.name, exc)
        has_nvml = any(b.name == "nvml" for b in self.backends)
        try:
            self.enforcement = detect_enforcement(
                s.enforcement, s.hami_lib or None, nvml_available=has_nvml)
        except ValueError as exc:
            log.warning("enforcement: %s; falling back to none", exc)
            self.enforcement = "none"
        self.agent.node.enforcement = self.enforcement
        self.last_samples = await self.sample()  # nothing is offered before it is measured
        self.apply(self.last_samples)
        await self.read_power()

    def apply(self, samples: dict[str, DeviceSample]) -> bool:
        """Tell the node its devices and what of each it may lend, from these readings;
        False when that is what it was told last time."""
        s = self.agent.settings
        now = self.agent.loop.time()
        lend: dict[str, tuple[int, int]] = {}
        devices = []
        gone = [d.id for d in self.devices if (sm := samples.get(d.id)) and sm.lost]
        if gone:
            log.warning("devices gone (fell off the bus?): %s; their jobs end", ", ".join(gone))
            self.devices = [d for d in self.devices if d.id not in gone]
        for d in self.devices:
            sample = samples.get(d.id)
            est = self._estimators.setdefault(d.id, IdleEstimator())
            fc, fm = (sample.foreign_compute_milli, sample.foreign_memory_mib) if sample else (0, 0)
            foreign = est.observe(now, fc, fm)
            if sample is not None:
                self._measured.add(d.id)
            lend[d.id] = (
                lendable(d.compute_milli, 0, foreign.compute_milli, s.reserve_compute_milli),
                lendable(d.memory_mib, 0, foreign.memory_mib, s.reserve_memory_mib),
            ) if d.id in self._measured else (0, 0)
            healthy = d.healthy and (sample.healthy if sample else True)
            devices.append(d if healthy == d.healthy else replace(d, healthy=healthy))
        if self._applied == (devices, lend):
            return False  # most readings change nothing
        self._applied = (devices, lend)
        self.agent.node.set_devices(devices, lend, now)
        return True

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self._next_wait())
            samples = self.last_samples = await self.sample()
            changed = self.apply(samples)
            changed = await self.read_power() or changed
            if self.enforcement == "watchdog":
                changed = self.watchdog(list(samples.values())) or changed
            if changed:
                await self.agent.flush()

    def _next_wait(self) -> float:
        """About ``SAMPLE_INTERVAL``, but at the node's next timer when that is near: both
        then run in one turn of the loop, and an idle agent wakes once instead of twice
        (on a VM a wakeup costs more CPU than the reading)."""
        loop = self.agent.loop
        due = self.agent.node.next_deadline() - loop.time()
        while due < 0.75 * SAMPLE_INTERVAL:  # (the node's timers come about once a second)
            due += SAMPLE_INTERVAL
        return due if due <= 1.5 * SAMPLE_INTERVAL else SAMPLE_INTERVAL

    async def read_power(self) -> bool:
        """Read the battery and tell the node when the reading or its floors changed; a
        source that stops reading well is logged and counted once, until it reads again."""
        s = self.agent.settings
        reading = (power.read(s, time.time()) if s.power_source == "none"
                   else await asyncio.to_thread(power.read, s, time.time()))
        was = self._power[0] if self._power is not None else None
        if reading.problem and (was is None or not was.problem):
            log.warning("battery: %s; lending as on mains power until it reads again",
                        reading.problem)
            self.agent.count("battery_unreadable")
        elif was is not None and was.problem and not reading.problem:
            log.info("battery: %s reads again: %s%%", reading.source, reading.level)
        told = (reading, power.policy(s))
        if told == self._power:
            return False
        self._power = told
        self.agent.node.set_power(reading, told[1], self.agent.loop.time())
        return True

    async def sample(self) -> dict[str, DeviceSample]:
        """One reading of every backend (one that fails is logged and left out), and of
        what each job's process tree holds of its devices (``job_use``)."""
        running = self.agent.processes.runner.running()
        # (Each hop to a thread wakes the loop: an idle agent makes none it need not.)
        self._trees = await asyncio.to_thread(
            lambda: {job: proctree.tree(pid) for job, pid in running.items()}) if running else {}
        pids = frozenset(p for tree in self._trees.values() for p in tree)
        samples: dict[str, DeviceSample] = {}
        for backend in self.backends:
            try:
                read = (backend.sample(pids) if getattr(backend, "inline", False)
                        else await asyncio.to_thread(backend.sample, pids))
                for sm in read:
                    samples[sm.id] = sm
            except Exception as exc:
                log.warning("sampling %s failed: %s", backend.name, exc)
        self.job_use = {job: measured_use(samples.values(), tree) or self._simulated(job)
                        for job, tree in self._trees.items()}
        return samples

    def _simulated(self, job_id: str) -> JobUse:
        """A job on simulated devices (which see no processes) uses what it leased: the
        load a simulated device is configured with, for the views and metrics."""
        node = self.agent.node
        run = node.owner.runs.get(job_id)
        lease = node.leases.leases.get(run.lease_id) if run is not None else None
        sim = {d.id for d in self.devices if d.backend == "sim"}
        if lease is None or not sim.issuperset(lease.devices):
            return JobUse(None, None)
        return JobUse(lease.memory_mib * len(lease.devices), lease.compute_milli // 10)

    def watchdog(self, samples: list[DeviceSample]) -> bool:
        """No interception: stop a job whose measured device memory exceeds its lease;
        True if one was stopped."""
        stopped = False
        node = self.agent.node
        # Only where the mode applies: a Jetson's job memory is RSS, not a GPU reading.
        checked = {d.id for d in self.devices if effective_mode(d, WATCHDOG) == WATCHDOG}
        for job in list(node.owner.runs.values()):
            pids = self._trees.get(job.id)
            if pids is None or job.terminal:
                continue
            lease = node.leases.leases.get(job.lease_id)
            if lease is None:
                continue
            for device in job.devices:  # the lease's memory is per device
                if device not in checked:
                    continue
                used = job_memory_used(samples, device, pids)
                verdict = watchdog_verdict(used, lease.memory_mib)
                if verdict:
                    log.info("watchdog job=%s device=%s used_mib=%d lease_mib=%d", job.id,
                             device, used, lease.memory_mib)
                    node.stop_job(job.id, verdict, FAILED, self.agent.loop.time())
                    stopped = True
                    break
        return stopped

    async def close(self) -> None:
        for backend in self.backends:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(backend.close)
