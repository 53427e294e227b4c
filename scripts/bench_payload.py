"""A job's working directory sent to its owner over loopback, against a plain copy.

Two real agents on 127.0.0.1 (``LocalMesh``): ``d``, the origin, with no device, and
``a``, the owner, with one simulated GPU. A workdir of ``--size-mib`` MiB of incompressible
bytes (``--files`` files, seeded) is made, and then, in this order:

1. **Baseline**: a job without a workdir, to time submit-to-start with no bundle.
2. ``--rounds`` (5) rounds, each a plain copy and then a job with the workdir (changed a
   little each round: a new bundle, fetched). Single runs on this VM move by up to a
   factor of two with what the memory pool holds (below), so the bench alternates the
   two and reports medians: ``fetch_mib_s`` and ``plain_mib_s`` are medians, ``ratio``
   is one over the other, and ``ratio_runs`` each round's fetch against the plain copy
   just before it (the spread).

   **Plain copy** of the same bytes: ``tar -c DIR | socat - TCP:127.0.0.1:PORT`` into
   ``socat TCP-LISTEN:PORT - > FILE`` (socat's default 8 KiB blocks; where socat is not
   installed, or with ``--plain python``: the same tar stream through a Python socket
   pair, 1 MiB at a time, one thread each side; ``plain_method`` says which). Timed
   from starting the receiver to both ends having exited, so it covers reading the tree,
   the loopback hop and writing the file, as the fetch covers reading the bundle, the hop
   and writing (and hashing) the partial file. Each is timed with the page cache's
   pool of just-freed pages drained (below), as the fetch is. One more copy runs as the
   machine happens to be before the first round, and one after the last, for
   ``ratio_best_plain`` (the median fetch against the fastest copy of all).

   Why drain: on a VM that hands freed memory back to its host (virtio-balloon free page
   reporting, as here), a write into a page the guest did not just free costs a host
   fault (``page_write_ms_per_mib``: about ten times the CPU of a write into a page just
   freed), and some of what a deleted file freed stays unreported for many seconds, so
   the same copy ran in 0.45 s or 1.7 s by what was deleted before it. ``drained`` writes
   a scratch file until its writes cost what a fresh page costs, and keeps it while the
   copy (or the job) runs: both then mostly write into fresh pages, whatever was freed
   before (``drained_mib`` says how much it took; ``--drain-mib`` caps it). The drain is
   a heuristic: a copy still lands on just-freed pages now and then (its CPU per MiB,
   ``plain_cpu_ms_per_mib_runs``, then drops by half), hence the rounds.

   **The job**: the owner fetches the bundle in one stream. The transfer time is the
   owner's own measure: its log line ``bundle_fetched ... seconds=S`` is the monotonic
   time from the start of its fetch to the verified bundle taking its place in the
   store; ``bundle_unpacked ... seconds=U`` times the unpack that follows. Throughput is
   the bundle's size over S. As a cross-check from outside, the job's own start time (it
   prints ``date +%s.%N`` after checking that a file of the workdir is there) minus the
   moment before ``flexmesh submit`` ran gives submit-to-start; the last round's minus
   the cache hit's (which packs and unpacks the same, but fetches nothing) is the fetch
   seen from outside (``first_minus_cache_hit_s``). The bench waits for each job's end
   with the API's long poll, from its own process: a ``flexmesh show`` every 50 ms took
   about a third of both cores from the transfer being timed.
3. **The last workdir again**: a cache hit. ``cache_hit_fetched_bytes`` is the rise of
   the owner's ``bundle_fetch_bytes`` counter over that job (0 expected), with its
   submit-to-start.

CPU: ``origin_cpu_ms_per_mib`` and ``owner_cpu_ms_per_mib`` are each agent's CPU time
(``/proc/PID/stat``) from the first to the last sample that saw a file in the owner's
``bundles/partial`` (the fetch runs while it is there), per MiB of bundle (medians of the
rounds);
``plain_cpu_ms_per_mib`` is tar's, socat's (or this process's pipe threads') over the
plain copy. Unlike the times, these hardly move with what else the machine runs.

Memory: a thread reads ``VmRSS`` of both agent processes from ``/proc/PID/status`` every
``--sample-ms`` (20) ms, from before the first job is submitted until it has ended; each
agent's increase is its peak minus its RSS just before (the mean of the samples of the
half second before submit), the largest of the rounds. Targets (issue 13): ``ratio`` >=
0.70, each increase < 32 MiB.

Prints one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flexmesh.agent.localmesh import LocalMesh
from flexmesh.client import Client

MIB = 1 << 20
RATIO_TARGET = 0.70
RSS_TARGET_MIB = 32
FRESH_MS = 1.0  # CPU ms per MiB written above which a write went into fresh pages (here:
# 0.2-0.3 into pages just freed, 2.3-3.5 into fresh ones)
DRAIN_BLOCK = 32  # MiB written at a time while draining
SLOW_BLOCKS = 4  # blocks in a row at the cost of fresh pages that end a drain


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the workdir ----------------------------------------------------------------------------


def make_workdir(path: Path, size: int, files: int, seed: int) -> None:
    """``files`` files (``f0.bin`` ...) of seeded random bytes, ``size`` bytes in all."""
    rng = random.Random(seed)
    path.mkdir(parents=True)
    per, rest = divmod(size, files)
    for i in range(files):
        left = per + (rest if i == files - 1 else 0)
        with open(path / f"f{i}.bin", "wb") as f:
            while left > 0:
                n = min(left, 4 * MIB)
                f.write(rng.randbytes(n))
                left -= n
    path.chmod(0o755)


# --- the plain copy -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (read from /proc/net/tcp, so the
    check does not take the one connection socat accepts)."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":
            return True
    return False


def plain_socat(src: Path, dest: Path) -> float:
    port = _free_port()
    t0 = time.perf_counter()
    with open(dest, "wb") as out:
        recv = subprocess.Popen(["socat", "-u", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
                                 "STDOUT"], stdout=out)
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            if recv.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("socat did not listen")
            time.sleep(0.002)
        subprocess.run(f"tar -c -C {src} . | socat -u - TCP:127.0.0.1:{port}", shell=True,
                       check=True)
        if recv.wait(timeout=600) != 0:
            raise RuntimeError(f"socat receiver exited {recv.returncode}")
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    return time.perf_counter() - t0


def plain_python(src: Path, dest: Path) -> float:
    """The tar stream through a loopback TCP connection, one thread each side."""
    t0 = time.perf_counter()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    failed: list[OSError] = []

    def receive() -> None:
        try:
            conn, _ = lsock.accept()
            with conn, open(dest, "wb") as out:
                while data := conn.recv(MIB):
                    out.write(data)
        except OSError as exc:  # reported below
            failed.append(exc)

    thread = threading.Thread(target=receive)
    thread.start()
    with subprocess.Popen(["tar", "-c", "-C", str(src), "."], stdout=subprocess.PIPE) as tar, \
            socket.create_connection(lsock.getsockname()) as conn:
        assert tar.stdout is not None
        while data := tar.stdout.read(MIB):
            conn.sendall(data)
    thread.join()
    lsock.close()
    if tar.returncode != 0 or failed:
        raise RuntimeError(f"plain copy failed: tar {tar.returncode}, {failed}")
    return time.perf_counter() - t0


def _cpu_here() -> float:
    """CPU seconds of this process and its waited-for children."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                 resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def plain_copy(method: str, src: Path, dest: Path) -> tuple[float, int, float]:
    """(seconds, bytes, CPU seconds of both ends) of one plain copy."""
    cpu = _cpu_here()
    seconds = plain_socat(src, dest) if method == "socat" else plain_python(src, dest)
    cpu = _cpu_here() - cpu
    size = dest.stat().st_size
    dest.unlink()
    return seconds, size, cpu


# --- memory ---------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """Peak VmRSS of some processes, read every ``interval`` seconds until stopped; and
    their CPU time while ``partial`` (the owner's folder of partial downloads) holds a
    file, that is while the fetch runs."""

    def __init__(self, pids: dict[str, int], interval: float, partial: Path) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval, self.partial = pids, interval, partial
        self.samples: dict[str, list[tuple[float, int]]] = {n: [] for n in pids}
        self.fetching: dict[str, list[float]] = {n: [] for n in pids}  # CPU s, first/last
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            now = time.monotonic()
            busy = self.partial.is_dir() and any(self.partial.iterdir())
            for name, pid in self.pids.items():
                self.samples[name].append((now, rss_kib(pid)))
                if busy:
                    self.fetching[name][1:] = [cpu_s(pid)]
                    if len(self.fetching[name]) == 1:
                        self.fetching[name].insert(0, self.fetching[name][0])
            self.done.wait(self.interval)

    def fetch_cpu_s(self, name: str) -> float:
        """CPU seconds of ``name`` between the first and last sample that saw the fetch."""
        seen = self.fetching[name]
        return seen[-1] - seen[0] if seen else 0.0

    def increase_mib(self, name: str, mark: float) -> tuple[float, float]:
        """(RSS before ``mark``, peak after it minus that), in MiB."""
        rows = self.samples[name]
        before = [kib for t, kib in rows if mark - 0.5 <= t < mark] or [rows[0][1]]
        base = statistics.mean(before)
        peak = max(kib for t, kib in rows if t >= mark)
        return base / 1024, (peak - base) / 1024


# --- the agents -----------------------------------------------------------------------------


def _config(mesh: LocalMesh, name: str, work: Path, size: int) -> list[str]:
    max_bundle = max(1024, size // MIB + 64)
    mesh.root.mkdir(parents=True, exist_ok=True)
    path = mesh.root / f"{name}.toml"
    path.write_text(f'[payload]\nwork_dir = "{work / name}"\nmax_bundle = "{max_bundle}MiB"\n'
                    f'cache_size = "{4 * max_bundle}MiB"\n')
    return ["--config", str(path)]


def counters(mesh: LocalMesh, node: str) -> dict[str, int]:
    found: dict[str, int] = mesh.json(node, "status")["status"]["counters"]
    return found


def run_job(mesh: LocalMesh, workdir: Path | None, probe: str,
            timeout: float) -> tuple[str, float]:
    """Submit a job that checks ``probe`` exists and prints when it started; (its id,
    seconds from just before submit to its start)."""
    script = f'test -e {probe} && date +%s.%N'
    argv = ["submit", "--gpu", "0.25", "-o", "json"]
    if workdir is not None:
        argv += ["--workdir", str(workdir)]
    t_submit = time.time()
    res = mesh.cli("d", *argv, "--", "sh", "-c", script, timeout=timeout)
    job_id = json.loads(res.stdout)["id"]
    # The end is waited for with the API's long poll, from this process: a `flexmesh show`
    # every 50 ms took about a third of a core from the transfer it times.
    job = Client(mesh.agents["d"].socket).job(job_id).wait(timeout)
    if job["state"] != "succeeded" or job["node"] != "a":
        raise RuntimeError(f"job {job_id} did not succeed on a: {job}")
    started = float(mesh.cli("d", "logs", job_id).stdout.split()[-1])
    return job_id, started - t_submit


def log_seconds(log: Path, event: str, job_id: str) -> float:
    """The ``seconds=`` of the owner's log line ``event`` for ``job_id``."""
    pattern = re.compile(rf"\b{event} .*\bjob={re.escape(job_id)}\b.*\bseconds=([0-9.]+)")
    for line in log.read_text(errors="replace").splitlines():
        if m := pattern.search(line):
            return float(m.group(1))
    raise RuntimeError(f"no {event} line for job {job_id} in {log}")


def fetch_round(mesh: LocalMesh, args: argparse.Namespace, src: Path) -> dict[str, Any]:
    """One job with workdir ``src`` (a bundle the owner does not hold yet), timed with
    the pool of just-freed pages drained; its fetch's figures."""
    partial = mesh.agents["a"].dir / "state" / "bundles" / "partial"
    sampler = RssSampler({n: p.proc.pid for n, p in mesh.agents.items() if p.proc},
                         args.sample_ms / 1000, partial)
    sampler.start()
    time.sleep(0.6)
    mark = time.monotonic()
    with drained(src.parent / "drain-fetch", args.drain_mib) as held:
        job_id, started = run_job(mesh, src, "f0.bin", args.timeout)
    sampler.done.set()
    sampler.join()
    log = mesh.agents["a"].log
    fetch_s = log_seconds(log, "bundle_fetched", job_id)
    size = int(mesh.json("d", "show", job_id)["bundle_size"])
    origin_before, origin_up = sampler.increase_mib("d", mark)
    owner_before, owner_up = sampler.increase_mib("a", mark)
    return {
        "size": size, "fetch_s": fetch_s, "mib_s": size / MIB / fetch_s,
        "drained_mib": held["mib"], "drain_fresh": held["fresh"],
        "unpack_s": log_seconds(log, "bundle_unpacked", job_id), "started": started,
        # CPU per MiB fetched, each side, while the owner's partial file existed: unlike
        # the times, hardly moved by what else the machine runs.
        "origin_cpu": sampler.fetch_cpu_s("d") * 1000 * MIB / size,
        "owner_cpu": sampler.fetch_cpu_s("a") * 1000 * MIB / size,
        "origin_before": origin_before, "origin_up": origin_up,
        "owner_before": owner_before, "owner_up": owner_up,
        "rss_samples": len(sampler.samples["a"]),
    }


def transfer(mesh: LocalMesh, args: argparse.Namespace, src: Path,
             copy_plain: Callable[[bool], None]) -> dict[str, Any]:
    """The agents' side: a baseline job; ``--rounds`` times a plain copy and then a job
    with the workdir, changed a little each round (so each is a new bundle, fetched);
    then the last workdir again (a cache hit)."""
    _, baseline = run_job(mesh, None, "/", args.timeout)
    note(f"baseline submit-to-start {baseline:.3f}s")
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        (src / "round.txt").write_text(f"{r}\n")
        note(f"round {r + 1}: plain copy, then a job with the {args.size_mib} MiB workdir")
        copy_plain(r == 0)
        rounds.append(fetch_round(mesh, args, src))
    fetched = counters(mesh, "a")
    note("the same workdir again")
    _, second = run_job(mesh, src, "f0.bin", args.timeout)
    after, served = counters(mesh, "a"), counters(mesh, "d")

    def median(key: str, digits: int = 2) -> float:
        return round(float(statistics.median(r[key] for r in rounds)), digits)

    return {
        "bundle_bytes": rounds[-1]["size"], "fetch_s": median("fetch_s", 3),
        "fetch_s_runs": [round(r["fetch_s"], 3) for r in rounds],
        "fetch_mib_s": median("mib_s", 1),
        "fetch_mib_s_runs": [round(r["mib_s"], 1) for r in rounds],
        "fetch_drained_mib": [r["drained_mib"] for r in rounds],
        "fetch_drains_reached_fresh": [r["drain_fresh"] for r in rounds],
        "unpack_s": median("unpack_s", 3),
        "origin_cpu_ms_per_mib": median("origin_cpu"),
        "owner_cpu_ms_per_mib": median("owner_cpu"),
        "owner_cpu_ms_per_mib_runs": [round(r["owner_cpu"], 2) for r in rounds],
        "fetch_chunks": served.get("bundle_chunks_served", 0),  # (all rounds)
        "fetch_streams": served.get("bundle_streams_served", 0),
        "origin_rss_before_mib": round(rounds[0]["origin_before"], 1),
        "origin_rss_increase_mib": round(max(r["origin_up"] for r in rounds), 1),
        "owner_rss_before_mib": round(rounds[0]["owner_before"], 1),
        "owner_rss_increase_mib": round(max(r["owner_up"] for r in rounds), 1),
        "rss_target_mib": RSS_TARGET_MIB, "rss_samples": rounds[0]["rss_samples"],
        "baseline_submit_to_start_s": round(baseline, 3),
        "first_submit_to_start_s": median("started", 3),
        "first_minus_baseline_s": round(median("started", 3) - baseline, 3),
        "cache_hit_submit_to_start_s": round(second, 3),
        "first_minus_cache_hit_s": round(rounds[-1]["started"] - second, 3),
        "cache_hit_fetched_bytes": after.get("bundle_fetch_bytes", 0)
        - fetched.get("bundle_fetch_bytes", 0),
        "cache_hits": after.get("bundle_cache_hits", 0) - fetched.get("bundle_cache_hits", 0),
    }


def bench(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * MIB
    load = os.getloadavg()[0]
    src = root / "project"
    make_workdir(src, size, args.files, args.seed)
    work = root / "work"
    work.mkdir(mode=0o711)
    work.chmod(0o711)
    method = args.plain if args.plain != "auto" else (
        "socat" if shutil.which("socat") else "python")
    plain: list[Copy] = []
    loose: list[Copy] = []
    held: list[dict[str, Any]] = []

    def copy_plain(undrained: bool, drain: bool = True) -> None:
        if undrained:  # (as the machine is, for ratio_best_plain)
            loose.append(plain_copy(method, src, root / "plain.tar"))
        if drain:  # (one a round, before its fetch)
            with drained(root / "drain-plain", args.drain_mib) as pool:
                plain.append(plain_copy(method, src, root / "plain.tar"))
            held.append(pool)

    with LocalMesh(root / "mesh", plaintext=args.insecure_plaintext) as mesh:
        mesh.start("a", sim="gpu:1x16GiB", extra=_config(mesh, "a", work, size))
        mesh.start("d", join=["a"], extra=["--priority", "10",
                                           *_config(mesh, "d", work, size)])
        mesh.wait_for("convergence", lambda: mesh.converged(["a", "d"]), timeout=60)
        agents = transfer(mesh, args, src, copy_plain)
    copy_plain(True, drain=False)
    return {
        "bench": "payload", "size_mib": args.size_mib, "files": args.files, "seed": args.seed,
        "rounds": args.rounds, "sealed": not args.insecure_plaintext,
        "load_1m_before": round(load, 2),  # (a busy machine slows both sides)
        **agents, "plain_method": method, **compared(agents, plain, loose, held),
        "page_write_ms_per_mib": page_probe(root / "probe.bin", min(args.size_mib, 128),
                                            args.drain_mib),
    }


Copy = tuple[float, int, float]  # a plain copy: seconds, bytes, CPU seconds


def compared(agents: dict[str, Any], plain: list[Copy], loose: list[Copy],
             held: list[dict[str, Any]]) -> dict[str, Any]:
    """The plain copies' figures (``plain``: drained, one a round; ``loose``: as the
    machine was; ``held``: their drains), and the fetches' against them."""
    plain_mib_s = statistics.median(n / MIB / s for s, n, _ in plain)
    best_mib_s = max(n / MIB / s for s, n, _ in plain + loose)
    return {
        "plain_bytes": plain[-1][1],
        "plain_s_runs": [round(run[0], 3) for run in plain],
        "plain_mib_s": round(plain_mib_s, 1),
        "plain_cpu_ms_per_mib": round(statistics.median(
            run[2] * 1000 * MIB / run[1] for run in plain), 2),
        "plain_cpu_ms_per_mib_runs": [round(run[2] * 1000 * MIB / run[1], 2)
                                      for run in plain],
        "plain_drained_mib": [pool["mib"] for pool in held],
        "plain_drains_reached_fresh": [pool["fresh"] for pool in held],
        "ratio": round(agents["fetch_mib_s"] / plain_mib_s, 3), "ratio_target": RATIO_TARGET,
        # each round's fetch against the plain copy just before it (the spread)
        "ratio_runs": [round(f / (n / MIB / s), 3)
                       for f, (s, n, _) in zip(agents["fetch_mib_s_runs"], plain,
                                                 strict=True)],
        "plain_undrained_s_runs": [round(run[0], 3) for run in loose],
        "ratio_best_plain": round(agents["fetch_mib_s"] / best_mib_s, 3),
    }


@contextlib.contextmanager
def drained(path: Path, cap_mib: int) -> Iterator[dict[str, Any]]:
    """The page cache's pool of just-freed pages held while the block runs (see the top):
    a scratch file is written ``DRAIN_BLOCK`` MiB at a time until ``SLOW_BLOCKS`` in a row
    cost at least ``FRESH_MS`` per MiB or ``cap_mib`` were written, flushed to disk (no
    writeback of it runs meanwhile) and kept until the block ends."""
    block = os.urandom(MIB)
    held = {"mib": 0, "fresh": False}
    try:
        with open(path, "wb", buffering=0) as f:
            slow = 0
            while held["mib"] < cap_mib and slow < SLOW_BLOCKS:
                cpu = time.thread_time()
                for _ in range(DRAIN_BLOCK):
                    f.write(block)
                ms = (time.thread_time() - cpu) * 1000 / DRAIN_BLOCK
                slow = slow + 1 if ms >= FRESH_MS else 0
                held["mib"] += DRAIN_BLOCK
            os.fsync(f.fileno())
        held["fresh"] = slow >= SLOW_BLOCKS
        yield held
    finally:
        path.unlink(missing_ok=True)


def page_probe(path: Path, mib: int, cap_mib: int) -> dict[str, float]:
    """CPU per MiB written into the page cache: into fresh pages (drained) and into
    pages a file of the same size freed just before."""
    block = os.urandom(MIB)

    def write() -> float:
        cpu = time.thread_time()
        with open(path, "wb", buffering=0) as f:
            for _ in range(mib):
                f.write(block)
        return round((time.thread_time() - cpu) * 1000 / mib, 2)

    with drained(path.with_suffix(".drain"), cap_mib):
        fresh = write()
        path.unlink()
        recycled = write()  # (into the pages just freed)
        path.unlink()
    return {"fresh": fresh, "recycled": recycled}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=500, help="the workdir's size (500)")
    p.add_argument("--files", type=int, default=4, help="files it is split into (4)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5,
                   help="plain copies and fetches, alternated; medians are reported (5)")
    p.add_argument("--plain", choices=["auto", "socat", "python"], default="auto",
                   help="the plain copy: socat where installed (auto), or a Python pipe")
    p.add_argument("--sample-ms", type=float, default=20.0, help="RSS sampling period")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for one job")
    p.add_argument("--drain-mib", type=int, default=8192,
                   help="most MiB written to drain the pool of just-freed pages before a "
                        "timed transfer (8192; 0: none; see the top)")
    p.add_argument("--insecure-plaintext", action="store_true",
                   help="agents without a key (default: sealed, as a real mesh is)")
    args = p.parse_args(argv)
    if args.size_mib < 1 or args.files < 1 or args.rounds < 1:
        p.error("--size-mib, --files and --rounds must be at least 1")
    # Under /tmp: a borrowed job's user must be able to search the work directory's parents.
    with tempfile.TemporaryDirectory(prefix="flexmesh-bench-payload-", dir="/tmp") as tmp:
        os.chmod(tmp, 0o711)  # (mkdtemp makes it 0700)
        print(json.dumps(bench(Path(tmp), args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
