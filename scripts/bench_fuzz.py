"""Run many examples of tests/fuzz_node.py against one node; one JSON line on stdout."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzz_node


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--examples", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    count = {"examples": 0, "inputs": 0}

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(fuzz_node.INPUT, min_size=1, max_size=24))
    def run(inputs: list[fuzz_node.Input]) -> None:
        count["examples"] += 1
        count["inputs"] += len(inputs)
        fuzz_node.feed(fuzz_node.target_node(), inputs)

    started = time.perf_counter()
    failure = ""
    try:
        run()
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"[:2000]
    print(json.dumps({"bench": "fuzz", "examples": count["examples"],
                      "inputs": count["inputs"], "failed": 1 if failure else 0,
                      "failure": failure, "seed": args.seed,
                      "seconds": round(time.perf_counter() - started, 1)}))
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
