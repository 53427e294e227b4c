"""The flexmesh demo: four agents on 127.0.0.1, jobs submitted from the one with no device.

    gpu-a   gpu:2x16GiB      gpu-b   gpu:2x16GiB
    npu-c   npu:1x32GiB      edge-d  (no device; jobs are submitted here)

Devices are simulated (this is a test double: on a machine with a GPU, the agent's NVML
backend reports the real one); everything else is real: gossip over UDP, calls over TCP,
the coordinator's placement, the owners' leases, the job processes and their output.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from flexmesh.agent.localmesh import LocalMesh

JOBS = [
    (["--gpu", "0.25", "--memory", "4GiB", "--kind", "gpu"], "quarter of a GPU"),
    (["--gpu", "0.5", "--memory", "8GiB", "--kind", "gpu"], "half a GPU"),
    (["--gpu", "0.25", "--memory", "2GiB", "--kind", "gpu"], "another quarter"),
    (["--gpu", "1", "--memory", "16GiB", "--kind", "gpu"], "a whole GPU"),
    (["--gpu", "0.5", "--memory", "16GiB", "--kind", "npu"], "half an NPU"),
    (["--devices", "2", "--memory", "4GiB", "--kind", "gpu"], "two whole GPUs"),
]
SCRIPT = ('echo "job $FLEXMESH_JOB_ID on $(hostname)/$FLEXMESH_DEVICE: '
          '$FLEXMESH_COMPUTE_MILLI milli, $FLEXMESH_MEMORY_MIB MiB"; sleep 1; echo done')


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="flexmesh-demo-") as tmp, LocalMesh(Path(tmp)) as mesh:
        say("starting four agents on 127.0.0.1")
        mesh.start("gpu-a", sim="gpu:2x16GiB")
        mesh.start("gpu-b", sim="gpu:2x16GiB", join=["gpu-a"])
        mesh.start("npu-c", sim="npu:1x32GiB", join=["gpu-a"])
        # A drone's companion computer: it submits work but should not coordinate the mesh
        # (a higher priority number loses the election).
        mesh.start("edge-d", join=["gpu-a"], extra=["--priority", "10"])
        names = list(mesh.agents)
        mesh.wait_for("the mesh to converge", lambda: mesh.converged(names))
        print(mesh.cli("edge-d", "nodes").stdout, end="")
        say("devices the mesh can lend (seen from edge-d)")
        print(mesh.cli("edge-d", "devices").stdout, end="")

        say("submitting jobs on edge-d, which has no device of its own")
        ids = []
        for flags, what in JOBS:
            job_id = mesh.cli("edge-d", "submit", *flags, "--", "sh", "-c", SCRIPT).stdout.strip()
            ids.append(job_id)
            print(f"  {job_id}  {what:17} flexmesh submit {' '.join(flags)}")

        say("while they run: leases on the owners' books")
        mesh.wait_for("every job to be placed", lambda: all(
            j["state"] != "queued" for j in mesh.json("edge-d", "jobs")))
        print(mesh.cli("edge-d", "devices").stdout, end="")

        say("waiting for every job to finish")
        for job_id in ids:
            mesh.cli("edge-d", "show", job_id)
            mesh.wait_for(f"job {job_id}", lambda j=job_id: mesh.json("edge-d", "show", j)
                          ["state"] in ("succeeded", "failed", "lost", "cancelled"), timeout=60)
        print(mesh.cli("edge-d", "jobs").stdout, end="")

        say("their output, read back on edge-d (flexmesh logs JOB)")
        for job_id in ids:
            print(mesh.cli("edge-d", "logs", job_id).stdout, end="")

        say("a gang: one member on each GPU node, placed all at once or not at all")
        gang_script = ('echo "rank $FLEXMESH_GANG_RANK of $FLEXMESH_GANG_SIZE on '
                       '$(hostname)/$FLEXMESH_DEVICE; ranks on $FLEXMESH_GANG_NODES"')
        flags = ["--gang", "2", "--gpu", "0.25", "--memory", "2GiB", "--kind", "gpu"]
        print(f"  flexmesh submit {' '.join(flags)} --wait")
        res = mesh.cli("edge-d", "submit", *flags, "--wait", "--timeout", "60", "--", "sh",
                       "-c", gang_script)
        print(res.stdout, end="")
        gang_id = res.stdout.split()[0]
        for member in mesh.json("edge-d", "show", gang_id)["members"]:
            print(mesh.cli("edge-d", "logs", member["id"]).stdout, end="")

        say("cancel: a long job, cancelled from edge-d")
        long_id = mesh.cli("edge-d", "submit", "--gpu", "0.1", "--", "sleep", "600").stdout.strip()
        mesh.wait_for("it to run", lambda: mesh.json("edge-d", "show", long_id)["state"]
                      == "running")
        mesh.cli("edge-d", "cancel", long_id)
        job = mesh.wait_for("it to end", lambda: (lambda j: j if j["state"] in
                            ("cancelled", "failed") else None)(mesh.json("edge-d", "show",
                                                                          long_id)))
        print(f"  {long_id}: {job['state']} ({job['reason']})")

        say("failover: kill -9 the coordinator, the next job is still placed")
        coordinator = mesh.coordinator("edge-d")
        print(f"  coordinator is {coordinator}; killing it")
        t0 = time.monotonic()
        mesh.kill(coordinator)  # type: ignore[arg-type]
        job_id = mesh.cli("edge-d", "submit", "--gpu", "0.5", "--kind", "any", "--", "sh", "-c",
                          "echo placed after failover on $FLEXMESH_DEVICE").stdout.strip()
        job = mesh.wait_for("the job to finish", lambda: (lambda j: j if j["state"] in
                            ("succeeded", "failed") else None)(mesh.json("edge-d", "show",
                                                                          job_id)), timeout=60)
        print(f"  new coordinator {mesh.coordinator('edge-d')}; job {job_id} {job['state']} on "
              f"{job['node']}/{job['device']} {time.monotonic() - t0:.1f}s after the kill")
        print("  " + mesh.cli("edge-d", "logs", job_id).stdout.strip())

        say("shutting down")
    print("done: every agent stopped, temporary state removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
