"""An agent's memory under a flood of TCP connections that announce large frames.

One real agent with a cluster key runs on 127.0.0.1. ``--connections`` clients, none of
which has the key, each open a connection, write a frame header announcing
``--announce`` bytes and then up to ``--send`` bytes of garbage as fast as the agent
takes them, and hold the connection for ``--hold`` seconds. The agent's resident memory
(VmRSS in /proc/PID/status) is read before, every 20 ms during the flood (the peak), and
``--settle`` seconds after every client has closed.

One JSON line on stdout:
``{"bench": "tcp-flood", "connections", "announce_bytes", "rss_before_mib",
"rss_peak_mib", "rss_after_mib", "refused", "counters"}``: ``refused`` is how many
connections the agent closed before their client did, ``counters`` the agent's counts of
what it refused and why. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flexmesh.agent.localmesh import LocalMesh
from flexmesh.protocol.crypto import generate_key

CHUNK = 64 * 1024
COUNTERS = ("tcp_refused_busy", "tcp_refused_per_ip", "frames_dropped_first_too_large",
            "frames_dropped_budget", "tcp_header_timeouts", "tcp_body_timeouts",
            "peers_disconnected_garbage")


def note(msg: str) -> None:
    print(f"[bench_tcp_flood {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def flood_one(host: str, port: int, announce: int, send: int, hold: float) -> bool:
    """One client; True if the agent closed the connection before the client did."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return True
    garbage = os.urandom(CHUNK)
    try:
        writer.write(announce.to_bytes(4, "big"))
        left = min(send, announce - 1)
        while left > 0:
            writer.write(garbage[:min(left, CHUNK)])
            left -= CHUNK
            await writer.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(1), hold)  # b"": the agent closed it
        return reader.at_eof()
    except OSError:  # reset or broken pipe: the agent closed it
        return True
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def flood(pid: int, addr: str, args: argparse.Namespace) -> tuple[float, int]:
    """Run the clients while sampling the agent's RSS; (peak MiB, connections refused)."""
    host, port = addr.rsplit(":", 1)
    peak = rss_mib(pid)
    clients = asyncio.gather(*(flood_one(host, int(port), args.announce, args.send, args.hold)
                               for _ in range(args.connections)))
    while not clients.done():
        peak = max(peak, rss_mib(pid))
        await asyncio.wait([clients], timeout=0.02)
    return peak, sum(clients.result())


def run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    keyfile = root / "cluster.keys"
    keyfile.write_text(generate_key() + "\n")
    keyfile.chmod(0o600)
    config = root / "agent.toml"
    config.write_text('ui = ""\n')
    with LocalMesh(root / "mesh") as mesh:
        a = mesh.start("a", extra=["--config", str(config), "--key-file", str(keyfile)])
        assert a.proc is not None
        pid = a.proc.pid
        time.sleep(args.settle)
        before = rss_mib(pid)
        note(f"agent pid {pid} at {a.addr}: {before:.1f} MiB; {args.connections} clients")
        peak, refused = asyncio.run(flood(pid, a.addr, args))
        note(f"peak {peak:.1f} MiB, {refused} refused; settling {args.settle:g}s")
        time.sleep(args.settle)
        after = rss_mib(pid)
        counters = mesh.json("a", "status")["status"]["counters"]
    return {"bench": "tcp-flood", "connections": args.connections,
            "announce_bytes": args.announce, "rss_before_mib": round(before, 1),
            "rss_peak_mib": round(peak, 1), "rss_after_mib": round(after, 1),
            "refused": refused, "counters": {k: counters.get(k, 0) for k in COUNTERS}}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_tcp_flood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=150)
    p.add_argument("--announce", type=int, default=8 * 1024 * 1024,
                   help="bytes each frame header announces (default 8 MiB, the most)")
    p.add_argument("--send", type=int, default=8 * 1024 * 1024,
                   help="bytes of garbage each client sends after it, at most announce-1")
    p.add_argument("--hold", type=float, default=5.0,
                   help="seconds each client keeps its connection after sending")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds before the first and after the last reading")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flexmesh-bench-flood-") as tmp:
        print(json.dumps(run(Path(tmp), args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
