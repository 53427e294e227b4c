"""A fleet of real agents over lossy, narrow links (agent/fleetlab.py): each agent in a
network namespace of its own on one bridge, every host dropping ``--loss`` % of the packets
it receives (nftables) and sending at most ``--rate`` Mbit/s (tc tbf).

``--agents - 1`` agents have a simulated GPU; one (``sub``, priority 10, never coordinator)
has none and submits a job every ``--job-every`` seconds for ``--duration`` seconds. Nobody
is killed, so every ``member ... state=dead`` line in any agent's log is a false DEAD.

Figures (one JSON line, ``bench: fleet``):

- ``convergence_s``: first agent started to every agent seeing every other alive and all
  agreeing on one coordinator;
- ``coordinators_seen``: every coordinator any agent named while sampled after convergence
  (every ``--poll`` s), and ``split_samples``: samples where agents disagreed;
- ``false_dead`` / ``suspect_events``: member events to dead / suspect in all logs;
- ``jobs_submitted``, ``jobs_placed`` (on another node's GPU), ``jobs_completed``
  (succeeded) and ``jobs_output_ok`` (the output read back on ``sub`` is the job's).

Needs root (network namespaces), ``ip``, ``tc`` and ``nft``. Delay would need ``netem``,
which not every kernel has; it is the simulator's to model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flexmesh.agent.cli import get_json as _get
from flexmesh.agent.fleetlab import FleetLab, available

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")


def _progress(msg: str) -> None:
    print(f"[bench_fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _log_states(path: Path) -> list[str]:
    """The state of every member event in an agent's JSON log."""
    out = []
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        for raw in f:
            with contextlib.suppress(ValueError, AttributeError):
                msg = json.loads(raw)["msg"]
                if msg.startswith("member "):
                    kv = dict(p.split("=", 1) for p in msg.split()[1:] if "=" in p)
                    out.append(kv.get("state", ""))
    return out


class Bench:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.lab = FleetLab(root, profile=args.profile)
        self.gpu_nodes = [f"g{i}" for i in range(args.agents - 1)]
        self.names = [*self.gpu_nodes, "sub"]
        self.seen: set[str] = set()
        self.split_samples = 0
        self.jobs: list[tuple[str, str]] = []  # (id, expected output)

    def start(self) -> float:
        self.lab.open()
        self.lab.net.default_loss = self.args.loss
        self.lab.net.default_rate_mbit = self.args.rate
        t0 = time.monotonic()
        first = self.gpu_nodes[0]
        self.lab.start(first, sim=self.args.sim)
        for n in self.gpu_nodes[1:]:
            self.lab.start(n, sim=self.args.sim, join=[first], wait=False)
        self.lab.start("sub", join=[first], extra=["--priority", "10"], wait=False)
        for n in self.names[1:]:
            self.lab.wait_ready(n, timeout=120)
        _progress(f"{len(self.names)} agents up; waiting for convergence")
        self.lab.wait_for("convergence", self.agreed, timeout=self.args.converge_timeout,
                          interval=0.5)
        return time.monotonic() - t0

    def views(self) -> dict[str, tuple[set[str], str | None]] | None:
        out = {}
        for n in self.names:
            rows = _get(self.lab.agents[n].socket, "/v1/nodes")
            if rows is None:
                return None
            coord = next((r["name"] for r in rows if r["coordinator"]), None)
            out[n] = ({r["name"] for r in rows if r["state"] == "alive"}, coord)
        return out

    def agreed(self) -> str | None:
        v = self.views()
        if v is None or any(alive != set(self.names) for alive, _ in v.values()):
            return None
        coords = {c for _, c in v.values()}
        return next(iter(coords)) if len(coords) == 1 else None

    def sample(self) -> None:
        v = self.views()
        if v is None:
            return
        coords = {c for _, c in v.values()}
        self.seen |= {c for c in coords if c is not None}
        if len(coords) != 1:
            self.split_samples += 1

    def submit(self) -> None:
        i = len(self.jobs)
        text = f"job {i} done"
        res = self.lab.cli("sub", "submit", "--gpu", "0.5", "--memory", "1GiB", "--kind",
                           "gpu", "-o", "json", "--", "sh", "-c",
                           f"sleep {self.args.job_seconds}; echo '{text}'", check=False)
        if res.returncode == 0:
            self.jobs.append((json.loads(res.stdout)["id"], text + "\n"))

    def steady(self) -> None:
        end = time.monotonic() + self.args.duration
        next_job = time.monotonic()
        while time.monotonic() < end:
            if time.monotonic() >= next_job:
                self.submit()
                next_job += self.args.job_every
            self.sample()
            time.sleep(self.args.poll)

    def job_results(self) -> dict[str, int]:
        """Wait (bounded) for the submitted jobs to end, then count them."""
        deadline = time.monotonic() + self.args.drain
        rows: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            rows = {j: _get(self.lab.agents["sub"].socket, f"/v1/jobs/{j}") or {}
                    for j, _ in self.jobs}
            if all(r.get("state") in TERMINAL for r in rows.values()):
                break
            time.sleep(1.0)
        placed = [j for j, r in rows.items() if r.get("node") in self.gpu_nodes]
        done = [j for j, r in rows.items() if r.get("state") == "succeeded"]
        ok = sum(1 for j, text in self.jobs if j in done
                 and self.lab.cli("sub", "logs", j, check=False).stdout == text)
        return {"jobs_submitted": len(self.jobs), "jobs_placed": len(placed),
                "jobs_completed": len(done), "jobs_output_ok": ok}

    def result(self, convergence: float, wall: float) -> dict[str, Any]:
        states = [s for n in self.names for s in _log_states(self.lab.agents[n].log)]
        a = self.args
        return {"bench": "fleet", "agents": a.agents, "loss_pct": a.loss, "rate_mbit": a.rate,
                "profile": a.profile, "duration_s": a.duration,
                "convergence_s": round(convergence, 2),
                "coordinators_seen": sorted(self.seen), "split_samples": self.split_samples,
                "false_dead": states.count("dead"), "suspect_events": states.count("suspect"),
                **self.job_results(), "wall_s": round(wall, 1)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=8, help="agents, one of them deviceless")
    p.add_argument("--loss", type=int, default=20, help="%% of packets each host drops")
    p.add_argument("--rate", type=float, default=2.0, help="Mbit/s each host may send")
    p.add_argument("--profile", default="edge", help="agents' timing profile")
    p.add_argument("--duration", type=float, default=120.0,
                   help="seconds of steady state after convergence (600 for the README)")
    p.add_argument("--sim", default="gpu:1x16GiB", help="each GPU node's simulated devices")
    p.add_argument("--job-every", type=float, default=10.0, help="seconds between jobs")
    p.add_argument("--job-seconds", type=float, default=2.0, help="how long each job runs")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--drain", type=float, default=120.0,
                   help="seconds to wait for the last jobs to end")
    p.add_argument("--converge-timeout", type=float, default=180.0)
    args = p.parse_args(argv)
    why = available()
    if why is not None:
        print(f"bench_fleet: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flexmesh-bench-fleet-") as tmp:
        bench = Bench(Path(tmp), args)
        try:
            convergence = bench.start()
            _progress(f"converged in {convergence:.1f}s; steady for {args.duration:g}s")
            bench.steady()
            print(json.dumps(bench.result(convergence, time.monotonic() - started)),
                  flush=True)
        finally:
            bench.lab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
