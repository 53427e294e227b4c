"""Vivaldi coordinates over a clustered topology; one JSON line on stdout.

Default: the coordinate math alone (``agent/coordsim.py``). ``--mesh``: the real node
code in the deterministic simulator, the coordinates carried on probe acks over a latency
matrix of ``--clusters`` sites; figures are the coordinator's estimates between every
pair of other nodes, and where jobs submitted at each site land."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from flexmesh.agent.coordsim import run
from flexmesh.agent.devices.base import Device
from flexmesh.agent.simulator import LinkFaults, Simulator
from flexmesh.protocol.membership import PRESETS


def mesh(nodes: int, clusters: int, seconds: float, seed: int,
         profile: str) -> dict[str, Any]:
    rng = random.Random(seed)
    site_delay = {(i, j): rng.uniform(0.010, 0.060) for i in range(clusters)
                  for j in range(i + 1, clusters)}
    site: dict[str, int] = {}

    def one_way(x: str, y: str) -> float:
        i, j = sorted((site[x], site[y]))
        return 0.001 if i == j else site_delay[i, j]

    sim = Simulator(seed, faults=LinkFaults(one_way=one_way, jitter=0.0005),
                    membership=PRESETS[profile])
    names = [f"n{k:03d}" for k in range(nodes)]
    for k, name in enumerate(names):
        site[name] = k % clusters
        sim.add_node(name, [Device(f"{name}-gpu", "gpu", "sim-gpu", 16384, "sim")],
                     join=None if k == 0 else [names[0]], priority=-1 if k == 0 else 0)
    sim.run_for(seconds, check=False)
    coordinator = sim.nodes[names[0]].node.membership
    errors = []
    for a in names[1:]:
        for b in names[1:]:
            est = coordinator.rtt(a, b) if a < b else None
            if est is not None:
                real = 2 * one_way(a, b)
                errors.append(abs(est - real) / real)
    jobs = []
    for c in range(1, min(clusters, 5)):
        origin = names[c]  # a node of site c, which submits whole-GPU jobs of its own
        for i in range(3):
            job_id = f"site{c}-{i}"
            sim.submit(origin, job_id, ["sleep", "300"], 1000, 0)
            jobs.append((job_id, c))
    sim.run_for(30, check=False)
    placed = [(sim.job(j), c) for j, c in jobs]
    at_home = sum(1 for job, c in placed if job is not None and job.node and site[job.node] == c)
    return {"pairs": len(errors), "rtt_median_rel_error": round(statistics.median(errors), 4),
            "rtt_p90_rel_error": round(statistics.quantiles(errors, n=10)[-1], 4),
            "jobs": len(jobs), "jobs_at_submitters_site": at_home}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--clusters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=300, help="probe rounds (one probe each)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mesh", action="store_true", help="real node code in the simulator")
    p.add_argument("--seconds", type=float, default=600.0, help="--mesh: simulated time")
    p.add_argument("--profile", default="lan", choices=sorted(PRESETS),
                   help="--mesh: membership timings (how often each node probes)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    if args.mesh:
        figures = mesh(args.nodes, args.clusters, args.seconds, args.seed, args.profile)
    else:
        figures = run(args.nodes, args.clusters, args.rounds, args.seed)
    print(json.dumps({"bench": "vivaldi-mesh" if args.mesh else "vivaldi", **figures,
                      "seconds": round(time.perf_counter() - started, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
