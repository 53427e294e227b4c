"""Crash detection and false DEAD with real processes on 127.0.0.1: flexmesh agents beside
the ``kinship`` library (SWIM + Lifeguard with a Rust core), in one run on one machine.

For each system, N processes (default 32) form a mesh on loopback with the same probe
interval (both ``lan`` presets probe every 1.0 s with a 0.5 s timeout, suspicion
multiplier 4, maximum 6 x the minimum; ``--probe-interval`` sets both), then:

1. *clean*: no injected loss; ``--crashes`` times a random member (never the seed) is
   killed with SIGKILL (after ``--pause`` s of quiet) and restarted once every survivor
   has declared it dead. Per observer,
   detection is the time from the kill to the DEAD event in that observer's own log (both
   systems log it with a wall-clock timestamp on this machine). For flexmesh the same is
   also read by polling every agent's ``GET /v1/nodes`` (what ``flexmesh nodes -o json``
   prints) over its Unix socket, as a cross-check of the log (``*_polled``).
2. *lossy*: a fresh mesh whose every process drops ``--loss`` of its own outgoing UDP
   datagrams (flexmesh: ``[testing] fault_drop``; kinship has no such setting, so a small
   LD_PRELOAD shim built here with the C compiler drops the same share of the process's
   UDP ``sendto``/``send`` calls). For ``--false-dead-seconds`` nothing is killed: every
   DEAD event is false. Then ``--loss-crashes`` crashes under the same loss.

One JSON line per system and phase on stdout, then a ``kinship-ratio`` line; progress on
stderr. kinship runs from a separate interpreter (``--kinship-python``; the wrapper makes
``.venv-bench`` for it): it is never a dependency of flexmesh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --- the kinship node (runs under the kinship interpreter; no flexmesh import) ------------


def kinship_node(args: argparse.Namespace) -> int:
    import asyncio

    import kinship  # type: ignore[import-not-found]

    def emit(event: str, **fields: Any) -> None:
        print(json.dumps({"ts": round(time.time(), 4), "event": event, **fields}), flush=True)

    async def run() -> None:
        preset = getattr(kinship.Config, args.preset)
        overrides: dict[str, Any] = {}
        if args.probe_interval:
            overrides["probe_interval"] = args.probe_interval
        if args.probe_timeout:
            overrides["probe_timeout"] = args.probe_timeout
        cfg = preset(name=args.name, bind=args.bind, seeds=args.seeds or [],
                     insecure_plaintext=True, **overrides)
        async with kinship.Cluster(cfg) as cluster:
            events = cluster.events()
            emit("ready", addr=cluster.local.addr, alive=len(cluster.members()),
                 probe_interval=cfg.probe_interval, probe_timeout=cfg.probe_timeout,
                 suspicion_mult=cfg.suspicion_mult, suspicion_max_mult=cfg.suspicion_max_mult)
            async for ev in events:
                member = getattr(ev, "member", None)
                emit(type(ev).__name__, name=member.name if member is not None else None,
                     alive=sum(1 for m in cluster.members()
                               if m.state.name == "ALIVE"))

    asyncio.run(run())
    return 0


# --- shared -----------------------------------------------------------------------------

DROP_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* Drops a share (BENCH_UDP_DROP) of this process's outgoing UDP datagrams, as flexmesh's
   [testing] fault_drop does for its own: a benchmark-only stand-in for netem. */
static double share = -1.0;
static uint64_t state;

static int drop_now(int fd) {
    if (share < 0) {
        const char *s = getenv("BENCH_UDP_DROP");
        share = s ? atof(s) : 0.0;
        state = ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid() ^ 0x9E3779B97F4A7C15ULL;
    }
    if (share <= 0) return 0;
    int type = 0;
    socklen_t len = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_DGRAM) return 0;
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return (double)(state >> 11) / 9007199254740992.0 < share;
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr,
               socklen_t alen) {
    static ssize_t (*real)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    if (!real) real = dlsym(RTLD_NEXT, "sendto");
    if (drop_now(fd)) return (ssize_t)n;
    return real(fd, buf, n, flags, addr, alen);
}

ssize_t send(int fd, const void *buf, size_t n, int flags) {
    static ssize_t (*real)(int, const void *, size_t, int);
    if (!real) real = dlsym(RTLD_NEXT, "send");
    if (drop_now(fd)) return (ssize_t)n;
    return real(fd, buf, n, flags);
}
"""


def _progress(msg: str) -> None:
    print(f"[bench_kinship {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def _p99(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(0.99 * len(s)))], 3)


def build_shim(where: Path) -> Path | None:
    src = where / "udpdrop.c"
    lib = where / "udpdrop.so"
    src.write_text(DROP_SHIM)
    cc = os.environ.get("CC", "cc")
    try:
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        _progress(f"cannot build the UDP drop shim with {cc}: {exc}")
        return None
    return lib


def _wait(what: str, pred: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    _progress(f"timed out after {timeout:g}s waiting for {what}")
    return False


@dataclass
class Crash:
    victim: str
    killed_at: float
    observers: list[str]
    logged: dict[str, float] = field(default_factory=dict)  # observer -> seconds
    polled: dict[str, float] = field(default_factory=dict)


def _summary(system: str, phase: str, n: int, crashes: list[Crash], extra: dict[str, Any]
             ) -> dict[str, Any]:
    per_obs = [t for c in crashes for t in c.logged.values()]
    polled = [t for c in crashes for t in c.polled.values()]
    everywhere = [max(c.logged.values()) for c in crashes
                  if c.logged and len(c.logged) == len(c.observers)]
    return {
        "bench": "real-crash", "system": system, "phase": phase, "nodes": n,
        "crashes": len(crashes),
        "detect_s_median": _median(per_obs),
        "detect_s_p99": _p99(per_obs),
        "detect_s_min": round(min(per_obs), 3) if per_obs else None,
        "everywhere_s_median": _median(everywhere),
        "everywhere_s_max": round(max(everywhere), 3) if everywhere else None,
        "crashes_not_dead_everywhere": sum(1 for c in crashes
                                           if len(c.logged) < len(c.observers)),
        "observations": len(per_obs),
        "detect_s_median_polled": _median(polled) if polled else None,
        "detect_s_p99_polled": _p99(polled) if polled else None,
        **extra,
    }


# --- flexmesh agents ----------------------------------------------------------------------


def _nodes(sock: str) -> list[dict[str, Any]] | None:
    """``GET /v1/nodes``, the rows ``flexmesh nodes -o json`` prints; None if unreachable."""
    from flexmesh.agent.cli import get_json  # not at the top: kinship nodes lack flexmesh

    rows = get_json(sock, "/v1/nodes")
    return rows if isinstance(rows, list) else None


class FlexmeshSystem:
    name = "flexmesh"

    def __init__(self, root: Path, args: argparse.Namespace, loss: float) -> None:
        from flexmesh.agent.localmesh import LocalMesh

        self.args = args
        self.root = root
        self.loss = loss
        self.mesh = LocalMesh(root, profile=args.profile, plaintext=args.insecure_plaintext)
        self.names = [f"a{i:02d}" for i in range(args.nodes)]
        self.offsets: dict[str, int] = {}

    def _config(self) -> Path:
        path = self.root / "agent.toml"
        lines = ['ui = ""', '[log]', 'format = "json"']  # no web page: less to run
        if self.loss:
            lines += ["[testing]", f"fault_drop = {self.loss}"]
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> None:
        cfg = self._config()
        extra = ["--config", str(cfg)]
        if self.args.probe_interval:
            _progress("flexmesh: --probe-interval is not settable on an agent; the "
                      f"{self.args.profile} preset's interval is used")
        first, rest = self.names[0], self.names[1:]
        self.mesh.start(first, extra=extra)
        for n in rest:
            self.mesh.start(n, join=[first], extra=extra, wait=False)
        for n in rest:
            self.mesh.wait_ready(n, timeout=120)

    def converged(self) -> bool:
        want = set(self.names)
        for n in self.names:
            rows = _nodes(self.mesh.agents[n].socket)
            if rows is None or {r["name"] for r in rows if r["state"] == "alive"} != want:
                return False
        return True

    def mark(self) -> None:
        """Remember where each log ends, so later reads see only what comes after."""
        self.offsets = {n: self.mesh.agents[n].log.stat().st_size for n in self.names}

    def events(self, state: str) -> list[tuple[str, str, float]]:
        """(observer, subject, ts) of member events with ``state`` since ``mark()``."""
        out = []
        for n in self.names:
            with open(self.mesh.agents[n].log, "rb") as f:
                f.seek(self.offsets.get(n, 0))
                for raw in f:
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        continue
                    msg = rec.get("msg", "") if isinstance(rec, dict) else ""
                    if not msg.startswith("member "):
                        continue
                    kv = dict(p.split("=", 1) for p in msg.split()[1:] if "=" in p)
                    if kv.get("state") == state:
                        out.append((n, kv.get("name", ""), float(rec["ts"])))
        return out

    def kill(self, victim: str) -> float:
        t = time.time()
        self.mesh.kill(victim, signal.SIGKILL)
        return t

    def poll_dead(self, crash: Crash) -> None:
        for n in crash.observers:
            if n in crash.polled:
                continue
            rows = _nodes(self.mesh.agents[n].socket) or []
            if any(r["name"] == crash.victim and r["state"] == "dead" for r in rows):
                crash.polled[n] = time.time() - crash.killed_at

    def restart(self, victim: str) -> None:
        self.mesh.restart(victim)

    def close(self) -> None:
        self.mesh.close()


# --- kinship nodes ------------------------------------------------------------------------


class KinshipSystem:
    name = "kinship"

    def __init__(self, root: Path, args: argparse.Namespace, loss: float,
                 shim: Path | None) -> None:
        self.args = args
        self.root = root
        self.loss = loss
        self.shim = shim
        self.names = [f"k{i:02d}" for i in range(args.nodes)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.addr: dict[str, str] = {}
        self.offsets: dict[str, int] = {}
        self.config: dict[str, Any] = {}

    def log(self, n: str) -> Path:
        return self.root / f"{n}.log"

    def _spawn(self, n: str, seeds: list[str], bind: str = "127.0.0.1:0") -> None:
        cmd = [self.args.kinship_python, str(Path(__file__).resolve()), "--kinship-node",
               "--name", n, "--preset", self.args.kinship_preset, "--bind", bind]
        if self.args.probe_interval:
            cmd += ["--probe-interval", str(self.args.probe_interval)]
        if seeds:
            cmd += ["--seeds", *seeds]
        env = dict(os.environ)
        if self.loss:
            if self.shim is None:
                raise RuntimeError("no UDP drop shim: cannot inject loss into kinship")
            env["LD_PRELOAD"] = str(self.shim)
            env["BENCH_UDP_DROP"] = str(self.loss)
        logf = open(self.log(n), "ab")  # noqa: SIM115 - handed to the child
        try:
            self.procs[n] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                             env=env, start_new_session=True)
        finally:
            logf.close()

    def _ready(self, n: str, after: int = 0) -> bool:
        p = self.procs[n]
        if p.poll() is not None:
            raise RuntimeError(f"kinship node {n} exited with {p.returncode}:\n"
                               + self.log(n).read_text(errors="replace")[-2000:])
        for rec in self._records(n, after):
            if rec.get("event") == "ready":
                self.addr[n] = rec["addr"]
                self.config = {k: rec.get(k) for k in ("probe_interval", "probe_timeout",
                                                       "suspicion_mult", "suspicion_max_mult")}
                return True
        return False

    def _records(self, n: str, offset: int) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(FileNotFoundError), open(self.log(n), "rb") as f:
            f.seek(offset)
            for raw in f:
                with contextlib.suppress(ValueError):
                    rec = json.loads(raw)
                    if isinstance(rec, dict):
                        out.append(rec)
        return out

    def start(self) -> None:
        first, rest = self.names[0], self.names[1:]
        self._spawn(first, [])
        if not _wait("the first kinship node", lambda: self._ready(first), 60, 0.05):
            raise RuntimeError("the first kinship node did not start")
        for n in rest:
            self._spawn(n, [self.addr[first]])
        for n in rest:
            if not _wait(f"kinship node {n}", lambda n=n: self._ready(n), 60, 0.05):
                raise RuntimeError(f"kinship node {n} did not start")

    def _alive_count(self, n: str) -> int:
        last = None
        for rec in self._records(n, 0):
            if "alive" in rec:
                last = rec["alive"]
        return last or 0

    def converged(self) -> bool:
        return all(self._alive_count(n) == len(self.names) for n in self.names)

    def mark(self) -> None:
        self.offsets = {n: self.log(n).stat().st_size for n in self.names}

    def events(self, state: str) -> list[tuple[str, str, float]]:
        kind = {"dead": "MemberDead", "suspect": "MemberSuspect"}[state]
        return [(n, rec.get("name") or "", float(rec["ts"]))
                for n in self.names for rec in self._records(n, self.offsets.get(n, 0))
                if rec.get("event") == kind]

    def kill(self, victim: str) -> float:
        t = time.time()
        p = self.procs[victim]
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        return t

    def poll_dead(self, crash: Crash) -> None:
        """kinship has no query to poll from outside the process: its events are the log."""

    def restart(self, victim: str) -> None:
        # On its old address: kinship keeps a dead member's name bound to its address for
        # dead_reclaim (30 s), and ignores the name from another address meanwhile.
        after = self.log(victim).stat().st_size
        self._spawn(victim, [self.addr[self.names[0]]], bind=self.addr[victim])
        try:
            ok = _wait(f"kinship node {victim} to restart", lambda: self._ready(victim, after),
                       20, 0.05)
        except RuntimeError as exc:  # the old port was taken
            _progress(f"restarting {victim} on its old address failed: {exc}")
            ok = False
        if not ok:
            after = self.log(victim).stat().st_size
            self._spawn(victim, [self.addr[self.names[0]]])
            _wait(f"kinship node {victim} to restart", lambda: self._ready(victim, after), 60,
                  0.05)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- the runs -----------------------------------------------------------------------------


def crashes(system: Any, count: int, rng: random.Random, timeout: float,
            pause: float) -> list[Crash]:
    out = []
    for i in range(count):
        time.sleep(pause)  # a quiet mesh: no rejoin still being gossiped
        victim = rng.choice(system.names[1:])  # never the seed everyone joined through
        observers = [n for n in system.names if n != victim]
        system.mark()
        crash = Crash(victim, system.kill(victim), observers)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            system.poll_dead(crash)
            for obs, subject, ts in system.events("dead"):
                if subject == victim and obs not in crash.logged:
                    crash.logged[obs] = max(0.0, ts - crash.killed_at)
            polled_done = system.name != "flexmesh" or len(crash.polled) == len(observers)
            if len(crash.logged) == len(observers) and polled_done:
                break
            time.sleep(0.1)
        _progress(f"{system.name}: crash {i + 1}/{count} of {victim}: dead at "
                  f"{len(crash.logged)}/{len(observers)} observers, median "
                  f"{_median(list(crash.logged.values()))}s")
        out.append(crash)
        system.restart(victim)
        _wait(f"{system.name} to converge after restarting {victim}", system.converged,
              120, 0.5)
    return out


def run_system(system: Any, args: argparse.Namespace, phase: str,
               rng: random.Random) -> list[dict[str, Any]]:
    lines = []
    t0 = time.monotonic()
    try:
        system.start()
        ok = _wait(f"{system.name} ({phase}) to converge", system.converged, 180, 0.5)
        _progress(f"{system.name} ({phase}): {len(system.names)} processes up, converged="
                  f"{ok} after {time.monotonic() - t0:.1f}s")
        extra: dict[str, Any] = {"loss": system.loss, "converged": ok}
        if isinstance(system, KinshipSystem):
            extra["kinship_config"] = system.config
            extra["kinship_preset"] = args.kinship_preset
        else:
            extra["profile"] = args.profile
        if phase == "lossy" and args.false_dead_seconds > 0:
            system.mark()
            start = time.time()
            time.sleep(args.false_dead_seconds)
            secs = time.time() - start
            dead = system.events("dead")
            suspect = system.events("suspect")
            node_hours = len(system.names) * secs / 3600
            line = {
                "bench": "real-false-dead", "system": system.name, "nodes": len(system.names),
                "seconds": round(secs, 1), "node_hours": round(node_hours, 3),
                "false_dead_events": len(dead),
                "false_dead_per_node_hour": round(len(dead) / node_hours, 3),
                "false_dead_subjects": sorted({s for _, s, _ in dead}),
                "false_suspect_events": len(suspect), **extra,
            }
            print(json.dumps(line), flush=True)
            lines.append(line)
        count = args.crashes if phase == "clean" else args.loss_crashes
        if count:
            got = crashes(system, count, rng, args.crash_timeout, args.pause)
            line = _summary(system.name, phase, len(system.names), got, extra)
            print(json.dumps(line), flush=True)
            lines.append(line)
    finally:
        system.close()
    return lines


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_kinship", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinship-node", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--seeds", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--bind", default="127.0.0.1:0", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="lan", help=argparse.SUPPRESS)
    p.add_argument("--probe-timeout", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--nodes", type=int, default=32)
    p.add_argument("--crashes", type=int, default=5, help="crashes without loss")
    p.add_argument("--loss", type=float, default=0.1,
                   help="share of its own UDP datagrams each process drops in the lossy phase")
    p.add_argument("--false-dead-seconds", type=float, default=180.0,
                   help="seconds the lossy mesh runs with nothing killed (0: skip)")
    p.add_argument("--loss-crashes", type=int, default=3, help="crashes under loss")
    p.add_argument("--crash-timeout", type=float, default=120.0)
    p.add_argument("--pause", type=float, default=5.0,
                   help="seconds of quiet before each kill (after the last restart)")
    p.add_argument("--profile", default="lan", help="flexmesh agents' profile (default lan)")
    p.add_argument("--insecure-plaintext", action="store_true",
                   help="agents without a key (as before issue 11; default: sealed)")
    p.add_argument("--kinship-preset", default="lan", choices=["lan", "local", "wan"])
    p.add_argument("--probe-interval", type=float, default=0.0,
                   help="kinship's probe interval (default: its preset's; lan = 1.0 s, as "
                        "flexmesh's lan)")
    p.add_argument("--kinship-python", default="",
                   help="interpreter that has kinship installed (empty: skip kinship)")
    p.add_argument("--systems", default="flexmesh,kinship")
    p.add_argument("--phases", default="clean,lossy")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.kinship_node:
        return kinship_node(args)

    systems = [s for s in args.systems.split(",") if s]
    phases = [x for x in args.phases.split(",") if x]
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flexmesh-bench-kinship-") as tmp:
        root = Path(tmp)
        shim = build_shim(root) if "lossy" in phases and "kinship" in systems else None
        kin_ok = bool(args.kinship_python)
        if "kinship" in systems and kin_ok:
            probe = subprocess.run([args.kinship_python, "-c",
                                    "import kinship; print(kinship.__version__)"],
                                   capture_output=True, text=True)
            kin_ok = probe.returncode == 0
            version = probe.stdout.strip() if kin_ok else probe.stderr.strip()[-300:]
            print(json.dumps({"bench": "kinship-env", "python": args.kinship_python,
                              "ok": kin_ok, "kinship": version}), flush=True)
        elif "kinship" in systems:
            print(json.dumps({"bench": "kinship-env", "ok": False,
                              "error": "no --kinship-python given"}), flush=True)
        for phase in phases:
            loss = args.loss if phase == "lossy" else 0.0
            for name in systems:
                rng = random.Random(args.seed)
                d = root / f"{name}-{phase}"
                d.mkdir()
                system: Any
                if name == "flexmesh":
                    system = FlexmeshSystem(d, args, loss)
                elif name == "kinship" and kin_ok:
                    if loss and shim is None:
                        print(json.dumps({"bench": "real-false-dead", "system": "kinship",
                                          "error": "no C compiler for the UDP drop shim"}))
                        continue
                    system = KinshipSystem(d, args, loss, shim)
                else:
                    continue
                _progress(f"{name} ({phase}, loss {loss:g}): starting {args.nodes} processes")
                results += run_system(system, args, phase, rng)
    by = {(r["system"], r.get("phase"), r["bench"]): r for r in results}
    ratio: dict[str, Any] = {"bench": "kinship-ratio", "nodes": args.nodes}
    for phase in phases:
        f = by.get(("flexmesh", phase, "real-crash"))
        k = by.get(("kinship", phase, "real-crash"))
        if f and k and f["detect_s_median"] and k["detect_s_median"]:
            ratio[f"{phase}_detect_median_flexmesh_s"] = f["detect_s_median"]
            ratio[f"{phase}_detect_median_kinship_s"] = k["detect_s_median"]
            ratio[f"{phase}_flexmesh_over_kinship"] = round(
                f["detect_s_median"] / k["detect_s_median"], 3)
    ratio["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(ratio), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
