"""Run many seeds of ``flexmesh.agent.simchaos`` in parallel; one JSON line on stdout."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from multiprocessing import Pool
from typing import Any

from flexmesh.agent.simchaos import run_seed


def one(seed: int) -> dict[str, Any]:
    try:
        return run_seed(seed)
    except AssertionError as exc:  # an InvariantError names the seed
        return {"seed": seed, "error": str(exc)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=5000)
    p.add_argument("--first", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    seeds = range(args.first, args.first + args.seeds)
    with Pool(max(1, args.jobs)) as pool:
        results = pool.map(one, seeds, chunksize=16)
    failed = [r for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    ends: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    for r in ok:
        ends.update(r["ends"])
        faults.update(r["faults"])
    print(json.dumps({
        "bench": "invariants", "seeds": args.seeds, "first": args.first,
        "failed": len(failed), "failures": [r["error"] for r in failed[:10]],
        "jobs": sum(r["jobs"] for r in ok), "job_ends": dict(sorted(ends.items())),
        "faults": dict(sorted(faults.items())),
        "wall_s": round(time.perf_counter() - t0, 1), "workers": args.jobs,
        "python": platform.python_version(),
    }))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
