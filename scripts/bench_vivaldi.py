"""Vivaldi coordinates over a clustered topology; one JSON line on stdout."""

from __future__ import annotations

import argparse
import json
import time

from flexmesh.agent.coordsim import run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--clusters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=300, help="probe rounds (one probe each)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    started = time.perf_counter()
    figures = run(args.nodes, args.clusters, args.rounds, args.seed)
    print(json.dumps({"bench": "vivaldi", **figures,
                      "seconds": round(time.perf_counter() - started, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
