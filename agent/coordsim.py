"""Vivaldi over a simulated topology: clusters of nodes (a rack, a ground station, a swarm)
joined by longer links, noisy RTT samples as probes would give, and how well the
coordinates then predict the RTT between any two nodes (``protocol/vivaldi.py``).

Used by ``scripts/bench_vivaldi`` and the tests; deterministic for a seed.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

from flexmesh.protocol.vivaldi import Coordinate, update


@dataclass(frozen=True)
class Topology:
    cluster: list[int]  # node -> its cluster
    rtt: list[list[float]]  # seconds, symmetric, 0 on the diagonal


def clustered(n: int, clusters: int, rng: random.Random) -> Topology:
    """``n`` nodes in ``clusters`` groups: 1-5 ms inside a group, 20-120 ms between
    groups (by the groups' places on a plane), each node with its own access delay."""
    centers = [(rng.uniform(0, 50), rng.uniform(0, 50)) for _ in range(clusters)]
    where = [i % clusters for i in range(n)]
    spot = [(rng.uniform(0, 2), rng.uniform(0, 2)) for _ in range(n)]
    access = [rng.uniform(0.2e-3, 1.5e-3) for _ in range(n)]
    rtt = [[0.0] * n for _ in range(n)]
    for a in range(n):
        for b in range(a + 1, n):
            (cx, cy), (dx, dy) = centers[where[a]], centers[where[b]]
            far = ((cx - dx) ** 2 + (cy - dy) ** 2) ** 0.5 * 2e-3 + (
                20e-3 if where[a] != where[b] else 0.0)
            near = ((spot[a][0] - spot[b][0]) ** 2 + (spot[a][1] - spot[b][1]) ** 2) ** 0.5
            rtt[a][b] = rtt[b][a] = far + near * 1e-3 + access[a] + access[b]
    return Topology(where, rtt)


def converge(topo: Topology, rounds: int, rng: random.Random,
             noise: float = 0.05) -> list[Coordinate]:
    """Every node probes one random peer a round (as SWIM does) and updates its
    coordinate from the sample (``noise``: relative jitter of each measurement)."""
    n = len(topo.rtt)
    coords = [Coordinate() for _ in range(n)]
    for _ in range(rounds):
        for a in range(n):
            b = rng.randrange(n - 1)
            b += b >= a
            sample = topo.rtt[a][b] * (1 + rng.uniform(-noise, noise))
            update(coords[a], coords[b], sample, rng)
    return coords


def relative_errors(topo: Topology, coords: list[Coordinate],
                    within: bool | None = None) -> list[float]:
    """|predicted - true| / true over node pairs (``within``: only pairs in one cluster,
    or only pairs across clusters; None: all)."""
    n = len(coords)
    return [abs(coords[a].distance(coords[b]) - topo.rtt[a][b]) / topo.rtt[a][b]
            for a in range(n) for b in range(a + 1, n)
            if within is None or (topo.cluster[a] == topo.cluster[b]) == within]


def nearest_in_cluster(topo: Topology, coords: list[Coordinate]) -> float:
    """The share of nodes whose nearest peer by coordinates is in their own cluster."""
    n = len(coords)
    hits = 0
    for a in range(n):
        b = min((x for x in range(n) if x != a), key=lambda x: coords[a].distance(coords[x]))
        hits += topo.cluster[a] == topo.cluster[b]
    return hits / n


def run(n: int = 100, clusters: int = 5, rounds: int = 300, seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)
    topo = clustered(n, clusters, rng)
    coords = converge(topo, rounds, rng)
    errors = relative_errors(topo, coords)
    return {"nodes": n, "clusters": clusters, "rounds": rounds,
            "median_relative_error": round(statistics.median(errors), 4),
            "p90_relative_error": round(statistics.quantiles(errors, n=10)[-1], 4),
            "median_relative_error_within_clusters": round(statistics.median(
                relative_errors(topo, coords, within=True)), 4),
            "nearest_in_own_cluster": round(nearest_in_cluster(topo, coords), 3)}
