"""Coordinator failover with real agents on 127.0.0.1: from ``kill -9`` of the coordinator
to the first job placed by its successor.

A mesh of ``--gpu-nodes`` agents with a simulated GPU each and one agent with no device
(``sub``, priority 10, so it never coordinates) runs on loopback. Each run:

1. waits until every agent sees every other alive and all agree on one coordinator;
2. kills the coordinator with SIGKILL and, at once, submits a job on ``sub``
   (``flexmesh submit``): the job cannot be placed until a successor is elected;
3. polls ``GET /v1/jobs/ID`` on ``sub`` (what ``flexmesh show -o json`` prints) every
   ``--poll`` s until the job has a ``node``;
4. reads the successor's log (JSON lines with wall-clock timestamps) for the moment it
   declared the old coordinator dead and the moment it placed the job;
5. restarts the killed agent (the mesh is whole again for the next run).

Figures, per run and as median / p90 / max over the runs:

- ``placed_s``: kill to the successor's ``placed`` log line for the job (the target:
  under 2 s plus detection time);
- ``placed_polled_s``: kill to the first ``show`` that has the job's node;
- ``detect_s``: kill to the successor declaring the old coordinator dead;
- ``after_detect_s``: ``placed_s - detect_s``, the failover proper.

One JSON line per run (``failover-run``) and a summary (``failover``) on stdout; progress on
stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flexmesh.agent.cli import get_json as _get
from flexmesh.agent.localmesh import LocalMesh


def _progress(msg: str) -> None:
    print(f"[bench_failover {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _stats(xs: list[float], key: str) -> dict[str, float | None]:
    if not xs:
        return {f"{key}_median": None, f"{key}_p90": None, f"{key}_max": None}
    s = sorted(xs)
    return {f"{key}_median": round(statistics.median(s), 3),
            f"{key}_p90": round(s[min(len(s) - 1, int(0.9 * len(s)))], 3),
            f"{key}_max": round(s[-1], 3)}


def _log_records(path: Path, offset: int) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            with contextlib.suppress(ValueError):
                rec = json.loads(raw)
                if isinstance(rec, dict) and isinstance(rec.get("msg"), str):
                    out.append(rec)
    return out


def _kv(msg: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in msg.split()[1:] if "=" in p)


class Bench:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.mesh = LocalMesh(root, profile=args.profile, plaintext=args.insecure_plaintext)
        self.gpu_nodes = [f"g{i}" for i in range(args.gpu_nodes)]
        self.names = [*self.gpu_nodes, "sub"]
        self.config = root / "agent.toml"
        self.config.write_text('ui = ""\n[log]\nformat = "json"\n')

    def start(self) -> None:
        extra = ["--config", str(self.config)]
        first = self.gpu_nodes[0]
        self.mesh.start(first, sim=self.args.sim, extra=extra)
        for n in self.gpu_nodes[1:]:
            self.mesh.start(n, sim=self.args.sim, join=[first], extra=extra, wait=False)
        self.mesh.start("sub", join=[first], extra=[*extra, "--priority", "10"], wait=False)
        for n in self.names[1:]:
            self.mesh.wait_ready(n, timeout=120)

    def coordinator(self) -> str | None:
        """The one coordinator every agent agrees on, with everyone alive; else None."""
        seen = set()
        for n in self.names:
            rows = _get(self.mesh.agents[n].socket, "/v1/nodes")
            if rows is None:
                return None
            if {r["name"] for r in rows if r["state"] == "alive"} != set(self.names):
                return None
            seen |= {r["name"] for r in rows if r["coordinator"]} or {None}
        return next(iter(seen)) if len(seen) == 1 else None

    def wait_coordinator(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = self.coordinator()
            if c is not None:
                return c
            time.sleep(0.2)
        raise RuntimeError(f"the mesh did not agree on a coordinator in {timeout:g}s")

    def run_once(self, i: int) -> dict[str, Any]:
        old = self.wait_coordinator()
        time.sleep(self.args.pause)  # a quiet mesh: no news still being gossiped
        offsets = {n: self.mesh.agents[n].log.stat().st_size for n in self.names}
        sub = self.mesh.agents["sub"].socket
        killed_at = time.time()
        self.mesh.kill(old, signal.SIGKILL)
        job_id = self.mesh.cli("sub", "submit", "--gpu", "0.25", "--memory", "1GiB", "--kind",
                               "gpu", "--", "sleep", "1").stdout.strip()
        submitted = time.time() - killed_at
        placed_polled = None
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline:
            job = _get(sub, f"/v1/jobs/{job_id}")
            if job and job.get("node"):
                placed_polled = time.time() - killed_at
                break
            time.sleep(self.args.poll)
        run: dict[str, Any] = {"bench": "failover-run", "run": i, "killed": old, "job": job_id,
                               "submitted_s": round(submitted, 3),
                               "placed_polled_s": round(placed_polled, 3)
                               if placed_polled is not None else None}
        # Who placed it, when; when that node declared the old coordinator dead.
        placer = detect = placed = None
        for n in self.names:
            if n == old:
                continue
            for rec in _log_records(self.mesh.agents[n].log, offsets[n]):
                msg = rec["msg"]
                kv = _kv(msg)
                if msg.startswith("placed ") and kv.get("job") == job_id and placed is None:
                    placer, placed = n, float(rec["ts"]) - killed_at
        if placer is not None:
            for rec in _log_records(self.mesh.agents[placer].log, offsets[placer]):
                kv = _kv(rec["msg"])
                if (rec["msg"].startswith("member ") and kv.get("name") == old
                        and kv.get("state") == "dead"):
                    detect = float(rec["ts"]) - killed_at
                    break
        run.update({
            "placed_by": placer,
            "placed_s": round(placed, 3) if placed is not None else None,
            "detect_s": round(detect, 3) if detect is not None else None,
            "after_detect_s": round(placed - detect, 3)
            if placed is not None and detect is not None else None,
        })
        print(json.dumps(run), flush=True)
        _progress(f"run {i + 1}: killed {old}; placed by {placer} after {run['placed_s']}s "
                  f"(dead at {run['detect_s']}s, polled {run['placed_polled_s']}s)")
        self.restart(old)
        return run

    def restart(self, name: str) -> None:
        """Restart on the same address, joining through a live agent: the others retry
        their dead peers at the address they knew (a node restarted on a new port with no
        seed of its own, as the first agent has none, would never be found)."""
        a = self.mesh.agents[name]
        args = [x for x in a.args]
        if "--bind" in args:
            args[args.index("--bind") + 1] = a.addr
        if "--join" not in args:
            live = next(n for n in self.names if n != name)
            args += ["--join", self.mesh.agents[live].addr]
        a.args = args
        self.mesh.restart(name)

    def close(self) -> None:
        self.mesh.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_failover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--gpu-nodes", type=int, default=4, help="agents with a simulated GPU")
    p.add_argument("--sim", default="gpu:1x16GiB", help="each GPU node's simulated devices")
    p.add_argument("--profile", default="lan", help="agents' timing profile (default lan)")
    p.add_argument("--insecure-plaintext", action="store_true",
                   help="agents without a key (as before issue 11; default: sealed)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait per run")
    p.add_argument("--poll", type=float, default=0.05, help="seconds between show polls")
    p.add_argument("--pause", type=float, default=2.0,
                   help="seconds of quiet before each kill")
    args = p.parse_args(argv)
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="flexmesh-bench-failover-") as tmp:
        bench = Bench(Path(tmp), args)
        try:
            bench.start()
            _progress(f"{len(bench.names)} agents up ({args.profile})")
            for i in range(args.runs):
                runs.append(bench.run_once(i))
        finally:
            bench.close()
    done = [r for r in runs if r["placed_s"] is not None]
    summary: dict[str, Any] = {
        "bench": "failover", "profile": args.profile, "agents": args.gpu_nodes + 1,
        "runs": len(runs), "placed_runs": len(done),
        **_stats([r["placed_s"] for r in done], "placed_s"),
        **_stats([r["placed_polled_s"] for r in runs if r["placed_polled_s"] is not None],
                 "placed_polled_s"),
        **_stats([r["detect_s"] for r in done if r["detect_s"] is not None], "detect_s"),
        **_stats([r["after_detect_s"] for r in done if r["after_detect_s"] is not None],
                 "after_detect_s"),
    }
    after = summary["after_detect_s_median"]
    summary["target_under_2s_plus_detection"] = after < 2.0 if after is not None else None
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
