"""The sans-IO node driven by hand: owner-side corner cases that a mesh rarely shows."""

from __future__ import annotations

import random

from flexmesh.agent.devices.base import Device
from flexmesh.agent.models import CANCELLED, JobRecord
from flexmesh.agent.node import Call, Node, NodeConfig, PersistJob, PersistRun, RunJob, StopJob
from flexmesh.protocol import facts, wire
from flexmesh.protocol.lease import Lease
from flexmesh.protocol.membership import SendPacket


def gpu(i: int) -> Device:
    return Device(f"GPU-{i:08x}-1234-5678-9abc-def012345678", "gpu", "NVIDIA H100 80GB HBM3",
                  81559, "nvml")


def owner(n: int = 8) -> Node:
    node = Node(NodeConfig("owner", "127.0.0.1:7946"), random.Random(1), 0.0)
    node.set_devices([gpu(i) for i in range(n)], {}, 0.0)
    node.drain()
    return node


def lease(node: Node, job: str, device: str, compute: int = 100, term: int = 1) -> wire.Message:
    req = wire.LeaseRequest(job, "origin", device, compute, 1024, term, "coord", [], 0, True)
    return node.handle_request(req, 1.0)


def test_facts_listing_preemptible_jobs_still_fit_one_datagram() -> None:
    node = owner()
    for j in range(40):
        reply = lease(node, f"{j:012x}", gpu(j % 8).id)
        assert isinstance(reply, wire.LeaseReply) and reply.granted
    me = node.membership.me
    payload = wire.encode_message(wire.Facts(me.name, me.incarnation, me.facts_version,
                                             me.facts))
    assert len(payload) + wire.packet_overhead(1) <= wire.UDP_BUDGET
    assert 0 < len(me.facts["pre"]) <= 16


def test_a_job_stopped_while_its_process_starts_is_killed_once_it_exists() -> None:
    node = owner(1)
    reply = lease(node, "j1", gpu(0).id, compute=1000)
    assert isinstance(reply, wire.LeaseReply) and reply.granted
    assert reply.devices == [gpu(0).id]
    start = wire.StartJob("j1", reply.lease_id, reply.token, "origin", ["sleep", "9"], {},
                          1000, 1024)
    assert isinstance(node.handle_request(start, 2.0), wire.Ok)
    node.drain()
    node.stop_job("j1", "cancelled by its submitter", CANCELLED, 2.5)
    assert node.owner.runs["j1"].state == CANCELLED
    assert node.leases.free(gpu(0).id)[0] == 1000  # given back at once
    node.job_started("j1", 4242, None, 3.0)  # the runtime had already spawned it
    stops = [e for e in node.drain() if isinstance(e, StopJob)]
    assert [s.job_id for s in stops] == ["j1"]


def test_gossip_rows_that_repeat_a_device_or_claim_nothing_are_dropped() -> None:
    node = owner(1)
    row = [gpu(0).id, "gpu", "m", 81559, 1000, 0, 0, 1000, 81559, "nvml", True, "none"]
    empty = ["gpu9", "gpu", "m", 81559, 0, 0, 0, 0, 0, "nvml", True, "none"]
    node.membership.handle_alive(wire.Alive("peer", "127.0.0.1:7947", 0), 1.0)
    node.membership.handle_facts(wire.Facts("peer", 0, 1, {"dev": [row, row, empty]}))
    assert [d["id"] for d in node.views.devices() if d["node"] == "peer"] == [gpu(0).id]


def test_a_submit_that_cannot_be_placed_is_refused_by_the_coordinator() -> None:
    node = Node(NodeConfig("coord", "127.0.0.1:7946"), random.Random(1), 0.0)
    node.tick(0.0)
    for _ in range(40):  # alone: it elects itself once the join grace is over
        node.tick(node.next_deadline())
    assert node.is_coordinator
    bad = wire.Submit("j", "o", 500, 0, "gpu", 0, 0, 2)  # fractions of several devices
    reply = node.handle_request(bad, node._now)
    assert isinstance(reply, wire.Error) and "cannot be placed" in reply.reason


def test_a_local_job_preempted_while_starting_is_stopped_not_run() -> None:
    """Reclaimed between RunJob and its process starting: it is requeued, and the process
    that the runtime was already spawning is stopped when it reports in."""
    node = Node(NodeConfig("solo", "127.0.0.1:7946"), random.Random(1), 0.0)
    node.set_devices([gpu(0)], {}, 0.0)
    for _ in range(40):
        node.tick(node.next_deadline())
    assert node.is_coordinator
    job = JobRecord(id="j1", origin="solo", command=["sleep", "9"], compute_milli=500,
                    memory_mib=1024, preemptible=True)
    node.submit(job, node._now)
    runs = [e for e in node.drain() if isinstance(e, RunJob)]
    assert len(runs) == 1
    lease_id = runs[0].job.lease_id
    node.set_devices([gpu(0)], {gpu(0).id: (0, 0)}, node._now)  # the owner's own work takes it all
    assert node.origin.jobs["j1"].state == "queued"
    node.job_started("j1", 4242, None, node._now, lease_id=lease_id)
    assert node.origin.jobs["j1"].state == "queued"
    assert node.owner.runs["j1"].state == "preempted" and node.owner.runs["j1"].pid is None
    assert [e.job_id for e in node.drain() if isinstance(e, StopJob)] == ["j1"]
    node.job_exited("j1", 143, "terminated", node._now)  # the stale process ends
    assert node.origin.jobs["j1"].state == "queued"


def test_a_member_back_after_being_forgotten_is_elected_on_its_facts() -> None:
    """Its Alive arrives before its facts: the election first sees defaults (eligible),
    then must run again on its facts even though they equal what it read before the member
    was forgotten."""
    node = Node(NodeConfig("m", "127.0.0.1:7946"), random.Random(1), 0.0)
    members = node.membership

    def settle() -> None:
        node._after_input(node._now)
        node.drain()

    members.handle_alive(wire.Alive("c", "127.0.0.1:7948", 0), 0.0)
    members.handle_facts(wire.Facts("c", 0, 1, {"prio": 0, "elig": True, "claim": 5,
                                                "mt": 5}))
    settle()
    laptop = {"prio": 0, "elig": False, "claim": 0, "mt": 5}  # never coordinator
    members.handle_alive(wire.Alive("0b", "127.0.0.1:7947", 0), 0.0)
    members.handle_facts(wire.Facts("0b", 0, 1, laptop))
    settle()
    assert node.belief.coordinator == "c"
    members.handle_dead(wire.Dead("0b", 0, "0b"), 0.0)
    settle()
    del members.members["0b"]  # reaped, as the membership does long after
    members.handle_alive(wire.Alive("0b", "127.0.0.1:7947", 1), 1.0)
    settle()
    members.handle_facts(wire.Facts("0b", 1, 1, laptop))
    settle()
    assert node.belief.coordinator == "c"


def test_a_placed_job_read_back_after_a_restart_is_started_again() -> None:
    node = Node(NodeConfig("desk", "127.0.0.1:7946"), random.Random(1), 0.0)
    job = JobRecord(id="j1", origin="desk", command=["true"], compute_milli=500,
                    memory_mib=0, state="placed", node="owner",
                    devices=("gpu0",), lease_id="owner/7", token=7, term=1)
    node.recover([job], [], [], lambda j: False, 0.0)
    node.membership.handle_alive(wire.Alive("owner", "127.0.0.1:7947", 0), 0.0)
    node.tick(1.0)
    starts = [e.msg for e in node.drain()
              if isinstance(e, Call) and isinstance(e.msg, wire.StartJob)]
    assert [(m.job_id, m.lease_id, m.token) for m in starts] == [("j1", "owner/7", 7)]


def test_an_owner_stops_only_jobs_below_the_requests_priority() -> None:
    node = owner(1)
    req = wire.LeaseRequest("low", "origin", gpu(0).id, 500, 1024, 1, "coord", [], 3, True)
    assert isinstance(node.handle_request(req, 1.0), wire.LeaseReply)
    same = node.handle_request(wire.Preempt(["low"], "room", 1, "coord", 3), 2.0)
    assert isinstance(same, wire.Error)  # priority 3 does not stop priority 3
    assert node.leases.active()
    higher = node.handle_request(wire.Preempt(["low"], "room", 1, "coord", 4), 2.0)
    assert isinstance(higher, wire.Ok)
    assert not node.leases.active()  # reserved, not started: given back at once


def test_no_second_run_of_a_job_starts_while_its_first_process_lives() -> None:
    """A run stopped while its process was being spawned ends at once on the books, but
    the process may exist: a new placement of the job here waits until it has exited."""
    node = owner(1)
    first = lease(node, "j1", gpu(0).id, compute=500)
    assert isinstance(first, wire.LeaseReply) and first.granted
    start = wire.StartJob("j1", first.lease_id, first.token, "origin", ["sleep", "9"], {},
                          500, 1024)
    assert isinstance(node.handle_request(start, 2.0), wire.Ok)
    assert [type(e) for e in node.drain() if isinstance(e, RunJob)] == [RunJob]  # spawning
    node.stop_job("j1", "reclaimed", "preempted", 2.1)  # before the process reported in
    assert node.owner.runs["j1"].state == "preempted"
    again = lease(node, "j1", gpu(0).id, compute=500)
    assert isinstance(again, wire.LeaseReply) and again.granted
    restart = wire.StartJob("j1", again.lease_id, again.token, "origin", ["sleep", "9"], {},
                            500, 1024)
    refused = node.handle_request(restart, 2.2)
    assert isinstance(refused, wire.Error) and "has not ended" in refused.reason
    node.drain()
    node.job_started("j1", 4242, None, 2.3, lease_id=first.lease_id)  # the stale one
    assert [e.job_id for e in node.drain() if isinstance(e, StopJob)] == ["j1"]
    node.job_exited("j1", 143, "terminated", 2.4)
    assert isinstance(node.handle_request(restart, 2.5), wire.Ok)
    runs = [e for e in node.drain() if isinstance(e, RunJob)]
    assert [r.job.lease_id for r in runs] == [again.lease_id]


def test_a_run_ended_before_its_start_left_the_node_starts_no_process() -> None:
    """Started and stopped within one input (the owner's own load took the device back):
    the RunJob is taken back before the runtime sees it."""
    node = owner(1)
    reply = lease(node, "j1", gpu(0).id, compute=500)
    assert isinstance(reply, wire.LeaseReply) and reply.granted
    start = wire.StartJob("j1", reply.lease_id, reply.token, "origin", ["sleep", "9"], {},
                          500, 1024)
    assert isinstance(node.handle_request(start, 2.0), wire.Ok)
    node.set_devices([gpu(0)], {gpu(0).id: (0, 0)}, 2.0)  # reclaimed, same instant
    effects = node.drain()
    assert not [e for e in effects if isinstance(e, RunJob | StopJob)]
    assert node.owner.runs["j1"].state == "preempted" and not node.leases.active()


def test_an_owner_refuses_to_start_a_job_whose_id_cannot_name_a_directory() -> None:
    node = owner(1)
    for bad in ("..", "a/b", "./..", "x\0y", "x\ny", "\x1b[2J", "j" * 201, "é" * 101):
        reply = lease(node, bad, gpu(0).id, compute=100)
        assert isinstance(reply, wire.LeaseReply) and not reply.granted
        assert "invalid job id" in reply.reason
        # a lease granted by some other way (an older owner) still starts nothing
        held = node.leases.request(job_id=bad, device=gpu(0).id, compute_milli=100,
                                   memory_mib=0, term=1, coordinator="c", origin="o",
                                   now=1.0, ttl=15.0)
        assert isinstance(held, Lease)
        start = wire.StartJob(bad, held.id, held.token, "origin", ["true"], {}, 100, 0)
        refused = node.handle_request(start, 2.0)
        assert isinstance(refused, wire.Error) and "invalid job id" in refused.reason, bad
    assert not [e for e in node.drain() if isinstance(e, RunJob)]


def test_an_origin_drops_a_job_sync_answer_bigger_than_it_asks_for() -> None:
    from flexmesh.agent.node import JobOutput
    from flexmesh.agent.node.follow import SYNC_CHUNK

    node = Node(NodeConfig("desk", "127.0.0.1:7946"), random.Random(1), 0.0)
    job = JobRecord(id="j1", origin="desk", command=["true"], compute_milli=500,
                    memory_mib=0, state="running", node="owner",
                    devices=("gpu0",), lease_id="owner/7", token=7, term=1)
    node.membership.handle_alive(wire.Alive("owner", "127.0.0.1:7947", 0), 0.0)
    node.recover([job], [], [], lambda j: False, 0.0)
    (sync,) = [e for e in node.drain() if isinstance(e, Call) and isinstance(e.msg, wire.JobSync)]
    huge = wire.JobSyncReply("running", "", None, b"x" * (SYNC_CHUNK + 1), b"", False)
    node.call_result(sync.call_id, huge, "", 1.0)
    assert not [e for e in node.drain() if isinstance(e, JobOutput)]
    assert node.counters["job_sync_invalid"] == 1
    # nor a state no agent has (a hostile or broken owner), nor a reason of megabytes
    for n, bad in enumerate((wire.JobSyncReply("pwned", "", 0, b"", b"", True),
                             wire.JobSyncReply("failed", "r" * 10**6, 1, b"", b"", True))):
        node.tick(5.0 + 5 * n)
        (sync,) = [e for e in node.drain()
                   if isinstance(e, Call) and isinstance(e.msg, wire.JobSync)]
        node.call_result(sync.call_id, bad, "", 5.0 + 5 * n)
        assert node.origin.jobs["j1"].state == "running"
        assert node.counters["job_sync_invalid"] == 2 + n


def _following(stdout: bytes) -> tuple[Node, wire.JobSync]:
    """``desk`` follows j1 on ``owner`` and has just been given ``stdout`` of it."""
    node = Node(NodeConfig("desk", "127.0.0.1:7946"), random.Random(1), 0.0)
    job = JobRecord(id="j1", origin="desk", command=["true"], compute_milli=500,
                    memory_mib=0, state="running", node="owner",
                    devices=("gpu0",), lease_id="owner/7", token=7, term=1)
    node.membership.handle_alive(wire.Alive("owner", "127.0.0.1:7947", 0), 0.0)
    node.recover([job], [], [], lambda j: False, 0.0)
    (sync,) = [e for e in node.drain() if isinstance(e, Call) and isinstance(e.msg, wire.JobSync)]
    node.call_result(sync.call_id, wire.JobSyncReply("running", "", None, stdout, b"", False),
                     "", 1.0)
    (nxt,) = [e for e in node.drain() if isinstance(e, Call) and isinstance(e.msg, wire.JobSync)]
    assert isinstance(nxt.msg, wire.JobSync)
    return node, nxt.msg


def test_output_that_could_not_be_written_is_asked_for_again() -> None:
    node, asked = _following(b"hello\n")
    assert asked.stdout_offset == 6
    node.output_failed("j1", "stdout", 0, 1.0)  # a full disk: the 6 bytes are not here
    node.tick(1.1)
    assert not [e for e in node.drain() if isinstance(e, Call)]  # a pause first
    node.tick(4.0)
    (again,) = [e for e in node.drain() if isinstance(e, Call)]
    assert isinstance(again.msg, wire.JobSync) and again.msg.stdout_offset == 0
    assert node.counters["job_output_unwritten"] == 1


def test_an_owner_answers_a_job_sync_for_a_job_it_does_not_run() -> None:
    node = owner(1)
    unknown = node.sync_reply(wire.JobSync("nope", 0, 0, 0), b"", b"", 1024, 0.0)
    assert isinstance(unknown, wire.JobSyncReply) and unknown.state == "lost"
    assert unknown.complete and "no record of job nope" in unknown.reason
    reply = lease(node, "j1", gpu(0).id, compute=100)
    assert isinstance(reply, wire.LeaseReply) and reply.granted
    placed = node.sync_reply(wire.JobSync("j1", 0, 0, 0), b"", b"", 1024, 0.0)
    assert isinstance(placed, wire.JobSyncReply) and placed.state == "placed"  # not yet run
    for offsets in ((-1, 0), (0, 2**63)):
        bad = node.sync_reply(wire.JobSync("j1", *offsets, 0), b"", b"", 1024, 0.0)
        assert isinstance(bad, wire.Error) and "offsets" in bad.reason


# --- a ghost member draws no placements (issue 11) ----------------------------------------


def announce(node: Node, name: str, address: str, memory_mib: int, now: float) -> list[object]:
    """Gossip, as any peer could forge it: ``name`` is alive at ``address`` with one device
    of ``memory_mib``, all of it free. Returns the node's effects."""
    dev = facts.DeviceFact("gpu0", "gpu", "sim-gpu", memory_mib, 1000, 0, 0, 1000, memory_mib,
                           "sim", True)
    data = facts.NodeFacts((dev,)).encode()
    node.step_packet(address, wire.encode_packet(
        [wire.Alive(name, address, 0), wire.Facts(name, 0, 0, data)]), now)
    return list(node.drain())


def lease_asks(effects: list[object]) -> list[str]:
    return [e.node for e in effects if isinstance(e, Call) and isinstance(e.msg, wire.LeaseRequest)]


def test_a_member_only_heard_of_in_gossip_draws_no_placement() -> None:
    """A ghost (an address nobody listens on) claiming a device of 4 PiB: before members
    had to answer a probe, the coordinator asked the ghost for every lease that fit it."""
    coord = Node(NodeConfig("coord", "10.0.0.1:7946"), random.Random(1), 0.0)
    coord.tick(0.1)
    assert coord.is_coordinator
    coord.drain()
    announce(coord, "owner", "10.0.0.2:7946", 16384, 1.0)
    coord.tick(1.0)  # the coordinator pings whom it hears of once the input is done with
    real = list(coord.drain())
    ping = next(m for e in real if isinstance(e, SendPacket) and e.addr == "10.0.0.2:7946"
                for m in wire.decode_packet(e.data) if isinstance(m, wire.Ping))
    coord.step_packet("10.0.0.2:7946", wire.encode_packet([wire.Ack(ping.seq, "owner")]), 1.1)
    assert coord.membership.members["owner"].confirmed
    announce(coord, "ghost", "10.6.6.6:7946", facts.MAX_MIB, 1.2)
    assert not coord.membership.members["ghost"].confirmed
    asks: list[str] = []
    for i, memory in enumerate((65536, 1024, 1 << 30)):
        coord.handle_request(wire.Submit(f"j{i}", "coord", 500, memory, "gpu", 0, 0), 2.0)
        asks += lease_asks(list(coord.drain()))
    for t in range(20):  # ten seconds: the ghost never answers its pings or probes
        coord.tick(2.5 + t / 2)
        asks += lease_asks(list(coord.drain()))
    assert asks == ["owner"]  # the job of 1 GiB; the others wait
    assert coord.scheduler.queue and "ghost" not in coord.coordinator.candidates_by_node()


def test_a_job_run_where_it_was_submitted_is_a_job_and_a_run() -> None:
    """The origin keeps what the user asked (a request in proportion stays so); the owner
    keeps the run (its lease's share, its process) and tells the origin of it at once."""
    node = Node(NodeConfig("solo", "127.0.0.1:7946"), random.Random(1), 0.0)
    node.set_devices([gpu(0)], {}, 0.0)
    for _ in range(40):
        node.tick(node.next_deadline())
    job = JobRecord(id="j1", origin="solo", command=["true"], compute_milli=0,
                    memory_mib=4096, uid=1000)
    node.submit(job, node._now)
    effects = node.drain()
    (start,) = [e for e in effects if isinstance(e, RunJob)]
    run = node.owner.runs["j1"]
    assert run is not job and start.job == run
    # (4096 of 81559 MiB: 51 milli, rounded up)
    assert (job.compute_milli, run.compute_milli, run.memory_mib) == (0, 51, 4096)
    assert job.devices == run.devices == (gpu(0).id,) and run.uid == 1000
    assert job.state == "placed" and run.attempts == 1 and job.attempts == 0
    node.job_started("j1", 4242, 17, node._now, lease_id=run.lease_id)
    assert job.state == run.state == "running" and run.pid == 4242
    node.job_exited("j1", 0, "exited with code 0", node._now, None)
    assert job.state == run.state == "succeeded" and job.exit_code == 0
    written = node.drain()
    assert [e.job.state for e in written if isinstance(e, PersistJob)][-1] == "succeeded"
    assert [e.run.state for e in written if isinstance(e, PersistRun)][-1] == "succeeded"
    assert node.views.status().jobs == {("succeeded", "both"): 1}


def test_a_cancel_of_a_job_run_here_is_journaled_and_resumed_after_a_restart() -> None:
    """A local job's cancel stops its process at once, but the stop takes up to the grace
    (a job that ignores SIGTERM all of it): an agent killed in between adopts the run back
    and must stop it again, not let it run on to be reported succeeded."""
    node = Node(NodeConfig("solo", "127.0.0.1:7946"), random.Random(1), 0.0)
    node.set_devices([gpu(0)], {}, 0.0)
    for _ in range(40):
        node.tick(node.next_deadline())
    node.submit(JobRecord(id="j1", origin="solo", command=["sleep", "99"],
                          compute_milli=500, memory_mib=1024), node._now)
    (start,) = [e for e in node.drain() if isinstance(e, RunJob)]
    node.job_started("j1", 4242, 17, node._now, lease_id=start.job.lease_id)
    node.drain()
    assert node.cancel("j1", node._now) == "cancelling"
    written = node.drain()
    assert [e.job_id for e in written if isinstance(e, StopJob)] == ["j1"]
    (job,) = [e.job for e in written if isinstance(e, PersistJob)]
    assert job.cancel_requested and job.state == "running"
    run, leases = node.owner.runs["j1"], list(node.leases.leases.values())
    # kill -9 now; the process ignores SIGTERM and lives on: the next agent adopts it
    after = Node(NodeConfig("solo", "127.0.0.1:7946"), random.Random(2), 10.0)
    after.set_devices([gpu(0)], {}, 10.0)
    after.recover([job], [run], leases, lambda r: True, 10.0)
    stops = [e for e in after.drain() if isinstance(e, StopJob)]
    assert [(s.job_id, s.state) for s in stops] == [("j1", CANCELLED)]
    after.job_exited("j1", 137, "killed by signal 9 (SIGKILL)", 14.0)
    assert after.origin.jobs["j1"].state == CANCELLED
