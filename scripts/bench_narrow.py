"""Narrow links (agent/runtime/bulk.py): do gossip and small calls keep their latency while
a big transfer runs, with and without ``[network] bulk_rate``; and what compression saves.

Three agents in the fleet lab (agent/fleetlab.py), every host sending at most ``--rate``
Mbit/s (tc tbf): ``g0`` and ``g1`` with a simulated GPU, ``sub`` with none. A probe in
``sub``'s namespace measures, every ``--every`` s, the round trip of a sealed gossip
``Ping`` to ``g1`` (UDP, answered with an ``Ack``) and of a small call (a ``JobSync`` of
an unknown job, answered at once), first for ``--idle`` s with the link idle, then while
``sub`` serves a job's ``--bundle-mib`` MiB workdir of random (incompressible) bytes to
the GPU node the job is placed on. This runs once with no cap (``bulk_rate = 0``) and once
capped (``--cap``). Then a job prints ``--output-mib`` MiB of log-like text (compressible)
that streams from its GPU node back to ``sub``: the bytes the GPU node's interface sent
meanwhile are read from the kernel (``ip -s link``: both GPU nodes, from the submit to
the last byte of output read back on ``sub``, gossip included), with compression on (the
capped run) and off (a third run, no cap, ``compress = false``).

One JSON line (``bench: narrow``): per run, probe latencies (median and p95, ms, and
probes without an answer within 2 s) idle and during the transfer, the transfer's time and
throughput, and suspect/dead member events in all logs (nobody is killed: each is false);
and the output's bytes on the wire with and without compression.

Needs root (network namespaces), ``ip``, ``tc`` and ``nft``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flexmesh.agent.cli import get_json as _get
from flexmesh.agent.fleetlab import PORT, FleetLab, available

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")
PROBE_WAIT = 2.0  # seconds: a probe not answered within this is counted lost


def _progress(msg: str) -> None:
    print(f"[bench_narrow {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the probe: runs in sub's namespace ------------------------------------------------------


def probe(args: argparse.Namespace) -> int:
    from flexmesh.agent import rpc
    from flexmesh.protocol import wire
    from flexmesh.protocol.crypto import CryptoError, Keyring, Sealer

    keys = [k.strip() for k in Path(args.key_file).read_text().splitlines() if k.strip()]
    sealer = Sealer(Keyring(keys))
    cluster = args.cluster.encode()
    codec = rpc.Codec(sealer, cluster, me="probe")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((args.bind, 0))
    me = f"{args.bind}:{udp.getsockname()[1]}"
    host, port = args.target_addr.rsplit(":", 1)
    end = time.time() + args.duration
    seq = 0
    while time.time() < end:
        seq += 1
        ping = wire.encode_packet([wire.Ping(seq, args.target, "probe", me)])
        t0 = time.monotonic()
        udp.sendto(sealer.seal(ping, cluster, time.time()), (host, int(port)))
        rtt = None
        udp.settimeout(PROBE_WAIT)
        while rtt is None:
            try:
                data = udp.recv(4096)
            except TimeoutError:
                break
            try:
                msgs = wire.decode_packet(sealer.open(data, cluster, time.time()))
            except (CryptoError, wire.DecodeError):
                continue
            if any(isinstance(m, wire.Ack) and m.seq == seq for m in msgs):
                rtt = time.monotonic() - t0
        print(json.dumps({"t": time.time(), "kind": "udp", "rtt": rtt}), flush=True)
        t0 = time.monotonic()
        try:
            asyncio.run(rpc.call(args.target_addr, wire.JobSync("probe-none", 0, 0, 0),
                                 PROBE_WAIT, codec, "probe", args.target))
            rtt = time.monotonic() - t0
        except rpc.CallError:
            rtt = None
        print(json.dumps({"t": time.time(), "kind": "tcp", "rtt": rtt}), flush=True)
        time.sleep(max(0.0, args.every - (time.monotonic() - t0)))
    return 0


# --- the bench -------------------------------------------------------------------------------


def _member_events(path: Path) -> list[str]:
    out = []
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return out
    for raw in lines:
        try:
            msg = json.loads(raw)["msg"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(msg, str) and msg.startswith("member "):
            kv = dict(p.split("=", 1) for p in msg.split()[1:] if "=" in p)
            out.append(kv.get("state", ""))
    return out


def _stats(samples: list[dict[str, Any]], kind: str, t0: float, t1: float) -> dict[str, Any]:
    rtts = [s["rtt"] for s in samples if s["kind"] == kind and t0 <= s["t"] <= t1]
    got = sorted(r * 1000 for r in rtts if r is not None)
    p95 = got[min(len(got) - 1, int(0.95 * len(got)))] if got else None
    return {"n": len(rtts), "lost": len(rtts) - len(got),
            "median_ms": round(statistics.median(got), 1) if got else None,
            "p95_ms": round(p95, 1) if p95 is not None else None,
            "max_ms": round(got[-1], 1) if got else None}


def _tx_bytes(ns: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


OUTPUT_JOB = ("import sys\nn = {n}\ni = 0\nw = sys.stdout.write\n"
              "while n > 0:\n"
              "    line = 'epoch %d step %d loss=%.4f lr=3.0e-04 grad_norm=%.3f ok\\n' % "
              "(i // 1000, i, 1.0 / (1 + i % 977), (i * 7919 % 1000) / 100)\n"
              "    w(line[:n]); n -= len(line); i += 1\n")


class Run:
    def __init__(self, root: Path, args: argparse.Namespace, bulk_rate: str,
                 compressing: bool) -> None:
        self.args = args
        self.lab = FleetLab(root, profile=args.profile)
        self.bulk_rate = bulk_rate
        self.compressing = compressing
        self.names = ["g0", "g1", "sub"]
        self.probe: subprocess.Popen[bytes] | None = None
        self.samples_path = root / "probe.jsonl"

    def start(self) -> None:
        lab = self.lab
        lab.open()
        with open(lab.config, "a") as f:
            f.write(f'[network]\nbulk_rate = "{self.bulk_rate}"\n'
                    f"compress = {'true' if self.compressing else 'false'}\n")
        lab.net.default_rate_mbit = self.args.rate
        lab.start("g0", sim="gpu:1x16GiB")
        lab.start("g1", sim="gpu:1x16GiB", join=["g0"], wait=False)
        lab.start("sub", join=["g0"], extra=["--priority", "10"], wait=False)
        for n in self.names[1:]:
            lab.wait_ready(n, timeout=120)
        lab.wait_for("convergence", self.converged, timeout=180, interval=0.5)

    def converged(self) -> bool:
        for n in self.names:
            rows = _get(self.lab.agents[n].socket, "/v1/nodes")
            if rows is None or {r["name"] for r in rows if r["state"] == "alive"} != set(
                    self.names):
                return False
        return True

    def start_probe(self, seconds: float) -> None:
        sub = self.lab.net.hosts["sub"]
        g1 = self.lab.net.hosts["g1"]
        with open(self.samples_path, "wb") as out:  # (the child's, from here on)
            self.probe = subprocess.Popen(
                ["ip", "netns", "exec", sub.ns, sys.executable, __file__, "--probe",
                 "--bind", sub.addr, "--target", "g1", "--target-addr", f"{g1.addr}:{PORT}",
                 "--key-file", str(self.lab.key_file), "--duration", str(seconds),
                 "--every", str(self.args.every)], stdout=out)

    def samples(self) -> list[dict[str, Any]]:
        out = []
        for line in self.samples_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def submit(self, *argv: str) -> str:
        res = self.lab.cli("sub", "submit", "--gpu", "0.5", "--kind", "gpu", "-o", "json",
                           *argv)
        return str(json.loads(res.stdout)["id"])

    def wait_state(self, job: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = _get(self.lab.agents["sub"].socket, f"/v1/jobs/{job}") or {}
            if row.get("state") in states:
                return row
            time.sleep(0.2)
        raise RuntimeError(f"job {job} not {states} within {timeout:g}s")

    def transfer(self, workdir: Path) -> dict[str, Any]:
        """Idle probes, then probes while the bundle goes; its time and throughput."""
        a = self.args
        self.start_probe(a.idle + a.transfer_timeout)
        time.sleep(a.idle)
        t_idle = (time.time() - a.idle + 1.0, time.time())
        t0 = time.time()
        job = self.submit("--workdir", str(workdir), "--", "true")
        row = self.wait_state(job, ("running", *TERMINAL), a.transfer_timeout)
        t1 = time.time()
        assert self.probe is not None
        self.probe.terminate()
        self.probe.wait(10)
        samples = self.samples()
        size = a.bundle_mib * 1024 * 1024
        return {"job_state": row.get("state"), "node": row.get("node"),
                "transfer_s": round(t1 - t0, 1),
                "transfer_mbit_s": round(size * 8 / (t1 - t0) / 1e6, 3),
                "idle": {k: _stats(samples, k, *t_idle) for k in ("udp", "tcp")},
                "during": {k: _stats(samples, k, t0 + 1.0, t1) for k in ("udp", "tcp")}}

    def output(self) -> dict[str, Any]:
        """A job's compressible output streamed back: bytes its node's interface sent."""
        n = self.args.output_mib * 1024 * 1024
        gpus = [self.lab.net.hosts[g].ns for g in ("g0", "g1")]  # (where it runs: either)
        before = sum(_tx_bytes(ns) for ns in gpus)
        t0 = time.time()
        # (Jobs borrowed from another node run as nobody: the system's Python, not ours.)
        job = self.submit("--", "python3", "-c", OUTPUT_JOB.format(n=n))
        end = self.wait_state(job, TERMINAL, self.args.transfer_timeout)
        if end.get("state") != "succeeded":
            raise RuntimeError(f"the output job ended {end.get('state')}: {end.get('reason')}")
        deadline = time.monotonic() + 60
        got = 0
        while time.monotonic() < deadline:  # the state comes with the last output
            got = len(self.lab.cli("sub", "logs", job, check=False).stdout)
            if got >= n:
                break
            time.sleep(0.5)
        return {"output_bytes": n, "output_arrived": got >= n,
                "output_s": round(time.time() - t0, 1),
                "wire_bytes": sum(_tx_bytes(ns) for ns in gpus) - before}

    def suspicions(self) -> dict[str, int]:
        states = [s for n in self.names for s in _member_events(self.lab.agents[n].log)]
        return {"suspect_events": states.count("suspect"), "dead_events": states.count("dead")}


def _workdir(root: Path, mib: int) -> Path:
    d = root / "workdir"
    d.mkdir()
    with open(d / "weights.bin", "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    os.chmod(root, 0o755)
    return d


def run_one(root: Path, args: argparse.Namespace, bulk_rate: str, compressing: bool,
            workdir: Path | None) -> dict[str, Any]:
    run = Run(root, args, bulk_rate, compressing)
    try:
        run.start()
        _progress(f"bulk_rate={bulk_rate} compress={compressing}: converged")
        out: dict[str, Any] = {"bulk_rate": bulk_rate, "compress": compressing}
        if workdir is not None:
            out.update(run.transfer(workdir))
            _progress(f"transfer {out['transfer_s']}s")
        out.update(run.output())
        out.update(run.suspicions())
        return out
    finally:
        run.lab.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_narrow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=2.0, help="Mbit/s each host may send")
    p.add_argument("--cap", default="1Mbit", help="bulk_rate of the capped run")
    p.add_argument("--profile", default="edge", help="agents' timing profile")
    p.add_argument("--bundle-mib", type=int, default=20, help="MiB of random workdir")
    p.add_argument("--output-mib", type=int, default=4, help="MiB of text output")
    p.add_argument("--idle", type=float, default=15.0, help="seconds of idle probes")
    p.add_argument("--every", type=float, default=0.25, help="seconds between probes")
    p.add_argument("--transfer-timeout", type=float, default=600.0)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bind", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--target-addr", help=argparse.SUPPRESS)
    p.add_argument("--key-file", help=argparse.SUPPRESS)
    p.add_argument("--cluster", default="flexmesh", help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        return probe(args)
    why = available()
    if why is not None:
        print(f"bench_narrow: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flexmesh-bench-narrow-", dir="/tmp") as tmp:
        os.chmod(tmp, 0o711)  # a borrowed job's user searches the work dir's parents
        root = Path(tmp)
        workdir = _workdir(root, args.bundle_mib)
        runs = {"uncapped": run_one(root / "uncapped", args, "0", True, workdir),
                "capped": run_one(root / "capped", args, args.cap, True, workdir),
                "uncompressed": run_one(root / "uncompressed", args, "0", False, None)}
    raw = runs["uncompressed"]["wire_bytes"]
    print(json.dumps({"bench": "narrow", "rate_mbit": args.rate, "profile": args.profile,
                      "bundle_mib": args.bundle_mib, "output_mib": args.output_mib, **runs,
                      "output_wire_ratio": round(runs["capped"]["wire_bytes"] / raw, 3),
                      "wall_s": round(time.monotonic() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
