"""Real agent processes on 127.0.0.1: submit through the CLI, lend a GPU fraction across
nodes, read the output back at the submitter, survive kill -9 of the coordinator."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time

import pytest

from flexmesh.agent import supervise
from flexmesh.agent.localmesh import LocalMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")



def finished(mesh: LocalMesh, node: str, job_id: str) -> dict[str, object] | None:
    job: dict[str, object] = mesh.json(node, "show", job_id)
    return job if job["state"] in TERMINAL else None


def submitted(mesh: LocalMesh, node: str, *flags: str) -> str:
    """The id of a job submitted with ``flags`` to run ``true``."""
    job_id: str = json.loads(mesh.cli(node, "submit", *flags, "-o", "json", "--", "true")
                             .stdout)["id"]
    return job_id


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
    assert res.returncode == 7 and "exited with code 7" in res.stderr

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
        (["--memory", "100TiB"], "larger than any device could be"),
    ]
    for flags, text in cases:
        res = mesh.cli("a", "submit", *flags, "--", "true", check=False)
        assert res.returncode == 2, (flags, res.stdout, res.stderr)
        assert text in res.stderr
    res = mesh.cli("a", "submit", "--gpu", "0.5", check=False)
    assert res.returncode == 2 and "command" in res.stderr
    assert mesh.cli("a", "show", "nope", check=False).returncode == 1


def test_a_job_that_ends_while_its_agent_is_down_ends_with_its_exit_code(
        mesh: LocalMesh) -> None:
    """kill -9 of the agent: the job runs on under its supervisor, which records how it
    ended; the restarted agent reads that, so the job is not lost although it ended
    while nobody watched."""
    mesh.start("solo", sim="gpu:1x8GiB")
    ok = mesh.cli("solo", "submit", "--gpu", "0.2", "--", "sh", "-c", "sleep 2").stdout.strip()
    bad = mesh.cli("solo", "submit", "--gpu", "0.2", "--", "sh", "-c", "sleep 2; exit 3"
                   ).stdout.strip()
    mesh.wait_for("running", lambda: all(mesh.json("solo", "show", j)["state"] == "running"
                                         for j in (ok, bad)))
    mesh.kill("solo", signal.SIGKILL)
    state = mesh.agents["solo"].dir / "state" / "jobs"
    mesh.wait_for("the jobs to end", lambda: all(
        supervise.recorded_exit(state / j) is not None for j in (ok, bad)), timeout=20)
    mesh.restart("solo")
    jobs = {j["id"]: j for j in mesh.json("solo", "jobs")}
    assert (jobs[ok]["state"], jobs[ok]["exit_code"]) == ("succeeded", 0), jobs[ok]
    assert (jobs[bad]["state"], jobs[bad]["exit_code"]) == ("failed", 3), jobs[bad]
    assert "while the agent was down" in jobs[bad]["reason"]


def test_journal_survives_kill_and_marks_vanished_jobs_lost(mesh: LocalMesh) -> None:
    mesh.start("solo", sim="gpu:1x8GiB")
    assert mesh.cli("solo", "submit", "--wait", "--gpu", "0.2", "--", "echo", "hi").stdout == "hi\n"
    (done_id,) = [j["id"] for j in mesh.json("solo", "jobs")]
    job_id = mesh.cli("solo", "submit", "--gpu", "0.5", "--", "sleep", "300").stdout.strip()
    mesh.wait_for("running", lambda: mesh.json("solo", "show", job_id)["state"] == "running")
    state = mesh.agents["solo"].dir / "state"
    mesh.kill("solo", signal.SIGKILL)
    # The job's process vanishes while the agent is down.
    from flexmesh.agent.store import Journal

    j = Journal(state / "journal.sqlite3")
    pid = next(x.pid for x in j.list_runs() if x.id == job_id)
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
    os.unlink(mesh.agents["a"].socket)  # a socket deleted by mistake comes back on SIGHUP
    proc.send_signal(signal.SIGHUP)
    mesh.wait_for("the socket again", lambda: "made it again" in log.read_text())
    assert mesh.json("a", "status")["status"]["name"] == "a"
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
    shown = mesh.cli("d", "show", job_id[:5]).stdout  # a unique prefix names the job
    assert job_id in shown and ", ".join(job["devices"]) in shown  # type: ignore[arg-type]
    assert "[" not in shown and "None" not in shown and "{" not in shown
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
    mesh.wait_for("the gang to be found too big", lambda: "impossible: a gang of 4" in
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


def test_a_second_agent_with_a_taken_name_is_refused_on_both_sides(mesh: LocalMesh) -> None:
    a = mesh.start("a", sim="gpu:1x8GiB")
    mesh.start("b", join=["a"])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "b"]))
    impostor = mesh.start("imp", join=["a"], extra=["--name", "a"])
    for who in (a, impostor):
        mesh.wait_for(f"{who.name} to log the conflict",
                      lambda who=who: "name conflict: a is at" in who.log.read_text())
    assert a.addr in impostor.log.read_text() and impostor.addr in a.log.read_text()
    rows = {r["name"]: r for r in mesh.json("b", "nodes")}
    assert rows["a"]["address"] == a.addr and rows["a"]["state"] == "alive"
    assert mesh.coordinator("b") == mesh.coordinator("a")
    assert [r["name"] for r in mesh.json("imp", "nodes")] == ["a"]  # it joined nothing
    assert len(mesh.json("b", "devices")) == 1  # a's GPU is still seen


def test_ordinary_events_log_no_errors(mesh: LocalMesh) -> None:
    """A job that exits at once, a reader that stops following, an owner that stops during
    a long poll: none of these is an error in either agent's log."""
    mesh.start("a", sim="gpu:1x8GiB")
    mesh.start("d", join=["a"])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "d"]))
    quick = json.loads(mesh.cli("d", "submit", "-o", "json", "--", "true").stdout)["id"]
    slow = json.loads(mesh.cli("d", "submit", "-o", "json", "--", "sh", "-c",
                               "echo one; exec sleep 60").stdout)["id"]
    env = {**os.environ, "FLEXMESH_SOCKET": mesh.agents["d"].socket}
    reader = subprocess.Popen([sys.executable, "-m", "flexmesh.agent.cli", "logs", "--follow",
                               slow], env=env, stdout=subprocess.PIPE)
    try:
        assert reader.stdout is not None and reader.stdout.readline() == b"one\n"
    finally:
        reader.kill()
        reader.wait()
        if reader.stdout is not None:
            reader.stdout.close()
    mesh.wait_for("the quick job", lambda: finished(mesh, "d", quick))
    mesh.kill("a", signal.SIGTERM)  # the owner stops while d long-polls the slow job
    mesh.wait_for("a to be seen as left", lambda: {r["name"]: r["state"] for r in
                  mesh.json("d", "nodes")}.get("a") == "left")
    for name in ("a", "d"):
        text = mesh.agents[name].log.read_text()
        assert not [line for line in text.splitlines()
                    if "level=error" in line or "Traceback" in line], (name, text[-2000:])


def test_an_operator_sees_the_jobs_running_here_for_others(mesh: LocalMesh) -> None:
    mesh.start("a", sim="gpu:1x16GiB")
    mesh.start("d", join=["a"])
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "d"]))
    res = mesh.cli("d", "submit", "--gpu", "0.25", "-o", "json", "--", "sleep", "60")
    job_id = json.loads(res.stdout)["id"]
    mesh.wait_for("the job to run",
                  lambda: mesh.json("d", "show", job_id)["state"] == "running")
    assert mesh.json("a", "jobs") == []  # nothing was submitted on a
    (run,) = mesh.json("a", "jobs", "--here")
    assert (run["id"], run["origin"], run["state"]) == (job_id, "d", "running")
    assert run["memory_mib"] == 4096 and run["compute_milli"] == 250  # what it holds
    assert run["user"] == ("nobody" if os.geteuid() == 0 else
                           pwd.getpwuid(os.geteuid()).pw_name)
    text = mesh.cli("a", "jobs", "--here").stdout
    assert "ORIGIN" in text and job_id in text and " d " in text
    # A simulated device reports the load it is configured with: the job's lease.
    mesh.wait_for("the job's use to be read", lambda: mesh.json("a", "jobs", "--here")[0][
        "device_use"] == {"memory_mib": 4096, "utilization_pct": 25})
    devices = {(r["node"], r["id"]): r for r in mesh.json("d", "devices")}
    assert devices[("a", "gpu0")]["jobs"] is None  # another node's: d cannot tell
    mine = {r["id"]: r for r in mesh.json("a", "devices")}
    assert mine["gpu0"]["jobs"] == [job_id]
    assert job_id in mesh.cli("a", "devices").stdout
    mesh.cli("d", "cancel", job_id)


def test_a_job_no_device_could_hold_fails_after_the_grace(
        mesh: LocalMesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """Submitted on a node that is not the coordinator: the failure reaches the origin;
    one submitted to wait for capacity waits on, told why."""
    monkeypatch.setenv("FLEXMESH_IMPOSSIBLE_GRACE", "1")
    mesh.start("a", sim="gpu:1x8GiB")
    mesh.start("z", join=["a"], extra=["--priority", "10"])  # deviceless, never coordinator
    mesh.wait_for("convergence", lambda: mesh.converged(["a", "z"]))
    waits = submitted(mesh, "z", "--kind", "npu", "--wait-for-capacity")
    res = mesh.cli("z", "submit", "--wait", "--gpu", "0.5", "--memory", "64GiB", "--", "true",
                   check=False)
    assert res.returncode == 1 and res.stdout == ""
    assert ("failed on -/-: impossible: 64 GiB of memory asked per device; the largest device "
            "in the mesh has 8 GiB") in res.stderr
    job_id = submitted(mesh, "z", "--kind", "npu")
    job = mesh.wait_for("the job to fail", lambda: finished(mesh, "z", job_id))
    assert (job["state"], job["reason"]) == ("failed", "impossible: no npu device in the mesh")
    job = mesh.wait_for("the reason at the origin", lambda: (lambda j: j if "impossible" in
                        j["reason"] else None)(mesh.json("z", "show", waits)))
    assert job["state"] == "queued"
    assert job["reason"] == "impossible: no npu device in the mesh (waiting for capacity)"
