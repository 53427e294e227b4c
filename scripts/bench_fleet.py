"""A fleet of real agents over lossy, narrow links (agent/fleetlab.py): each agent in a
network namespace of its own on one bridge, every host dropping ``--loss`` % of the packets
it receives (nftables) and sending at most ``--rate`` Mbit/s (tc tbf).

``--agents - 1`` agents have a simulated GPU; one (``sub``, priority 10, never coordinator)
has none and submits a job every ``--job-every`` seconds for ``--duration`` seconds. Then,
once the jobs have ended, ``--crashes`` GPU agents are killed (SIGKILL), one at a time: the
coordinator first, then the last-numbered GPU nodes. The next is killed only once every
surviving agent has declared the last one dead (or ``--crash-timeout`` passed).

Figures (one JSON line, ``bench: fleet``):

- ``convergence_s``: first agent started to every agent seeing every other alive and all
  agreeing on one coordinator;
- ``coordinators_seen``: every coordinator any agent named while sampled after convergence
  (every ``--poll`` s), and ``split_samples``: samples where agents disagreed;
- ``false_dead`` / ``suspect_events``: member events to dead / suspect in all logs, but for
  those of a killed agent logged after it was killed;
- ``crash_detect_s``: for each crash, from the kill until the last survivor logged the
  victim dead (``null``: not every survivor did within ``--crash-timeout``), with its
  median and max; the member events' timestamps (ms, the same clock as the kill's) are read
  from the agents' JSON logs; ``survivors_agree``: afterwards every survivor sees exactly
  the survivors alive and all name one coordinator (``coordinator_after``);
- ``jobs_submitted``, ``jobs_placed`` (on another node's GPU), ``jobs_completed``
  (succeeded) and ``jobs_output_ok`` (the output read back on ``sub`` is the job's).

Needs root (network namespaces), ``ip``, ``tc`` and ``nft``. Delay would need ``netem``,
which not every kernel has; it is the simulator's to model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flexmesh.agent.cli import get_json as _get
from flexmesh.agent.fleetlab import FleetLab, available
from flexmesh.agent.localmesh import MeshError

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")


def _progress(msg: str) -> None:
    print(f"[bench_fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _member_events(path: Path, offset: int = 0) -> tuple[list[tuple[float, str, str]], int]:
    """(ts, member, state) of each member event in an agent's JSON log from byte ``offset``
    on, and the offset after the last whole line read."""
    out = []
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
        end = data.rfind(b"\n") + 1
        for raw in data[:end].splitlines():
            with contextlib.suppress(ValueError, AttributeError, KeyError, TypeError):
                rec = json.loads(raw)
                if rec["msg"].startswith("member "):
                    kv = dict(p.split("=", 1) for p in rec["msg"].split()[1:] if "=" in p)
                    out.append((float(rec["ts"]), kv.get("name", ""), kv.get("state", "")))
        offset += end
    return out, offset


class Bench:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.lab = FleetLab(root, profile=args.profile)
        self.gpu_nodes = [f"g{i}" for i in range(args.agents - 1)]
        self.names = [*self.gpu_nodes, "sub"]
        self.seen: set[str] = set()
        self.split_samples = 0
        self.jobs: list[tuple[str, str]] = []  # (id, expected output)
        self.killed: dict[str, float] = {}  # victim -> when it was killed (time.time())

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

    def live(self) -> list[str]:
        return [n for n in self.names if n not in self.killed]

    def views(self) -> dict[str, tuple[set[str], str | None]] | None:
        out = {}
        for n in self.live():
            rows = _get(self.lab.agents[n].socket, "/v1/nodes")
            if rows is None:
                return None
            coord = next((r["name"] for r in rows if r["coordinator"]), None)
            out[n] = ({r["name"] for r in rows if r["state"] == "alive"}, coord)
        return out

    def agreed(self) -> str | None:
        v = self.views()
        if v is None or any(alive != set(self.live()) for alive, _ in v.values()):
            return None
        coords = {c for _, c in v.values()}
        coord = next(iter(coords)) if len(coords) == 1 else None
        return coord if coord in self.live() else None  # not a suspect (killed) one

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

    def crashes(self) -> list[float | None]:
        """Kill ``--crashes`` GPU agents one after the other; the detection time of each."""
        coord = self.agreed()
        order = ([coord] if coord in self.gpu_nodes else []) + \
            [n for n in reversed(self.gpu_nodes) if n != coord]
        return [self.crash(victim) for victim in order[:self.args.crashes]]

    def crash(self, victim: str) -> float | None:
        survivors = [n for n in self.live() if n != victim]
        offsets = {n: self.lab.agents[n].log.stat().st_size for n in survivors}
        seen: dict[str, float] = {}
        killed_at = self.killed[victim] = time.time()
        self.lab.kill(victim)
        deadline = time.monotonic() + self.args.crash_timeout
        while len(seen) < len(survivors) and time.monotonic() < deadline:
            time.sleep(0.2)
            for n in set(survivors) - set(seen):
                events, offsets[n] = _member_events(self.lab.agents[n].log, offsets[n])
                ts = next((t for t, m, st in events if m == victim and st == "dead"), None)
                if ts is not None:
                    seen[n] = ts
        took = max(seen.values()) - killed_at if len(seen) == len(survivors) else None
        _progress(f"killed {victim}: declared dead by {len(seen)} of {len(survivors)}"
                  + (f" within {took:.2f}s" if took is not None else ""))
        return took

    def crash_figures(self) -> dict[str, Any]:
        times = self.crashes()
        done = [t for t in times if t is not None]
        coord = None
        with contextlib.suppress(MeshError):  # they did not agree in time
            coord = self.lab.wait_for("the survivors to agree", self.agreed,
                                      timeout=self.args.crash_timeout, interval=0.5)
        return {"crashes": len(times), "crash_victims": list(self.killed),
                "crash_detect_s": [None if t is None else round(t, 2) for t in times],
                "crash_detect_median_s": round(statistics.median(done), 2) if done else None,
                "crash_detect_max_s": round(max(done), 2) if done else None,
                "crash_undetected": len(times) - len(done),
                "survivors_agree": coord is not None, "coordinator_after": coord}

    def false_events(self) -> dict[str, int]:
        """Member events to dead / suspect, but for a killed agent's once it was killed."""
        states = [st for n in self.names for ts, m, st in _member_events(
            self.lab.agents[n].log)[0] if ts < self.killed.get(m, float("inf"))]
        return {"false_dead": states.count("dead"), "suspect_events": states.count("suspect")}

    def header(self, convergence: float) -> dict[str, Any]:
        a = self.args
        return {"bench": "fleet", "agents": a.agents, "loss_pct": a.loss, "rate_mbit": a.rate,
                "profile": a.profile, "duration_s": a.duration,
                "convergence_s": round(convergence, 2),
                "coordinators_seen": sorted(self.seen), "split_samples": self.split_samples}


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
    p.add_argument("--logs", type=Path, help="copy every agent's log into this folder")
    p.add_argument("--crashes", type=int, default=3,
                   help="GPU agents killed one by one after the jobs (0: none)")
    p.add_argument("--crash-timeout", type=float, default=180.0,
                   help="seconds to wait for the survivors to declare a victim dead")
    args = p.parse_args(argv)
    if not 0 <= args.crashes <= args.agents - 1:
        p.error(f"--crashes must be 0 to {args.agents - 1} (the GPU agents)")
    why = available()
    if why is not None:
        print(f"bench_fleet: {why}", file=sys.stderr)
        return 2
    # A SIGTERM unwinds as Ctrl-C does, so the lab's agents and namespaces still go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flexmesh-bench-fleet-") as tmp:
        bench = Bench(Path(tmp), args)
        try:
            convergence = bench.start()
            _progress(f"converged in {convergence:.1f}s; steady for {args.duration:g}s")
            bench.steady()
            out = bench.header(convergence)
            out.update(bench.job_results())
            _progress(f"jobs ended; now {args.crashes} crashes")
            out.update(bench.crash_figures())
            out.update(bench.false_events())
            out["wall_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(out), flush=True)
        finally:
            bench.lab.close()
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                for n, a in bench.lab.agents.items():
                    with contextlib.suppress(FileNotFoundError):
                        shutil.copyfile(a.log, args.logs / f"{n}.log")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
