"""Chaos with real agents on 127.0.0.1: jobs submitted while owners are killed with
``kill -9`` and restarted every few seconds, then every job's end checked against what
really ran.

``--agents`` agents ``g0..`` have a simulated GPU each (``--sim``); one more, ``sub``
(no device, priority 10: it never coordinates), submits ``--jobs`` jobs of half a GPU at
once and is never killed (it is the origin every job is counted on; killing it too would
test the journal's recovery, not the mesh). Every ``--kill-every`` s one GPU agent,
drawn with ``--seed``, is killed with SIGKILL (the coordinator may be drawn) and started
again ``--down`` s later on the same address, with the same state dir. Kills stop once
every job has ended (or after ``--chaos-for`` s); then the bench waits for the last jobs.

Each job is a shell loop run as ``borrowed_user`` on its owner, writing marker lines to one
world-writable file: ``start``, a ``tick`` every 0.5 s and ``end`` after ``--job-seconds``,
each with the job's id, the shell's pid (one run) and the wall time. That is what really
ran, whatever the agents say.

Figures (one JSON line, ``bench: chaos``):

- ``succeeded``, ``failed``, ``preempted``, ``cancelled``, ``lost``: end states on ``sub``;
  ``missing``: jobs not ended when the bench gave up (``--drain``) or unknown to ``sub``;
- ``runs``: runs seen in markers; ``jobs_run_more_than_once``: jobs with more than one
  run (a requeue after a stopped run is allowed); ``jobs_completed_twice``: jobs with two
  runs that reached ``end``; ``jobs_ran_concurrently``: jobs with two runs whose marker
  spans (start to last line) overlap in time;
- ``lost_that_ran`` (and ``lost_that_ran_ids``): jobs ended ``lost`` with a run that
  reached ``end``; ``lost_reasons``:
  the reasons ``sub`` gives for them (counted); ``succeeded_not_run``: jobs ``succeeded``
  without a run that reached ``end``;
- ``max_lease_ratio``: the highest leased/capacity (compute or memory) of any device, as
  its owner reports it (``GET /v1/devices`` on each live agent, every ``--poll`` s);
  ``max_concurrent_runs`` (from markers) against ``slots`` (whole mesh's capacity in jobs);
- ``kills`` and ``wall_s``.

Targets (issue 11): ``lost_that_ran`` 0, ``missing`` 0, ``jobs_ran_concurrently`` and
``jobs_completed_twice`` 0, ``max_lease_ratio`` <= 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from flexmesh.agent.cliclient import UnixConnection, get_json
from flexmesh.agent.localmesh import LocalMesh

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")
TICK = 0.5  # seconds between a job's marker lines


def _progress(msg: str) -> None:
    print(f"[bench_chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def job_script(markers: Path, seconds: float) -> str:
    """The job: marker lines for what really runs (one shell = one run)."""
    m = str(markers)
    line = f'echo "$FLEXMESH_JOB_ID $$ %s $(date +%%s.%%N)" >> {m}'
    ticks = max(1, round(seconds / TICK))
    return (f"{line % 'start'}; i=0; while [ $i -lt {ticks} ]; do sleep {TICK}; "
            f"{line % 'tick'}; i=$((i+1)); done; {line % 'end'}; echo done")


def post_json(sock: str, path: str, body: dict[str, Any], timeout: float = 30.0) -> Any:
    conn = UnixConnection(sock, timeout)
    try:
        conn.request("POST", path, body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status not in (200, 201, 202):
            raise RuntimeError(f"POST {path}: {resp.status} {data[:200]!r}")
        return json.loads(data)
    finally:
        conn.close()


def read_markers(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """job -> run (shell pid) -> {"start", "last", "end"} wall times."""
    runs: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    if not path.exists():
        return runs
    for raw in path.read_text(errors="replace").splitlines():
        parts = raw.split()
        if len(parts) != 4:
            continue
        job, pid, what, t = parts[0], parts[1], parts[2], float(parts[3])
        r = runs[job].setdefault(pid, {"start": t, "last": t})
        r["start"], r["last"] = min(r["start"], t), max(r["last"], t)
        if what == "end":
            r["end"] = t
    return runs


def overlapping(spans: list[tuple[float, float]]) -> bool:
    spans = sorted(spans)
    return any(b[0] < a[1] for a, b in itertools.pairwise(spans))


def max_concurrent(runs: dict[str, dict[str, dict[str, float]]]) -> int:
    edges = sorted((t, d) for job in runs.values() for r in job.values()
                   for t, d in ((r["start"], 1), (r["last"], -1)))
    best = cur = 0
    for _, d in edges:
        cur += d
        best = max(best, cur)
    return best


class Bench:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.mesh = LocalMesh(root, profile=args.profile)
        self.gpu_nodes = [f"g{i}" for i in range(args.agents)]
        self.names = [*self.gpu_nodes, "sub"]
        self.config = root / "agent.toml"
        self.config.write_text('ui = ""\n')
        # Jobs run as borrowed_user (nobody): the markers must be reachable and writable.
        os.chmod(root, 0o755)
        self.markers = root / "markers" / "runs"
        self.markers.parent.mkdir(mode=0o777)
        os.chmod(self.markers.parent, 0o1777)
        self.jobs: list[str] = []
        self.down: dict[str, float] = {}  # agent -> when it is started again
        self.kills = 0
        self.slots_total = 0
        self.max_ratio = 0.0
        self.worst: dict[str, Any] = {}

    def start(self) -> None:
        extra = ["--config", str(self.config)]
        first = self.gpu_nodes[0]
        self.mesh.start(first, sim=self.args.sim, extra=extra)
        for n in self.gpu_nodes[1:]:
            self.mesh.start(n, sim=self.args.sim, join=[first], extra=extra, wait=False)
        self.mesh.start("sub", join=[first], extra=[*extra, "--priority", "10"], wait=False)
        for n in self.names[1:]:
            self.mesh.wait_ready(n, timeout=120)
        # Every agent joins through every other from now on: a restarted one finds the mesh
        # whichever agents are down.
        for n in self.gpu_nodes:
            a = self.mesh.agents[n]
            seeds = [self.mesh.agents[o].addr for o in self.names if o != n]
            if "--join" in a.args:
                a.args = a.args[:a.args.index("--join")] + a.args[a.args.index("--join") + 2:]
            a.args += ["--join", *seeds]
        self.mesh.wait_for("convergence", lambda: self.mesh.converged(self.names),
                           timeout=120, interval=0.5)
        self.slots_total = self.slots()

    def submit_all(self) -> None:
        cmd = ["sh", "-c", job_script(self.markers, self.args.job_seconds)]
        sock = self.mesh.agents["sub"].socket
        for _ in range(self.args.jobs):
            body = {"command": cmd, "compute_milli": 500, "memory_mib": 1024, "kind": "gpu"}
            self.jobs.append(post_json(sock, "/v1/jobs", body)["id"])

    def states(self) -> dict[str, dict[str, Any]]:
        rows = get_json(self.mesh.agents["sub"].socket, "/v1/jobs", timeout=30) or []
        return {r["id"]: r for r in rows if isinstance(r, dict) and "id" in r}

    def sample(self) -> None:
        """The highest leased/capacity any live owner reports for its own devices."""
        for n in self.gpu_nodes:
            if n in self.down:
                continue
            for d in get_json(self.mesh.agents[n].socket, "/v1/devices") or []:
                if d.get("node") != n:
                    continue
                for used, cap in (("leased_compute_milli", "compute_milli"),
                                  ("leased_memory_mib", "memory_mib")):
                    if d.get(cap):
                        ratio = d[used] / d[cap]
                        if ratio > self.max_ratio:
                            self.max_ratio = ratio
                            self.worst = {"node": n, "device": d.get("id"), used: d[used]}

    def restarts(self, now: float) -> None:
        for n, when in list(self.down.items()):
            if now >= when:
                del self.down[n]
                try:
                    self.mesh.restart(n)
                except Exception as exc:  # (said, and tried again later)
                    _progress(f"restart of {n} failed: {exc}")
                    self.down[n] = now + 1.0

    def kill_one(self, now: float) -> None:
        up = [n for n in self.gpu_nodes if n not in self.down]
        if up and len(self.down) < self.args.max_down:
            victim = self.rng.choice(up)
            self.mesh.kill(victim, signal.SIGKILL)
            self.kills += 1
            self.down[victim] = now + self.args.down
            _progress(f"killed {victim} (kill {self.kills})")

    def run(self) -> None:
        start = time.monotonic()
        next_kill = start + self.args.kill_every
        deadline = start + self.args.chaos_for + self.args.drain
        while time.monotonic() < deadline:
            now = time.monotonic()
            rows = self.states()
            done = sum(1 for j in self.jobs if rows.get(j, {}).get("state") in TERMINAL)
            chaos = now - start < self.args.chaos_for and done < len(self.jobs)
            if not chaos:  # the chaos is over: every agent back at once
                self.down = {n: min(t, now) for n, t in self.down.items()}
            self.restarts(now)
            if done == len(self.jobs) and not self.down:
                return
            if chaos and now >= next_kill:
                next_kill = now + self.args.kill_every
                self.kill_one(now)
            self.sample()
            time.sleep(self.args.poll)

    def slots(self) -> int:
        """Jobs of half a device the whole mesh can hold at once."""
        rows = get_json(self.mesh.agents["sub"].socket, "/v1/devices") or []
        return sum(d["compute_milli"] // 500 for d in rows if d.get("node") in self.gpu_nodes)

    def result(self, wall: float) -> dict[str, Any]:
        rows = self.states()
        runs = read_markers(self.markers)
        states = Counter(rows.get(j, {}).get("state", "unknown") for j in self.jobs)
        ended = [r for j in self.jobs for r in runs.get(j, {}).values() if "end" in r]
        completed = {j for j in self.jobs if any("end" in r for r in runs.get(j, {}).values())}
        lost_ran = [j for j in self.jobs if rows.get(j, {}).get("state") == "lost"
                    and j in completed]
        a = self.args
        return {
            "bench": "chaos", "agents": a.agents, "jobs": a.jobs, "profile": a.profile,
            "seed": a.seed, "kill_every_s": a.kill_every, "down_s": a.down,
            "job_seconds": a.job_seconds, "kills": self.kills,
            **{s: states.get(s, 0) for s in TERMINAL},
            "missing": sum(n for s, n in states.items() if s not in TERMINAL),
            "runs": sum(len(r) for r in runs.values()), "runs_completed": len(ended),
            "jobs_run_more_than_once": sum(1 for j in self.jobs if len(runs.get(j, {})) > 1),
            "jobs_completed_twice": sum(
                1 for j in self.jobs if sum("end" in r for r in runs.get(j, {}).values()) > 1),
            "jobs_ran_concurrently": sorted(
                j for j in self.jobs
                if overlapping([(r["start"], r["last"]) for r in runs.get(j, {}).values()])),
            "lost_that_ran": len(lost_ran), "lost_that_ran_ids": sorted(lost_ran),
            "lost_reasons": dict(Counter(rows[j].get("reason", "") for j in self.jobs
                                         if rows.get(j, {}).get("state") == "lost")),
            "succeeded_not_run": sum(1 for j in self.jobs if j not in completed
                                     and rows.get(j, {}).get("state") == "succeeded"),
            "max_lease_ratio": round(self.max_ratio, 3), "max_lease_at": self.worst,
            "max_concurrent_runs": max_concurrent(runs), "slots": self.slots_total,
            "wall_s": round(wall, 1),
        }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=5, help="agents with a GPU (plus sub)")
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--kill-every", type=float, default=4.0, help="seconds between kills")
    p.add_argument("--down", type=float, default=2.0, help="seconds a killed agent stays down")
    p.add_argument("--max-down", type=int, default=1, help="agents down at once at most")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", default="local", help="agents' timing profile")
    p.add_argument("--sim", default="gpu:1x16GiB", help="each GPU agent's simulated devices")
    p.add_argument("--job-seconds", type=float, default=4.0)
    p.add_argument("--chaos-for", type=float, default=600.0,
                   help="seconds of kills at most (they stop once every job has ended)")
    p.add_argument("--drain", type=float, default=180.0,
                   help="seconds to wait for the last jobs once kills stop")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between samples")
    args = p.parse_args(argv)
    if args.agents < 2 or args.jobs < 1:
        p.error("--agents must be at least 2 and --jobs at least 1")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flexmesh-bench-chaos-") as tmp:
        bench = Bench(Path(tmp), args)
        try:
            bench.start()
            _progress(f"{len(bench.names)} agents up ({args.profile}); submitting")
            bench.submit_all()
            bench.run()
            print(json.dumps(bench.result(time.monotonic() - started)), flush=True)
        finally:
            bench.mesh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
