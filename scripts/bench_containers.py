"""Time from submit to a container's first output line, for a cached local image, against
``podman run`` of the same image by hand (both with the same extra arguments).

    by hand:  ``podman run --rm EXTRA --network none IMAGE echo first`` spawned with its
              stdout on a file; the clock stops when the first line is in that file
              (polled every 2 ms).
    flexmesh: the same image and command submitted (HTTP on the agent's socket) to one
              agent with a simulated GPU; the clock stops when the first line is in the
              job's stdout file on that node (polled every 2 ms).

Runs alternate (by hand, flexmesh), each once the other's container is gone, so that both
see the same machine and neither shares podman's locks with the other's cleanup. Prints one JSON
line: the medians, their difference and the target (+0.5 s). Needs podman and busybox;
the image is imported from busybox and removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from flexmesh.agent.localmesh import LocalMesh

EXTRA = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# By hand as flexmesh runs it (no network: setting one up costs podman ~0.1 s), without
# the rest (user, labels, env file, init), which is what flexmesh adds.
BY_HAND = [*EXTRA, "--network", "none"]
TARGET_S = 0.5


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_image(root: Path) -> str:
    busybox = shutil.which("busybox")
    if busybox is None or shutil.which("podman") is None:
        raise SystemExit("needs podman and busybox (apt-get install podman runc busybox-static)")
    fs = root / "rootfs"
    (fs / "bin").mkdir(parents=True)
    shutil.copy2(busybox, fs / "bin" / "busybox")
    for applet in ("sh", "echo", "sleep"):
        (fs / "bin" / applet).symlink_to("busybox")
    with tarfile.open(root / "rootfs.tar", "w") as t:
        t.add(fs, arcname=".")
    ref = f"localhost/flexmesh-bench-busybox:{uuid.uuid4().hex[:8]}"
    subprocess.run(["podman", "import", str(root / "rootfs.tar"), ref], check=True,
                   capture_output=True)
    return ref


def by_hand(image: str, out: Path) -> float:
    """Spawned with its stdout on a file, as the agent spawns a job, polled the same way."""
    with open(out, "wb") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["podman", "run", "--rm", *BY_HAND, image, "echo", "first"],
                                stdout=f, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return first_line(out, t0)
    finally:
        proc.wait()


def first_line(out: Path, t0: float) -> float:
    """Seconds from ``t0`` until ``out`` holds the line "first" (polled every 2 ms)."""
    while time.perf_counter() < t0 + 60:
        try:
            if out.read_bytes().startswith(b"first\n"):
                return time.perf_counter() - t0
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"nothing in {out} within 60 s")


async def via_agent(sock: str, state: Path, image: str) -> float:
    body = {"command": ["echo", "first"], "compute_milli": 100, "image": image}
    conn = aiohttp.UnixConnector(path=sock)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        async with session.post("http://agent/v1/jobs", json=body) as resp:
            data = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"submit answered {resp.status}: {data}")
    took = first_line(state / "jobs" / data["id"] / "stdout", t0)
    settle(data["id"])
    return took


def settle(job_id: str) -> None:
    """Wait until the job's container is gone, so that the next run (by hand) does not
    share podman's locks with its cleanup."""
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline:
        done = subprocess.run(["podman", "ps", "-a", "--filter", f"label=flexmesh.job={job_id}",
                               "--format", "{{.Names}}"], capture_output=True, check=True)
        if not done.stdout.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"the container of job {job_id} is still there after 60 s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flexmesh-bench-ct-") as tmp:
        root = Path(tmp)
        image = make_image(root)
        try:
            hand, agent = run_both(root, image, args.runs)
        finally:
            subprocess.run(["podman", "rmi", "-f", image], capture_output=True, check=False)
    p50_hand, p50_agent = statistics.median(hand), statistics.median(agent)
    print(json.dumps({
        "bench": "container-first-line", "runs": args.runs,
        "by_hand_p50_s": round(p50_hand, 3), "flexmesh_p50_s": round(p50_agent, 3),
        "overhead_p50_s": round(p50_agent - p50_hand, 3),
        "by_hand_max_s": round(max(hand), 3), "flexmesh_max_s": round(max(agent), 3),
        "target_overhead_s": TARGET_S, "met": p50_agent - p50_hand <= TARGET_S}))
    return 0


def run_both(root: Path, image: str, runs: int) -> tuple[list[float], list[float]]:
    conf = root / "agent.toml"
    conf.write_text(f'[containers]\nruntime = "podman"\nextra_args = {json.dumps(EXTRA)}\n')
    with LocalMesh(root / "mesh") as mesh:
        a = mesh.start("bench", sim="gpu:1x16GiB", extra=["--config", str(conf)])
        out = root / "by-hand.out"
        by_hand(image, out)  # warm both: the image's layers in the page cache, podman's own
        asyncio.run(via_agent(a.socket, a.dir / "state", image))
        hand: list[float] = []
        agent: list[float] = []
        for i in range(runs):
            hand.append(by_hand(image, out))
            agent.append(asyncio.run(via_agent(a.socket, a.dir / "state", image)))
            note(f"run {i + 1}/{runs}: by hand {hand[-1]:.3f} s, flexmesh {agent[-1]:.3f} s")
    return hand, agent


if __name__ == "__main__":
    raise SystemExit(main())
