"""How much of a device the owner can lend: smoothed foreign usage and the lendable sum.

Pure code: samples arrive with the time they were taken (``now``); nothing here reads a
clock. The runtime keeps one ``IdleEstimator`` per device and feeds it each
``DeviceSample``; what it publishes goes into ``lendable``.

Why smoothing. A local (non-flexmesh) workload is bursty: a training loop's utilisation
dips between steps, a notebook allocates and frees. Lending whatever is idle *this second*
would make the lendable capacity flap, and every flap is a lease the owner grants and then
has to reclaim. So the estimator publishes:

1. a high percentile of the foreign usage over a sliding window (memory defaults to the
   window's maximum: memory that was held recently is likely to be held again, and running
   out of it kills jobs);
2. with hysteresis on top: the published value *rises at once* when the percentile rises
   (the owner's own work always wins), but *falls only* after the percentile has stayed
   lower by more than ``step`` for ``hold_s`` seconds, and then only to the highest value
   seen during that hold.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from flexmesh.agent.units import MILLI


def lendable(capacity: int, leased: int, foreign: int, reserve: int) -> int:
    """capacity - leased - foreign - reserve, never below zero."""
    return max(0, capacity - leased - foreign - reserve)


def foreign_compute_estimate(
    util_pct: int | None,
    per_process_pct: Mapping[int, int] | None,
    processes: Mapping[int, int | None],
    job_pids: frozenset[int],
) -> int:
    """Foreign compute (milli) of one device from what its backend could measure.

    ``util_pct`` is the device utilisation (None: not reported), ``per_process_pct`` the
    per-process utilisation samples (None: not offered), ``processes`` pid -> MiB held
    (None: unknown) for the processes on the device. Rules, most precise first:

    * per-process samples: the foreign processes' share; with no job on the device all of
      its utilisation is foreign, sampled or not;
    * utilisation unknown: fully busy if any foreign process is there, else idle;
    * no job on the device: all of the utilisation; only jobs: none;
    * jobs and foreign processes together: utilisation split by device memory held.
    """
    foreign_pids = [pid for pid in processes if pid not in job_pids]
    job_present = len(foreign_pids) < len(processes)
    if per_process_pct is not None:
        total = sum(pct for pid, pct in per_process_pct.items() if pid not in job_pids)
        if util_pct is not None:
            total = min(total, util_pct) if job_present else max(total, util_pct)
        return min(MILLI, max(0, total) * MILLI // 100)
    if util_pct is None:
        return MILLI if foreign_pids else 0
    if not job_present:
        return util_pct * MILLI // 100
    if not foreign_pids:
        return 0
    foreign_mem = sum(processes[pid] or 0 for pid in foreign_pids)
    job_mem = sum(mib or 0 for pid, mib in processes.items() if pid in job_pids)
    if foreign_mem + job_mem == 0:
        return util_pct * MILLI // 100
    return util_pct * MILLI * foreign_mem // (100 * (foreign_mem + job_mem))


def percentile(values: list[int], pct: int) -> int:
    """Nearest-rank percentile (``pct`` in 1..100) of a non-empty list."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < pct <= 100:
        raise ValueError(f"percentile {pct} is out of range 1..100")
    ordered = sorted(values)
    rank = math.ceil(pct * len(ordered) / 100)
    return ordered[max(rank, 1) - 1]


class _Hysteresis:
    """One published value that rises immediately and falls only after a hold."""

    def __init__(self, hold_s: float, step: int) -> None:
        self.hold_s = hold_s
        self.step = step
        self.value = 0
        self._lower_since: float | None = None
        self._lower_peak = 0

    def update(self, now: float, target: int) -> int:
        if target >= self.value:
            self.value = target
            self._lower_since = None
        elif self.value - target <= self.step:
            self._lower_since = None  # a small dip does not count as falling
        elif self._lower_since is None:
            self._lower_since, self._lower_peak = now, target
        else:
            self._lower_peak = max(self._lower_peak, target)
            if now - self._lower_since >= self.hold_s:
                self.value = self._lower_peak
                self._lower_since = None
        return self.value


@dataclass(frozen=True, slots=True)
class ForeignUsage:
    compute_milli: int
    memory_mib: int


class IdleEstimator:
    """Smoothed foreign usage of one device (see the module docstring)."""

    def __init__(
        self,
        window_s: float = 60.0,
        percentile: int = 95,
        hold_s: float = 30.0,
        compute_step_milli: int = 50,
        memory_step_mib: int = 256,
        memory_percentile: int = 100,
    ) -> None:
        if window_s <= 0 or hold_s < 0:
            raise ValueError("window_s must be positive and hold_s not negative")
        for name, pct in (("percentile", percentile), ("memory_percentile", memory_percentile)):
            if not 0 < pct <= 100:
                raise ValueError(f"{name} {pct} is out of range 1..100")
        self.window_s = window_s
        self.percentile = percentile
        self.memory_percentile = memory_percentile
        self._samples: deque[tuple[float, int, int]] = deque()
        self._compute = _Hysteresis(hold_s, compute_step_milli)
        self._memory = _Hysteresis(hold_s, memory_step_mib)

    def observe(
        self, now: float, foreign_compute_milli: int, foreign_memory_mib: int
    ) -> ForeignUsage:
        """Add one sample taken at ``now`` and return the usage to publish."""
        if self._samples and now < self._samples[-1][0]:
            now = self._samples[-1][0]  # a clock that steps back must not reorder the window
        self._samples.append((now, max(0, foreign_compute_milli), max(0, foreign_memory_mib)))
        while self._samples and self._samples[0][0] <= now - self.window_s:
            self._samples.popleft()
        compute = percentile([s[1] for s in self._samples], self.percentile)
        memory = percentile([s[2] for s in self._samples], self.memory_percentile)
        return ForeignUsage(self._compute.update(now, compute), self._memory.update(now, memory))

    def current(self) -> ForeignUsage:
        """The last published usage (zero before any sample)."""
        return ForeignUsage(self._compute.value, self._memory.value)
