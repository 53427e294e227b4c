"""Load and footprint of the agent, on real processes on 127.0.0.1.

    submit: N submissions from C concurrent clients on one agent's socket; every one must
            be answered (201), journaled, and end in a terminal state. Prints submit
            latency p50/p99 and the time for all jobs to finish.
    idle:   a K-node loopback mesh left alone; each agent's RSS and CPU over a window.

Each result is one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from flexmesh.agent.localmesh import LocalMesh
from flexmesh.agent.store import Journal

TERMINAL = {"succeeded", "failed", "cancelled", "preempted", "lost"}


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def submit_all(sock: str, n: int, clients: int) -> tuple[list[float], list[str]]:
    latencies: list[float] = []
    ids: list[str] = []
    todo = iter(range(n))

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in todo:
            body = {"command": ["true"], "compute_milli": 10, "memory_mib": 16}
            t0 = time.perf_counter()
            async with session.post("http://agent/v1/jobs", json=body) as resp:
                data = await resp.json()
                if resp.status != 201:
                    raise RuntimeError(f"submit answered {resp.status}: {data}")
            latencies.append(time.perf_counter() - t0)
            ids.append(data["id"])

    conn = aiohttp.UnixConnector(path=sock, limit=clients)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return latencies, ids


def bench_submit(root: Path, n: int, clients: int,
                 plaintext: bool = False) -> dict[str, object]:
    with LocalMesh(root / "submit", plaintext=plaintext) as mesh:
        mesh.start("a", sim="gpu:8x16GiB")
        sock = mesh.agents["a"].socket
        t0 = time.perf_counter()
        latencies, ids = asyncio.run(submit_all(sock, n, clients))
        submitted = time.perf_counter() - t0
        note(f"submitted {len(ids)} in {submitted:.1f}s; waiting for them to end")
        deadline = time.monotonic() + 600

        def states() -> dict[str, str]:
            return {j["id"]: j["state"] for j in mesh.json("a", "jobs")}

        seen = states()
        while any(seen.get(i) not in TERMINAL for i in ids) and time.monotonic() < deadline:
            time.sleep(0.5)
            seen = states()
        finished = time.perf_counter() - t0
        journal = Journal(mesh.agents["a"].dir / "state" / "journal.sqlite3")
        journaled = {j.id for j in journal.list_jobs()}
        journal.close()
    by_state: dict[str, int] = {}
    for i in ids:
        by_state[seen.get(i, "missing")] = by_state.get(seen.get(i, "missing"), 0) + 1
    return {
        "bench": "submit", "submissions": n, "clients": clients, "answered": len(ids),
        "journaled": len(journaled & set(ids)), "states": by_state,
        "submit_p50_ms": round(pct(latencies, 50) * 1000, 2),
        "submit_p99_ms": round(pct(latencies, 99) * 1000, 2),
        "submit_mean_ms": round(statistics.mean(latencies) * 1000, 2),
        "submit_seconds": round(submitted, 2), "all_terminal_seconds": round(finished, 2),
    }


def _proc_stats(pid: int) -> tuple[int, float]:
    """(RSS in KiB, CPU seconds) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def bench_idle(root: Path, nodes: int, window: float, settle: float,
               plaintext: bool = False) -> dict[str, object]:
    with LocalMesh(root / "idle", profile="lan", plaintext=plaintext) as mesh:
        mesh.start("n00", sim="gpu:2x16GiB")
        for i in range(1, nodes):
            mesh.start(f"n{i:02d}", sim="gpu:1x16GiB", join=["n00"], wait=False)
        for name in list(mesh.agents):
            mesh.wait_ready(name)
        names = list(mesh.agents)
        mesh.wait_for("convergence", lambda: mesh.converged(names), timeout=120)
        note(f"{nodes} agents converged; settling {settle:g}s, then measuring {window:g}s")
        time.sleep(settle)
        pids = {n: a.proc.pid for n, a in mesh.agents.items() if a.proc}
        before = {n: _proc_stats(p) for n, p in pids.items()}
        time.sleep(window)
        after = {n: _proc_stats(p) for n, p in pids.items()}
        converged = mesh.converged(names)
    rss_mib = [after[n][0] / 1024 for n in pids]
    cpu_pct = [(after[n][1] - before[n][1]) / window * 100 for n in pids]
    return {
        "bench": "idle", "nodes": nodes, "window_s": window, "still_converged": converged,
        "rss_mib_mean": round(statistics.mean(rss_mib), 1),
        "rss_mib_max": round(max(rss_mib), 1),
        "cpu_pct_of_core_mean": round(statistics.mean(cpu_pct), 3),
        "cpu_pct_of_core_max": round(max(cpu_pct), 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", choices=["submit", "idle"])
    p.add_argument("--submissions", type=int, default=1000)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--window", type=float, default=60.0)
    p.add_argument("--settle", type=float, default=10.0)
    p.add_argument("--insecure-plaintext", action="store_true",
                   help="agents without a key (as before issue 11; default: sealed)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="flexmesh-bench-") as tmp:
        if args.only in (None, "submit"):
            print(json.dumps(bench_submit(Path(tmp), args.submissions, args.clients,
                                          args.insecure_plaintext)),
                  flush=True)
        if args.only in (None, "idle"):
            print(json.dumps(bench_idle(Path(tmp), args.nodes, args.window, args.settle,
                                        args.insecure_plaintext)),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
