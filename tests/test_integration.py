"""Real agent processes on 127.0.0.1: submit through the CLI, lend a GPU fraction across
nodes, read the output back at the submitter, survive kill -9 of the coordinator."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from flexmesh.agent.localmesh import LocalMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")



def finished(mesh: LocalMesh, node: str, job_id: str) -> dict[str, object] | None:
    job: dict[str, object] = mesh.json(node, "show", job_id)
    return job if job["state"] in TERMINAL else None


def test_four_agents_lend_a_fraction_and_fail_over(mesh: LocalMesh) -> None:
    mesh.start("a", sim="gpu:2x16GiB")
    mesh.start("b", sim="gpu:2x16GiB", join=["a"])
    mesh.start("c", sim="npu:1x32GiB", join=["a"])
    mesh.start("d", join=["a"], extra=["--priority", "10"])  # deviceless, never coordinator
    names = ["a", "b", "c", "d"]
    mesh.wait_for("convergence", lambda: mesh.converged(names))
    devices = mesh.json("d", "devices")
    assert {(r["node"], r["id"]) for r in devices} == {
        ("a", "gpu0"), ("a", "gpu1"), ("b", "gpu0"), ("b", "gpu1"), ("c", "npu0")}
    assert all(r["backend"] == "sim" and r["compute_milli"] == 1000 for r in devices)

    res = mesh.cli("d", "submit", "--gpu", "0.25", "--memory", "4GiB", "--kind", "gpu",
                   "-o", "json", "--", "sh", "-c",
                   'echo "out $FLEXMESH_DEVICE $FLEXMESH_COMPUTE_MILLI $FLEXMESH_MEMORY_MIB";'
                   ' echo oops >&2; exit 0')
    job_id = json.loads(res.stdout)["id"]
    job = mesh.wait_for("the job to end", lambda: finished(mesh, "d", job_id))
    assert job["state"] == "succeeded" and job["exit_code"] == 0
    assert job["node"] in ("a", "b") and job["compute_milli"] == 250
    assert job["memory_mib"] == 4096
    logs = mesh.cli("d", "logs", job_id)
    assert logs.stdout == f"out {job['device']} 250 4096\n"
    assert logs.stderr == "oops\n"

    # A failing job: its exit code and a readable reason come back to the submitter.
    res = mesh.cli("d", "submit", "--wait", "--gpu", "0.5", "--", "sh", "-c", "exit 7",
                   check=False)
    assert res.returncode == 7 and "exited with code 7" in res.stdout

    # Output beyond one read (1 MiB) comes back whole, without --follow as with it.
    res = mesh.cli("d", "submit", "--wait", "--gpu", "0.25", "--kind", "gpu", "-o", "json",
                   "--", "sh", "-c", "head -c 3145728 /dev/zero | tr '\\0' x")
    big = json.loads(res.stdout)
    assert big["node"] != "d"
    assert mesh.cli("d", "logs", big["id"]).stdout == "x" * 3145728
    assert mesh.cli("d", "logs", "--follow", big["id"]).stdout == "x" * 3145728

    # kill -9 the coordinator; a new one is elected and places the next job.
    coordinator = mesh.coordinator("d")
    assert coordinator in ("a", "b", "c")
    mesh.kill(coordinator, signal.SIGKILL)
    rest = [n for n in names if n != coordinator]
    res = mesh.cli("d", "submit", "--gpu", "0.5", "-o", "json", "--", "echo", "after")
    job_id = json.loads(res.stdout)["id"]
    job = mesh.wait_for("the job after failover", lambda: finished(mesh, "d", job_id),
                        timeout=60)
    assert job["state"] == "succeeded" and job["node"] != coordinator
    mesh.wait_for("a new coordinator", lambda: mesh.converged(rest), timeout=60)
    assert mesh.coordinator("d") not in (coordinator, "d")
    assert mesh.cli("d", "logs", job_id).stdout == "after\n"


def test_cancel_from_the_submitting_node(mesh: LocalMesh) -> None:
    mesh.start("a", sim="gpu:1x8GiB")
    mesh.start("z", join=["a"], extra=["--priority", "10"])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "z"]))
    job_id = mesh.cli("z", "submit", "--gpu", "0.5", "--", "sleep", "300").stdout.strip()
    mesh.wait_for("running", lambda: mesh.json("z", "show", job_id)["state"] == "running")
    mesh.cli("z", "cancel", job_id)
    job = mesh.wait_for("cancelled", lambda: finished(mesh, "z", job_id))
    assert job["state"] == "cancelled" and job["reason"] == "cancelled by user"
    # The lease is back: the whole device is lendable again.
    mesh.wait_for("the lease to be released", lambda: mesh.json("z", "devices")[0]
                  ["lendable_compute_milli"] == 1000)


def test_bad_requests_get_clear_errors(mesh: LocalMesh) -> None:
    mesh.start("a", sim="gpu:1x8GiB")
    cases = [
        (["--gpu", "1.5"], "at most 1"),
        (["--gpu", "-0.1"], ""),
        (["--memory", "-4GiB"], ""),
        (["--memory", "lots"], "lots"),
    ]
    for flags, text in cases:
        res = mesh.cli("a", "submit", *flags, "--", "true", check=False)
        assert res.returncode == 2, (flags, res.stdout, res.stderr)
        assert text in res.stderr
    res = mesh.cli("a", "submit", "--gpu", "0.5", check=False)
    assert res.returncode == 2 and "command" in res.stderr
    assert mesh.cli("a", "show", "nope", check=False).returncode == 1


def test_journal_survives_kill_and_marks_vanished_jobs_lost(mesh: LocalMesh) -> None:
    mesh.start("solo", sim="gpu:1x8GiB")
    done = mesh.cli("solo", "submit", "--wait", "--gpu", "0.2", "--", "echo", "hi").stdout
    done_id = done.split()[0]
    job_id = mesh.cli("solo", "submit", "--gpu", "0.5", "--", "sleep", "300").stdout.strip()
    mesh.wait_for("running", lambda: mesh.json("solo", "show", job_id)["state"] == "running")
    state = mesh.agents["solo"].dir / "state"
    mesh.kill("solo", signal.SIGKILL)
    # The job's process vanishes while the agent is down.
    from flexmesh.agent.store import Journal

    j = Journal(state / "journal.sqlite3")
    pid = next(x.pid for x in j.list_jobs() if x.id == job_id)
    j.close()
    assert pid
    os.killpg(pid, signal.SIGKILL)
    mesh.restart("solo")
    jobs = {j["id"]: j for j in mesh.json("solo", "jobs")}
    assert jobs[done_id]["state"] == "succeeded"
    assert jobs[job_id]["state"] == "lost"
    assert "vanished" in jobs[job_id]["reason"]
    assert mesh.cli("solo", "logs", done_id).stdout == "hi\n"
    # Its lease was given back on the owner's books.
    assert mesh.json("solo", "devices")[0]["lendable_compute_milli"] == 1000


def test_garbage_from_peers_is_dropped_and_counted(mesh: LocalMesh) -> None:
    import socket
    import struct

    mesh.plaintext = True  # what the decoder makes of garbage, not the sealer (test_security)
    mesh.start("a", sim="gpu:1x8GiB")
    host, port = mesh.agents["a"].addr.rsplit(":", 1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for payload in (b"", b"\x01", b"\x01\xc1garbage", b"\x07\x91\x00", os.urandom(1200)):
        udp.sendto(payload, (host, int(port)))
    udp.close()
    for payload in (b"\x00\x00\x00\x05\x01\xc1\xc1\xc1\xc1",       # not msgpack
                    struct.pack(">I", 1 << 30) + b"x",              # absurd frame length
                    b"\x00\x00"):                                   # truncated header
        with socket.create_connection((host, int(port)), timeout=5) as tcp:
            tcp.sendall(payload)
            tcp.shutdown(socket.SHUT_WR)
            assert tcp.recv(100) == b""  # disconnected, nothing answered

    def counters() -> dict[str, int] | None:
        c: dict[str, int] = mesh.json("a", "status")["status"]["counters"]
        ok = (c.get("packets_dropped_malformed", 0) >= 4
              and c.get("peers_disconnected_garbage", 0) >= 2)
        return c if ok else None

    mesh.wait_for("the drops to be counted", counters)
    # Still serving.
    assert mesh.cli("a", "submit", "--wait", "--gpu", "0.5", "--", "true").returncode == 0


def test_owner_reclaims_and_the_job_finishes_elsewhere(mesh: LocalMesh) -> None:
    load = mesh.root / "load-a.json"
    load.write_text("{}")
    mesh.start("a", sim="gpu:1x8GiB", extra=["--sim-load-file", str(load)])
    mesh.start("z", join=["a"], extra=["--priority", "10"])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "z"]))
    # The job prefers its own node? z has no device, so it borrows a's GPU.
    job_id = mesh.cli("z", "submit", "--gpu", "0.5", "--memory", "2GiB", "--", "sh", "-c",
                      'echo "run on $FLEXMESH_ORIGIN->$FLEXMESH_DEVICE"; sleep 300').stdout.strip()
    mesh.wait_for("running on a", lambda: mesh.json("z", "show", job_id)["state"] == "running")
    # a's own workload takes the whole GPU: it reclaims what it lent.
    load.write_text('{"gpu0": {"compute_milli": 1000, "memory_mib": 8192}}')
    job = mesh.wait_for("requeued", lambda: (lambda j: j if j["state"] == "queued" and
                        "preempted" in j["reason"] else None)(mesh.json("z", "show", job_id)))
    assert "reclaimed by a" in job["reason"]
    # Another node with a free GPU joins: the requeued job runs there.
    mesh.start("b", sim="gpu:1x8GiB", join=["a"])
    job = mesh.wait_for("running on b", lambda: (lambda j: j if j["state"] == "running"
                        else None)(mesh.json("z", "show", job_id)), timeout=60)
    assert job["node"] == "b"
    mesh.cli("z", "cancel", job_id)
    mesh.wait_for("cancelled", lambda: finished(mesh, "z", job_id))


def test_sighup_reloads_and_sigterm_leaves(mesh: LocalMesh) -> None:
    config = mesh.root / "a.toml"
    config.write_text('profile = "local"\n')
    mesh.start("a", sim="gpu:1x8GiB", extra=["--config", str(config)])
    mesh.start("b", join=["a"])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "b"]))
    proc = mesh.agents["a"].proc
    assert proc is not None
    log = mesh.agents["a"].log
    config.write_text('[scheduler]\npolicy = "nope"\n')  # refused; the agent keeps going
    proc.send_signal(signal.SIGHUP)
    mesh.wait_for("the refusal", lambda: "reload refused" in log.read_text())
    config.write_text('[scheduler]\npolicy = "best-fit"\n')
    proc.send_signal(signal.SIGHUP)
    mesh.wait_for("the reload", lambda: "reloaded policy=best-fit" in log.read_text())
    assert mesh.converged(["a", "b"])  # still in the mesh
    mesh.kill("b", signal.SIGTERM)
    mesh.wait_for("b to be seen as left", lambda: {r["name"]: r["state"] for r in
                  mesh.json("a", "nodes")}.get("b") == "left")


def test_a_device_that_falls_off_the_bus_ends_its_jobs(mesh: LocalMesh) -> None:
    load = mesh.root / "load.json"
    load.write_text("{}")
    mesh.start("a", sim="gpu:1x8GiB", extra=["--sim-load-file", str(load)])
    job_id = mesh.cli("a", "submit", "--gpu", "0.5", "--", "sleep", "300").stdout.strip()
    mesh.wait_for("running", lambda: mesh.json("a", "show", job_id)["state"] == "running")
    load.write_text('{"gpu0": {"lost": true}}')
    job = mesh.wait_for("the job to end", lambda: finished(mesh, "a", job_id))
    assert job["state"] == "lost" and "gpu0 is gone" in job["reason"]
    assert mesh.json("a", "devices") == []


def test_a_job_on_two_whole_devices_of_one_node(mesh: LocalMesh) -> None:
    mesh.start("a", sim="gpu:1x16GiB")
    mesh.start("b", sim="gpu:2x16GiB", join=["a"])
    mesh.start("d", join=["a"])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "b", "d"]))
    res = mesh.cli("d", "submit", "--devices", "2", "--memory", "1GiB", "-o", "json", "--",
                   "sh", "-c", 'echo "on $FLEXMESH_DEVICE"')
    job_id = json.loads(res.stdout)["id"]
    job = mesh.wait_for("the job to end", lambda: finished(mesh, "d", job_id))
    assert job["state"] == "succeeded", job
    assert job["node"] == "b" and sorted(job["devices"]) == ["gpu0", "gpu1"]
    assert job["count"] == 2 and job["compute_milli"] == 1000
    assert mesh.cli("d", "logs", job_id).stdout == f"on {','.join(job['devices'])}\n"
    bad = mesh.cli("d", "submit", "--devices", "2", "--gpu", "0.5", "--", "true", check=False)
    assert bad.returncode == 2 and "whole devices" in bad.stderr


def test_a_gang_runs_one_member_on_each_node(mesh: LocalMesh) -> None:
    mesh.start("a", sim="gpu:1x16GiB")
    mesh.start("b", sim="gpu:1x16GiB", join=["a"])
    mesh.start("c", sim="gpu:1x16GiB", join=["a"])
    mesh.start("d", join=["a"])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "b", "c", "d"]))
    res = mesh.cli("d", "submit", "--gang", "3", "--gpu", "0.5", "--memory", "1GiB",
                   "--wait", "-o", "json", "--", "sh", "-c",
                   'echo "rank $FLEXMESH_GANG_RANK of $FLEXMESH_GANG_SIZE on '
                   '$FLEXMESH_GANG_NODES"')
    gang = json.loads(res.stdout)
    assert gang["state"] == "succeeded", gang
    members = gang["members"]
    nodes = [m["node"] for m in members]
    assert sorted(nodes) == ["a", "b", "c"]
    for rank, m in enumerate(members):
        assert m["id"] == f"{gang['id']}.{rank}" and m["state"] == "succeeded"
        out = mesh.cli("d", "logs", m["id"]).stdout
        assert out == f"rank {rank} of 3 on {','.join(nodes)}\n"
    shown = mesh.json("d", "show", gang["id"])
    assert shown["state"] == "succeeded" and len(shown["members"]) == 3
    # more members than nodes to lend: it waits whole, and a cancel ends every member
    res = mesh.cli("d", "submit", "--gang", "4", "--gpu", "0.5", "-o", "json", "--", "true")
    big = json.loads(res.stdout)["id"]
    mesh.wait_for("the gang to be found too big", lambda: "nothing of the gang" in
                  mesh.json("d", "show", big)["reason"] or None)
    mesh.cli("d", "cancel", big)
    done = mesh.wait_for("the gang to end", lambda: finished(mesh, "d", big))
    assert done["state"] == "cancelled"
    assert {m["state"] for m in done["members"]} == {"cancelled"}


def test_a_frozen_loop_counts_as_loop_lag(mesh: LocalMesh) -> None:
    """A stopped process (as a machine under load stalls it) finds its timer late when it
    runs again: the runtime tells the membership, which counts it and slows its probes."""
    a = mesh.start("a")
    assert a.proc is not None
    before = mesh.json("a", "status")["status"]["counters"].get("loop_lag_events", 0)
    a.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.5)  # the frozen interval itself, not a wait for a result
    finally:
        a.proc.send_signal(signal.SIGCONT)
    mesh.wait_for("the lag to be counted", lambda: mesh.json("a", "status")["status"]
                  ["counters"].get("loop_lag_events", 0) > before)
