from __future__ import annotations

import random
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexmesh.agent.devices.idle import (
    ForeignUsage,
    IdleEstimator,
    foreign_compute_estimate,
    lendable,
    percentile,
)


@pytest.mark.parametrize(
    ("capacity", "leased", "foreign", "reserve", "expected"),
    [
        (1000, 0, 0, 0, 1000),
        (1000, 250, 300, 50, 400),
        (1000, 600, 500, 0, 0),  # over-committed by a rising foreign load: clamp at 0
        (16384, 0, 20000, 0, 0),
        (16384, 4096, 2048, 1024, 9216),
    ],
)
def test_lendable(capacity: int, leased: int, foreign: int, reserve: int, expected: int) -> None:
    assert lendable(capacity, leased, foreign, reserve) == expected


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_lendable_never_negative_nor_above_capacity(c: int, le: int, f: int, r: int) -> None:
    assert 0 <= lendable(c, le, f, r) <= c


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 95) == 95
    assert percentile(values, 100) == 100
    assert percentile([7], 50) == 7
    assert percentile([1, 2, 3, 4], 50) == 2
    with pytest.raises(ValueError):
        percentile([], 95)
    with pytest.raises(ValueError):
        percentile([1], 0)


def test_estimator_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        IdleEstimator(window_s=0)
    with pytest.raises(ValueError):
        IdleEstimator(percentile=101)
    with pytest.raises(ValueError):
        IdleEstimator(memory_percentile=0)


def test_starts_at_zero_and_rises_at_once() -> None:
    est = IdleEstimator(window_s=60, percentile=95, hold_s=30)
    assert est.current() == ForeignUsage(0, 0)
    assert est.observe(0, 0, 0) == ForeignUsage(0, 0)
    # A sustained foreign load is published on the very next reading (p95 of [0, 800] = 800).
    assert est.observe(1, 800, 4096) == ForeignUsage(800, 4096)
    assert est.current() == ForeignUsage(800, 4096)


def test_falls_only_after_the_hold_and_the_window() -> None:
    est = IdleEstimator(window_s=10, percentile=95, hold_s=20, compute_step_milli=50)
    for t in range(10):
        est.observe(t, 700, 0)
    published = [est.observe(t, 100, 0).compute_milli for t in range(10, 60)]
    # The window forgets the 700s after 10 s; the hold keeps 700 for 20 s more.
    first_drop = next(i for i, v in enumerate(published) if v < 700) + 10
    assert first_drop == 9 + 10 + 20
    assert published[-1] == 100


def test_small_dips_below_the_step_do_not_fall() -> None:
    est = IdleEstimator(window_s=5, percentile=95, hold_s=5, compute_step_milli=100)
    for t in range(10):
        est.observe(t, 500, 0)
    for t in range(10, 100):
        assert est.observe(t, 450, 0).compute_milli == 500


def test_falls_to_the_highest_value_seen_during_the_hold() -> None:
    est = IdleEstimator(window_s=1, percentile=100, hold_s=10, compute_step_milli=10)
    est.observe(0, 900, 0)
    values = [100, 300, 200, 100, 100, 100, 100, 100, 100, 100, 100, 100]
    out = [est.observe(t + 1, v, 0).compute_milli for t, v in enumerate(values)]
    assert 900 in out and out[-1] == 300  # not 100: 300 was seen while holding


def test_memory_uses_the_window_maximum_by_default() -> None:
    est = IdleEstimator(window_s=30, percentile=50, hold_s=0)
    for t in range(20):
        # One allocation in twenty samples still counts in full for memory.
        usage = est.observe(t, 0, 8192 if t == 3 else 0)
    assert usage.memory_mib == 8192
    assert usage.compute_milli == 0


def test_a_bursty_foreign_load_does_not_flap_lendable_capacity() -> None:
    """A training-loop-like load: 2 s bursts to 90 % every 10 s over a 20 % baseline, with
    noise. Raw lendable capacity would change on most samples; the published one settles
    at the burst level and stays there."""
    rng = random.Random(4)
    est = IdleEstimator(window_s=60, percentile=95, hold_s=30, compute_step_milli=50)
    raw_lendable, smooth_lendable = [], []
    for t in range(600):
        load = 900 if t % 10 < 2 else 200
        load += rng.randint(-30, 30)
        raw_lendable.append(lendable(1000, 0, load, 50))
        smooth_lendable.append(lendable(1000, 0, est.observe(float(t), load, 0).compute_milli, 50))

    def changes(series: list[int]) -> int:
        return sum(1 for a, b in pairwise(series) if abs(a - b) >= 50)

    assert changes(raw_lendable) > 100
    assert changes(smooth_lendable[20:]) <= 2  # after warm-up: at most a couple of steps
    assert min(smooth_lendable[20:]) >= 0
    # It does not lend into the bursts: published foreign usage covers the burst level.
    assert max(smooth_lendable[20:]) <= 1000 - 870 - 50


def test_rare_spikes_below_the_percentile_are_ignored() -> None:
    est = IdleEstimator(window_s=60, percentile=95, hold_s=30)
    published = [est.observe(t, 1000 if t % 60 == 30 else 100, 0).compute_milli for t in range(600)]
    assert set(published[1:]) == {100}


def test_a_clock_stepping_back_does_not_break_the_window() -> None:
    est = IdleEstimator(window_s=10, hold_s=0)
    est.observe(100, 500, 0)
    assert est.observe(50, 100, 0).compute_milli == 500


@given(
    st.lists(
        st.tuples(st.floats(0, 5), st.integers(-100, 1000), st.integers(-10, 10**5)),
        min_size=1,
        max_size=200,
    )
)
def test_published_usage_is_bounded_by_what_was_observed(
    steps: list[tuple[float, int, int]],
) -> None:
    est = IdleEstimator(window_s=30, percentile=90, hold_s=10)
    now = 0.0
    max_compute = max_memory = 0
    for dt, compute, memory in steps:
        now += dt
        usage = est.observe(now, compute, memory)
        max_compute, max_memory = max(max_compute, compute), max(max_memory, memory)
        assert 0 <= usage.compute_milli <= max_compute
        assert 0 <= usage.memory_mib <= max_memory
    assert est.current() == usage


@given(st.integers(0, 1000), st.integers(1, 120))
def test_a_steady_load_is_published_exactly(load: int, seconds: int) -> None:
    est = IdleEstimator(window_s=30, percentile=95, hold_s=10)
    for t in range(seconds):
        usage = est.observe(t, load, load * 16)
    assert usage == ForeignUsage(load, load * 16)


class TestForeignComputeEstimate:
    jobs = frozenset({100})

    def test_per_process_samples_win(self) -> None:
        procs = {100: 1000, 200: 500}
        assert foreign_compute_estimate(70, {100: 40, 200: 30}, procs, self.jobs) == 300

    def test_per_process_capped_by_device_utilisation_when_jobs_run(self) -> None:
        assert foreign_compute_estimate(20, {200: 90}, {100: 1, 200: 1}, self.jobs) == 200

    def test_no_job_means_all_utilisation_is_foreign(self) -> None:
        assert foreign_compute_estimate(60, {}, {}, self.jobs) == 600
        assert foreign_compute_estimate(60, None, {200: 10}, self.jobs) == 600
        assert foreign_compute_estimate(60, {200: 10}, {200: 10}, self.jobs) == 600

    def test_only_jobs_means_no_foreign_compute(self) -> None:
        assert foreign_compute_estimate(80, None, {100: 4096}, self.jobs) == 0

    def test_shared_device_splits_by_memory(self) -> None:
        assert foreign_compute_estimate(80, None, {100: 3000, 200: 1000}, self.jobs) == 200
        assert foreign_compute_estimate(80, None, {100: None, 200: None}, self.jobs) == 800

    def test_unknown_utilisation_with_a_foreign_process_counts_as_busy(self) -> None:
        assert foreign_compute_estimate(None, None, {200: 10}, self.jobs) == 1000
        assert foreign_compute_estimate(None, None, {100: 10}, self.jobs) == 0
        assert foreign_compute_estimate(None, None, {}, self.jobs) == 0

    @given(
        st.one_of(st.none(), st.integers(0, 100)),
        st.one_of(st.none(), st.dictionaries(st.integers(1, 50), st.integers(0, 100))),
        st.dictionaries(st.integers(1, 50), st.one_of(st.none(), st.integers(0, 10**5))),
        st.frozensets(st.integers(1, 50)),
    )
    def test_always_within_one_device(
        self,
        util: int | None,
        sm: dict[int, int] | None,
        procs: dict[int, int | None],
        jobs: frozenset[int],
    ) -> None:
        assert 0 <= foreign_compute_estimate(util, sm, procs, jobs) <= 1000
