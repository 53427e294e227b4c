"""Membership in the deterministic simulator: dissemination, crash detection, false DEAD.

Every node is the production ``flexmesh.agent.node.Node`` (membership, facts, election,
scheduler) driven by ``flexmesh.agent.simulator.Simulator`` in virtual time, so the figures
are in simulated seconds and do not depend on this machine's speed. One JSON line per
result on stdout, progress on stderr.

What is measured
----------------
- ``membership-dissemination``: a node's facts change (its lendable share of a GPU moves,
  the most common update in a running mesh), or a new node joins; the time until each
  other live node has it, read from the ``FactsEvent`` / ``MemberEvent`` each node emits,
  so the times are exact, not polled. ``t9999_s`` is the time at which
  ``ceil(0.9999 * M)`` of the M other live nodes have it (at N <= 10,000 that is all of them).
- ``membership-crash``: a node crashes (and, below ``--restart-below`` nodes, is
  restarted once all have declared it dead, so that every crash is at the same N); per
  observer, the time until it declares the node
  dead (median, p99 over every observer of every crash), and per crash the time until the
  last live node has (the "everywhere" figures).
- ``membership-false-dead``: a healthy mesh under packet loss, optionally with one node
  whose loop freezes for 2 s every minute; every DEAD event a node emits about a node that
  is up is a false declaration. Rates are per node-hour of simulated time.
- Bytes: ``bytes_per_s_per_node`` counts every UDP datagram a node sends (the simulator's
  own counter, lost ones included); ``tcp_bytes_per_s_per_node_est`` adds the push-pull
  exchanges, estimated from the encoded size of the request, twice (the reply is the same
  size in a converged mesh).

How the mesh starts
-------------------
A 1,000-node join one node at a time is an O(N^2) broadcast storm that takes pure Python
tens of minutes, and is not what is being measured. So is the first election: every
node's facts carry the highest term it has seen (``mt``), so the first claim makes all N
nodes publish new facts, each of which every node receives and answers with an O(N)
election pass. So the mesh starts *converged*: every node merges push-pulls holding every
node's row (what completed anti-entropy rounds give), after the first coordinator's
claim, its queue of news about others is emptied, and the mesh runs ``--settle`` seconds
before anything is measured (each node's own Alive and facts still travel by gossip).
Invariant checks (``Simulator.check``) are off here: they are O(N) per event; the test
suite runs them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing import Pool
from typing import Any

from flexmesh.agent.devices.base import Device
from flexmesh.agent.simulator import LinkFaults, Simulator
from flexmesh.protocol import wire
from flexmesh.protocol.membership import (
    ALIVE,
    DEAD,
    PRESETS,
    SUSPECT,
    FactsEvent,
    MemberEvent,
    StartPushPull,
)
from flexmesh.protocol.suspicion import suspicion_min_timeout

Listener = Callable[[str, Any], None]


class BenchSim(Simulator):
    """The simulator, with listeners on the member and facts events each node emits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listeners: list[Listener] = []
        self.tcp_bytes = 0

    def _effect(self, name: str, eff: Any) -> None:
        if isinstance(eff, (MemberEvent, FactsEvent)):
            for fn in self.listeners:
                fn(name, eff)
        elif isinstance(eff, StartPushPull):
            dst = self.by_addr.get(eff.addr)
            if dst is not None and self.reachable(name, dst):
                request = self.nodes[name].node.pushpull_request(eff.join)
                self.tcp_bytes += 2 * len(wire.encode_frame(request))
        super()._effect(name, eff)


def _name(i: int) -> str:
    return f"n{i:04d}"


def _devices(gpus: int) -> list[Device]:
    return [Device(f"gpu{j}", "gpu", "sim-gpu", 16384, "sim") for j in range(gpus)]


def _merge_all(sim: BenchSim, names: list[str], rows: list[Any]) -> None:
    msg = wire.PushPull(False, "bench", rows)
    for name in names:
        sim.nodes[name].node.handle_request(msg, sim.now)


def _rows(sim: BenchSim) -> list[Any]:
    return [s.node.membership.local_state()[0] for s in sim.nodes.values()]


def build(n: int, preset: str, loss: float, seed: int, gpus: int, settle: float) -> BenchSim:
    """A converged mesh of ``n`` nodes (see the module's docstring)."""
    sim = BenchSim(seed, LinkFaults(loss=loss), PRESETS[preset])
    for i in range(n):
        sim.add_node(_name(i), _devices(gpus))
    names = list(sim.nodes)
    # The first node learns everyone and claims the first term; everyone else then learns
    # everyone *and* that claim, and republishes its facts with the term it has seen; a last
    # round hands every node those final facts. Without the rounds, the claim and N fact
    # updates would all travel by gossip, an O(N^2) storm (see the module's docstring).
    _merge_all(sim, names[:1], _rows(sim))
    _merge_all(sim, names[1:], _rows(sim))
    _merge_all(sim, names, _rows(sim))
    for name in names:
        # News about the others came in the push-pulls: everyone has it already. Each
        # node's own Alive and facts stay queued and are gossiped as usual.
        queue = sim.nodes[name].node.membership._queue
        for other in names:
            if other != name:
                queue.drop(("m", other))
                queue.drop(("f", other))
        sim._pump(name)
    sim.run_for(settle, check=False)
    return sim


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))], 3)


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def _progress(msg: str) -> None:
    print(f"[bench_membership {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _wait(sim: BenchSim, reached: dict[str, float], targets: set[str], timeout: float,
          step: float = 0.25) -> None:
    start = sim.now
    while sim.now - start < timeout and not targets <= set(reached):
        sim.run_for(step, check=False)


def _spread(times: list[float], m: int) -> dict[str, float | None]:
    """Times at which 50%, 99%, 99.99% and all of ``m`` targets had the update."""
    s = sorted(times)

    def at(q: float) -> float | None:
        k = math.ceil(q * m)
        return round(s[k - 1], 3) if 0 < k <= len(s) else None

    return {"t50_s": at(0.5), "t99_s": at(0.99), "t9999_s": at(0.9999), "t100_s": at(1.0)}


def disseminate_facts(sim: BenchSim, origin: str, timeout: float) -> dict[str, Any]:
    s = sim.nodes[origin]
    node = s.node
    # The owner's lendable share of its devices moves (a local process took half a GPU):
    # new facts, one version up.
    # (Flip from whatever it lends now: facts that do not change are not gossiped.)
    half = not s.devices or node.leases.lendable(s.devices[0].id)[0] == \
        s.devices[0].compute_milli
    node.set_devices(s.devices, {d.id: (500, d.memory_mib // 2) for d in s.devices}
                     if half else {}, sim.now)
    version = node.membership.me.facts_version
    start = sim.now
    reached: dict[str, float] = {}

    def on(observer: str, eff: Any) -> None:
        if (isinstance(eff, FactsEvent) and eff.name == origin and observer not in reached
                and observer != origin):
            m = sim.nodes[observer].node.membership.members.get(origin)
            if m is not None and m.facts_version >= version:
                reached[observer] = sim.now - start

    sim.listeners.append(on)
    sim._pump(origin)
    targets = {n for n in sim.up_nodes() if n != origin}
    try:
        _wait(sim, reached, targets, timeout)
    finally:
        sim.listeners.remove(on)
    return {"times": [reached[t] for t in targets if t in reached], "targets": len(targets)}


def disseminate_join(sim: BenchSim, new: str, seed_node: str, gpus: int,
                     timeout: float) -> dict[str, Any]:
    start = sim.now
    reached: dict[str, float] = {}

    def on(observer: str, eff: Any) -> None:
        if (isinstance(eff, MemberEvent) and eff.name == new and eff.state == ALIVE
                and observer not in reached and observer != new):
            reached[observer] = sim.now - start

    sim.listeners.append(on)
    targets = set(sim.up_nodes())
    sim.add_node(new, _devices(gpus), join=[seed_node])
    try:
        _wait(sim, reached, targets, timeout)
    finally:
        sim.listeners.remove(on)
    return {"times": [reached[t] for t in targets if t in reached], "targets": len(targets)}


def crash_once(sim: BenchSim, victim: str, timeout: float) -> dict[str, Any]:
    start = sim.now
    reached: dict[str, float] = {}

    def on(observer: str, eff: Any) -> None:
        if (isinstance(eff, MemberEvent) and eff.name == victim and eff.state == DEAD
                and observer not in reached):
            reached[observer] = sim.now - start

    sim.listeners.append(on)
    sim.crash(victim)
    targets = set(sim.up_nodes())
    try:
        _wait(sim, reached, targets, timeout, step=0.5)
    finally:
        sim.listeners.remove(on)
    return {"times": [reached[t] for t in targets if t in reached], "targets": len(targets)}


def _coordinators(sim: BenchSim) -> set[str]:
    return {c for s in sim.nodes.values() if s.up
            for c in [s.node.belief.coordinator] if c is not None}


def _traffic(sim: BenchSim, fn: Callable[[], None]) -> dict[str, float]:
    """Run ``fn`` and return the traffic per node per simulated second it caused."""
    b0, p0, t0, s0 = sim.stats["bytes"], sim.stats["packets"], sim.tcp_bytes, sim.now
    fn()
    secs = max(sim.now - s0, 1e-9)
    n = len(sim.up_nodes())
    return {
        "bytes_per_s_per_node": round((sim.stats["bytes"] - b0) / secs / n, 1),
        "packets_per_s_per_node": round((sim.stats["packets"] - p0) / secs / n, 2),
        "tcp_bytes_per_s_per_node_est": round((sim.tcp_bytes - t0) / secs / n, 1),
    }


def run_size(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Dissemination at each loss, then crashes, on one mesh of ``n`` nodes."""
    out: list[dict[str, Any]] = []
    rng = random.Random(args.seed)
    wall0 = time.perf_counter()
    _progress(f"N={n}: building a converged mesh ({args.preset})")
    sim = build(n, args.preset, 0.0, args.seed, args.gpus, args.settle)
    built = time.perf_counter() - wall0
    _progress(f"N={n}: built and settled {args.settle:g}s in {built:.1f}s wall")
    base = {"preset": args.preset, "nodes": n, "seed": args.seed}
    extra = 0
    if not args.skip_dissemination:
        for loss in args.loss:
            sim.faults.loss = loss
            w0, s0 = time.perf_counter(), sim.now
            steady = _traffic(sim, lambda: sim.run_for(args.steady, check=False))
            facts: list[dict[str, Any]] = []
            joins: list[dict[str, Any]] = []
            for _ in range(args.updates):
                coord = _coordinators(sim)
                origin = rng.choice([x for x in sim.up_nodes() if x not in coord])
                facts.append(disseminate_facts(sim, origin, args.timeout))
                sim.run_for(1.0, check=False)
            for _ in range(args.joins):
                new = f"j{extra:04d}"
                extra += 1
                joins.append(disseminate_join(sim, new, rng.choice(sim.up_nodes()), args.gpus,
                                              args.timeout))
                sim.run_for(1.0, check=False)
            wall = time.perf_counter() - w0
            for kind, runs in (("facts", facts), ("join", joins)):
                if not runs:
                    continue
                spreads = [_spread(r["times"], r["targets"]) for r in runs]
                t9999 = [x["t9999_s"] for x in spreads]
                complete = [t for t in t9999 if t is not None]
                line = {
                    "bench": "membership-dissemination", **base, "loss": loss, "update": kind,
                    "updates": len(runs),
                    "t9999_s_median": _median(complete) if len(complete) == len(runs)
                    else None,
                    "t9999_s_max": max(complete) if len(complete) == len(runs) else None,
                    "t50_s_median": _median([x["t50_s"] for x in spreads
                                             if x["t50_s"] is not None]),
                    "t99_s_median": _median([x["t99_s"] for x in spreads
                                             if x["t99_s"] is not None]),
                    "t100_s_max": max((x["t100_s"] for x in spreads if x["t100_s"] is not None),
                                      default=None),
                    "reached_9999_in_all_runs": len(complete) == len(runs),
                    "runs": spreads,
                    "timeout_s": args.timeout,
                    "target_3s_lan": (all(t <= 3.0 for t in complete)
                                      and len(complete) == len(runs))
                    if args.preset == "lan" and kind == "facts" else None,
                    **steady,
                    "sim_seconds": round(sim.now - s0, 1),
                    "wall_seconds": round(wall, 1),
                }
                print(json.dumps(line), flush=True)
                out.append(line)
            _progress(f"N={n} loss={loss:g}: dissemination done in {wall:.1f}s wall "
                      f"({(sim.now - s0) / wall:.2f} sim s per wall s)")
    if args.crashes:
        sim.faults.loss = args.crash_loss
        sim.run_for(args.steady, check=False)
        w0, s0 = time.perf_counter(), sim.now
        per_observer: list[float] = []
        everywhere: list[float] = []
        first: list[float] = []
        incomplete = 0
        for _ in range(args.crashes):
            coord = _coordinators(sim)
            victim = rng.choice([x for x in sim.up_nodes() if x not in coord])
            r = crash_once(sim, victim, args.crash_timeout)
            per_observer += r["times"]
            if r["times"]:
                first.append(min(r["times"]))
            if len(r["times"]) == r["targets"]:
                everywhere.append(max(r["times"]))
            else:
                incomplete += 1
            if n < args.restart_below:
                # Back with a new incarnation, so that every crash is at the same N. (A
                # rejoin at N=1,000 costs pure Python minutes: the new node re-gossips the
                # whole mesh it learns, and each arrival makes a node re-run its election.)
                sim.restart(victim,
                            join=[rng.choice([x for x in sim.up_nodes() if x != victim])])
            sim.run_for(args.gap, check=False)
        wall = time.perf_counter() - w0
        live = len(sim.up_nodes())
        min_s = suspicion_min_timeout(PRESETS[args.preset].suspicion_mult, live,
                                      PRESETS[args.preset].probe_interval)
        line = {
            "bench": "membership-crash", **base, "loss": args.crash_loss,
            "crashes": args.crashes, "restarted": n < args.restart_below,
            "detect_s_median": _median(per_observer),
            "detect_s_p99": _pct(per_observer, 0.99),
            "first_detect_s_median": _median(first),
            "everywhere_s_median": _median(everywhere),
            "everywhere_s_p99": _pct(everywhere, 0.99),
            "everywhere_s_max": max(everywhere) if everywhere else None,
            "crashes_not_dead_everywhere": incomplete,
            "observations": len(per_observer),
            "suspicion_min_s": round(min_s, 2),
            "suspicion_max_s": round(min_s * PRESETS[args.preset].suspicion_max_mult, 2),
            "probe_interval_s": PRESETS[args.preset].probe_interval,
            "sim_seconds": round(sim.now - s0, 1),
            "wall_seconds": round(wall, 1),
        }
        print(json.dumps(line), flush=True)
        out.append(line)
        _progress(f"N={n}: {args.crashes} crashes done in {wall:.1f}s wall")
    return out


def false_dead(job: tuple[int, str, float, bool, float, int, int, float]) -> dict[str, Any]:
    """A healthy mesh under loss (and a node stalled 2 s every minute): false DEAD events."""
    n, preset, loss, stall, duration, seed, gpus, settle = job
    wall0 = time.perf_counter()
    sim = build(n, preset, 0.0, seed, gpus, settle)
    sim.faults.loss = loss
    stalled = _name(1)  # not the coordinator (the lowest name wins the election)
    events = {"dead": 0, "suspect": 0}
    incidents: set[tuple[str, int]] = set()
    by_stalled = 0
    about_stalled = 0

    def on(observer: str, eff: Any) -> None:
        nonlocal by_stalled, about_stalled
        if not isinstance(eff, MemberEvent) or eff.state not in (DEAD, SUSPECT):
            return
        subject = sim.nodes.get(eff.name)
        if subject is None or not subject.up:
            return
        events["dead" if eff.state == DEAD else "suspect"] += 1
        if eff.state == DEAD:
            inc = sim.nodes[observer].node.membership.members[eff.name].incarnation
            incidents.add((eff.name, inc))
            by_stalled += observer == stalled
            about_stalled += eff.name == stalled

    def counters() -> dict[str, int]:
        out: dict[str, int] = {}
        for s in sim.nodes.values():
            for k, v in s.node.membership.counters.items():
                out[k] = out.get(k, 0) + v
        return out

    before = counters()
    sim.listeners.append(on)
    start = sim.now

    def body() -> None:
        t = 0.0
        while t < duration:
            chunk = min(60.0, duration - t)
            if stall and chunk >= 30.0:
                sim.run_for(30.0, check=False)
                sim.stall(stalled, 2.0)
                sim.run_for(chunk - 30.0, check=False)
            else:
                sim.run_for(chunk, check=False)
            t += chunk

    traffic = _traffic(sim, body)
    after = counters()
    node_hours = n * (sim.now - start) / 3600.0
    wall = time.perf_counter() - wall0
    return {
        "bench": "membership-false-dead", "preset": preset, "nodes": n, "loss": loss,
        "stalled_node": stalled if stall else None,
        "stall": "2s every 60s" if stall else None,
        "sim_seconds": round(sim.now - start, 1),
        "node_hours": round(node_hours, 2),
        "node_days": round(node_hours / 24, 3),
        "false_dead_events": events["dead"],
        "false_dead_incidents": len(incidents),
        "false_dead_per_node_hour": round(events["dead"] / node_hours, 4),
        "false_dead_incidents_per_node_hour": round(len(incidents) / node_hours, 4),
        "false_dead_by_stalled_node": by_stalled if stall else None,
        "false_dead_about_stalled_node": about_stalled if stall else None,
        "false_suspect_events": events["suspect"],
        "suspicions_started": after.get("suspicions", 0) - before.get("suspicions", 0),
        "refutations": after.get("refutations", 0) - before.get("refutations", 0),
        "seed": seed,
        **traffic,
        "wall_seconds": round(wall, 1),
        "sim_seconds_per_wall_second": round((sim.now - start) / wall, 2),
    }


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_membership", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lan", choices=sorted(PRESETS))
    p.add_argument("--nodes", type=_ints, default=[100, 1000],
                   help="mesh sizes for dissemination and crashes (default 100,1000)")
    p.add_argument("--loss", type=_floats, default=[0.0, 0.1, 0.3],
                   help="packet loss shares for dissemination (default 0,0.1,0.3)")
    p.add_argument("--updates", type=int, default=5, help="facts updates per size and loss")
    p.add_argument("--joins", type=int, default=2, help="joins per size and loss")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="simulated seconds to wait for one update to reach everyone")
    p.add_argument("--crashes", type=int, default=5, help="crashes per size (0: none)")
    p.add_argument("--crash-loss", type=float, default=0.0, help="packet loss during crashes")
    p.add_argument("--crash-timeout", type=float, default=300.0)
    p.add_argument("--restart-below", type=int, default=200,
                   help="restart each crashed node (same N for every crash) when N is below")
    p.add_argument("--gap", type=float, default=10.0,
                   help="simulated seconds between a restart and the next crash")
    p.add_argument("--settle", type=float, default=20.0,
                   help="simulated seconds a new mesh runs before measuring")
    p.add_argument("--steady", type=float, default=10.0,
                   help="simulated seconds of steady traffic measured before updates")
    p.add_argument("--skip-dissemination", action="store_true")
    p.add_argument("--fd-nodes", type=int, default=100, help="mesh size for false DEAD runs")
    p.add_argument("--fd-loss", type=_floats, default=[0.01, 0.1, 0.2],
                   help="packet loss shares for false DEAD runs (default 0.01,0.1,0.2)")
    p.add_argument("--stall-loss", type=_floats, default=[0.0, 0.1],
                   help="loss shares for runs with one node stalled 2 s every minute")
    p.add_argument("--fd-duration", type=float, default=900.0,
                   help="simulated seconds per false DEAD run (900 s x 100 nodes = 25 "
                        "node-hours, a node-day)")
    p.add_argument("--skip-false-dead", action="store_true")
    p.add_argument("--gpus", type=int, default=1, help="simulated GPUs per node")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes for the false DEAD runs (this machine has 2 cores)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    for n in args.nodes if args.crashes or not args.skip_dissemination else []:
        run_size(n, args)
    if not args.skip_false_dead:
        jobs = [(args.fd_nodes, args.preset, loss, False, args.fd_duration, args.seed,
                 args.gpus, args.settle) for loss in args.fd_loss]
        jobs += [(args.fd_nodes, args.preset, loss, True, args.fd_duration, args.seed,
                  args.gpus, args.settle) for loss in args.stall_loss]
        _progress(f"{len(jobs)} false DEAD runs of {args.fd_duration:g} simulated s at "
                  f"N={args.fd_nodes}")
        if args.jobs > 1 and len(jobs) > 1:
            with Pool(min(args.jobs, len(jobs))) as pool:
                results = pool.map(false_dead, jobs)
        else:
            results = [false_dead(j) for j in jobs]
        for line in results:
            print(json.dumps(line), flush=True)
    print(json.dumps({"bench": "membership-total", "preset": args.preset,
                      "wall_seconds": round(time.perf_counter() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
