"""Cost of the Jetson backend on this machine's real /proc, with a fake GPU load file: one
full scan of every process's fd links for /dev/nvhost-*, /dev/nvmap (done every RESCAN_S
seconds), and the mean of samples in between; one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from flexmesh.agent.devices.jetson import JetsonBackend, gpu_holders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        load = Path(tmp, "devices", "gpu.0", "load")
        load.parent.mkdir(parents=True)
        load.write_text("250\n")
        start = time.perf_counter()
        for _ in range(10):
            gpu_holders(Path("/proc"), Path("/dev"))
        full_ms = (time.perf_counter() - start) * 100
        backend = JetsonBackend(sys_root=Path(tmp), clock=lambda: 0.0)  # never rescans
        backend.discover()
        backend.sample(frozenset())
        start = time.perf_counter()
        for _ in range(args.samples):
            backend.sample(frozenset())
        elapsed = time.perf_counter() - start
    procs = sum(1 for name in os.listdir("/proc") if name.isdigit())
    per_sample_ms = round(elapsed * 1000 / args.samples, 3)
    print(json.dumps({"bench": "jetson_sample", "samples": args.samples, "processes": procs,
                      "uid": os.getuid(), "full_scan_ms": round(full_ms, 3),
                      "ms_per_sample_between_scans": per_sample_ms}))


if __name__ == "__main__":
    main()
