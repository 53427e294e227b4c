"""Many seeds, small meshes, random faults (see ``agent/simchaos.py``): the invariants hold
after every event, the mesh heals, every job ends or waits, and every remote job's output
reaches its origin whole. A failure names the seed that replays it exactly:
``python -c "from flexmesh.agent.simchaos import run_seed; run_seed(SEED)"``. The bench
``scripts/bench_invariants`` runs thousands."""

from __future__ import annotations

import os

import pytest

from flexmesh.agent.simchaos import run_seed

# 500 seeds in CI (HYPOTHESIS_PROFILE=ci is how .ci/run marks it), 100 on a laptop.
SEEDS = range(500 if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else 100)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_faults_then_heal(seed: int) -> None:
    result = run_seed(seed)
    assert sum(result["ends"].values()) == result["jobs"]
