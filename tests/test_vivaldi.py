"""Network coordinates: a spring per sample, and estimates that converge on a clustered
topology (the figure for 100 nodes is scripts/bench_vivaldi's)."""

from __future__ import annotations

import math
import random

import pytest

from flexmesh.agent.coordsim import run
from flexmesh.protocol.vivaldi import DIMENSIONS, ERROR_MAX, Coordinate, update


def test_two_nodes_settle_at_the_distance_they_measure() -> None:
    rng = random.Random(1)
    a, b = Coordinate(), Coordinate()
    for _ in range(200):
        update(a, b, 0.040, rng)
        update(b, a, 0.040, rng)
    assert a.distance(b) == pytest.approx(0.040, rel=0.02)
    assert a.error < 0.1 and b.error < 0.1  # confident once predictions hold


def test_a_confident_node_moves_little_for_a_newcomer() -> None:
    rng = random.Random(2)
    old, new = Coordinate([0.01] + [0.0] * (DIMENSIONS - 1), 1e-4, 0.05), Coordinate()
    before = list(old.vec)
    update(old, new, 0.030, rng)
    moved = math.dist(before, old.vec)
    update(new, old, 0.030, rng)
    assert moved < 0.25 * math.dist([0.0] * DIMENSIONS, new.vec)


@pytest.mark.parametrize("rtt", [0.0, -1.0, math.inf, math.nan, 11.0])
def test_an_implausible_sample_is_refused(rtt: float) -> None:
    me = Coordinate()
    assert update(me, Coordinate(), rtt, random.Random(3)) is False
    assert me == Coordinate()


def test_gossiped_coordinates_are_checked() -> None:
    c = Coordinate([0.001 * i for i in range(DIMENSIONS)], 0.0002, 0.3)
    assert Coordinate.from_wire(c.to_wire()) == c
    for bad in (None, [], [0.0] * DIMENSIONS, [math.nan] * (DIMENSIONS + 2),
                [1e9] * (DIMENSIONS + 2), [True] * (DIMENSIONS + 2),
                [0.0] * DIMENSIONS + [-1.0, 0.1]):
        assert Coordinate.from_wire(bad) is None
    clipped = Coordinate.from_wire([0.0] * DIMENSIONS + [0.0, 99.0])
    assert clipped is not None and clipped.error == ERROR_MAX


def test_estimates_converge_on_a_clustered_topology() -> None:
    figures = run(n=60, clusters=4, rounds=250, seed=5)
    assert figures["median_relative_error"] < 0.2, figures
    assert figures["nearest_in_own_cluster"] >= 0.9, figures
