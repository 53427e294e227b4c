"""A deterministic, seeded simulator that runs real ``agent.node`` code in virtual time.

Theory of operation
-------------------
Every node is the production ``Node``; only the world around it is simulated: a network
that loses, delays, duplicates and reorders datagrams, TCP calls that fail across a cut,
processes that run for as long as their ``sleep N`` command says. One event heap orders
everything by (virtual time, sequence number), and all randomness comes from one
``random.Random(seed)``, so a seed replays exactly.

Faults are one line each: ``cut(a, b)``, ``isolate(n)``, ``heal()``, ``crash(n)``,
``restart(n)``, ``stall(n, seconds)``, ``disk_full(n, seconds)``. Calls between agents
go through the wire codec and may be lost (``LinkFaults.call_loss``) or delayed out of
order (``call_jitter``); an origin follows a job it placed elsewhere with ``JobSync``
calls over that network, as real agents do, and a simulated process writes output that
the origin must get back exactly once.
``check()`` verifies the invariants after every step (see ``invariants``).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, assert_never

from flexmesh.agent.devices.base import Device
from flexmesh.agent.models import JobRecord, RunRecord, gang_members
from flexmesh.agent.node import (
    ArchiveOutput,
    Call,
    CollectResults,
    Effect,
    ForgetJob,
    ForgetLease,
    ForgetRun,
    JobOutput,
    LogEvent,
    Node,
    NodeConfig,
    PersistJob,
    PersistLease,
    PersistRun,
    RunJob,
    StopJob,
)
from flexmesh.agent.simcheck import InvariantError, check_start, check_world
from flexmesh.agent.simlog import SimLog
from flexmesh.agent.simnet import LinkFaults, SimNetwork
from flexmesh.agent.simpower import PowerState, SimPower, no_battery
from flexmesh.agent.simviews import SimViews
from flexmesh.protocol.lease import Lease
from flexmesh.protocol.membership import (
    PRESETS,
    Config,
    FactsEvent,
    MemberEvent,
    NameConflict,
    SendPacket,
    StartPushPull,
)


@dataclass
class _SimNode:
    node: Node
    devices: list[Device]
    config: NodeConfig
    up: bool = True
    stalled_until: float = 0.0
    disk_full_until: float = 0.0  # until then, output received here cannot be written
    load: dict[str, tuple[int, int]] = field(default_factory=dict)  # device -> owner's own use
    power: PowerState = field(default_factory=no_battery)  # its battery, as last read
    # journal meta: the last fencing token and highest term (outlive forgotten leases)
    disk_token: int = 0
    disk_max_term: int = 0
    tokens: dict[int, str] = field(default_factory=dict)  # every token handed out -> lease
    tick_at: float = -1.0
    incarnation: int = 0
    processes: dict[str, float] = field(default_factory=dict)  # job -> end time
    process_lease: dict[str, str] = field(default_factory=dict)  # job -> run it belongs to
    adopted: set[str] = field(default_factory=set)  # processes an earlier instance started
    # What the node journaled: survives a crash, read back on restart (as SQLite would).
    disk_jobs: dict[str, JobRecord] = field(default_factory=dict)
    disk_runs: dict[str, RunRecord] = field(default_factory=dict)
    disk_leases: dict[str, Lease] = field(default_factory=dict)
    logs: dict[str, SimLog] = field(default_factory=dict)  # owner: output of each job run
    # origin: output received of each job (by stream), and of its earlier attempts
    received: dict[str, dict[str, bytearray]] = field(default_factory=dict)
    archived: dict[str, list[dict[str, bytearray]]] = field(default_factory=dict)


class Simulator(SimNetwork, SimViews, SimPower):
    def __init__(self, seed: int, faults: LinkFaults | None = None,
                 membership: Config | None = None, **node_options: Any) -> None:
        """``node_options``: NodeConfig fields every node gets (e.g. ``keep_finished``)."""
        self.node_options = node_options
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults or LinkFaults()
        self.membership = membership or PRESETS["lan"]
        self.now = 0.0
        self.nodes: dict[str, _SimNode] = {}
        self.by_addr: dict[str, str] = {}
        self.cuts: set[frozenset[str]] = set()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.stats: dict[str, int] = {"packets": 0, "bytes": 0, "dropped": 0}
        self.submitted: set[str] = set()
        self.runs: list[tuple[str, str, dict[str, str]]] = []  # (node, job, env) per start

    # --- building the world -------------------------------------------------------------

    def add_node(self, name: str, devices: list[Device] | None = None,
                 join: list[str] | None = None, priority: int = 0) -> Node:
        addr = f"10.0.{len(self.nodes) // 250}.{len(self.nodes) % 250 + 1}:7946"
        config = NodeConfig(name=name, addr=addr, membership=self.membership,
                            priority=priority, **self.node_options)
        node = Node(config, random.Random(self.rng.getrandbits(64)), self.now)
        sim = _SimNode(node, list(devices or []), config)
        node.set_devices(sim.devices, {}, self.now)
        self.nodes[name] = sim
        self.by_addr[addr] = name
        if join:
            node.join([self.nodes[j].config.addr for j in join], self.now)
        self._pump(name)
        return node

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn))

    # --- faults -------------------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        self.cuts.add(frozenset((a, b)))

    def isolate(self, n: str) -> None:
        for other in self.nodes:
            if other != n:
                self.cut(n, other)

    def partition(self, side: set[str]) -> None:
        for a in side:
            for b in self.nodes:
                if b not in side:
                    self.cut(a, b)

    def heal(self) -> None:
        self.cuts.clear()

    def crash(self, n: str) -> None:
        sim = self.nodes[n]
        sim.up = False
        for job_id in sim.processes:
            sim.logs[job_id].stop(self.now)
        sim.processes.clear()

    def leave(self, n: str) -> None:
        """A graceful stop: the node says it leaves, then goes down; its jobs' processes
        go on (as under systemd's KillMode=process) for a restart to re-adopt."""
        sim = self.nodes[n]
        sim.node.membership.leave(self.now)
        self._pump(n)
        sim.up = False

    def restart(self, n: str, join: list[str]) -> Node:
        old = self.nodes[n]
        old.incarnation += 1
        token = max([x.token for x in old.disk_leases.values()] + [old.disk_token])
        term = max([x.term for x in old.disk_leases.values()] + [old.disk_max_term])
        node = Node(old.config, random.Random(self.rng.getrandbits(64)), self.now,
                    incarnation=old.incarnation, token=token, max_term=term)
        node.set_devices(old.devices, self._lendable(old), self.now)
        node.set_power(*old.power, self.now)

        def output(job_id: str) -> tuple[int, int]:
            got = old.received.get(job_id, {})
            return len(got.get("stdout", b"")), len(got.get("stderr", b""))
        node.recover([replace(j) for j in old.disk_jobs.values()],
                     [replace(r) for r in old.disk_runs.values()],
                     [replace(x) for x in old.disk_leases.values()],
                     # a crash took every process with it; a leave kept them
                     lambda job: job.id in old.processes, self.now, output)
        old.adopted = set(old.processes)
        old.node, old.up, old.tick_at = node, True, -1.0
        node.join([self.nodes[j].config.addr for j in join], self.now)
        self._pump(n)
        return node

    def load(self, n: str, device: str, compute_milli: int, memory_mib: int) -> None:
        """The owner's own workload now uses this much of a device (0, 0: none): what it
        lent beyond what is left is reclaimed."""
        sim = self.nodes[n]
        sim.load[device] = (compute_milli, memory_mib)
        if sim.up:
            sim.node.set_devices(sim.devices, self._lendable(sim), self.now)
            self._pump(n)

    @staticmethod
    def _lendable(sim: _SimNode) -> dict[str, tuple[int, int]]:
        out = {}
        for d in sim.devices:
            c, m = sim.load.get(d.id, (0, 0))
            out[d.id] = (max(d.compute_milli - c, 0), max(d.memory_mib - m, 0))
        return out

    def stall(self, n: str, seconds: float) -> None:
        self.nodes[n].stalled_until = self.now + seconds

    def disk_full(self, n: str, seconds: float) -> None:
        """For ``seconds``, output the node receives of jobs it follows is not written."""
        self.nodes[n].disk_full_until = self.now + seconds

    def reachable(self, a: str, b: str) -> bool:
        return (self.nodes[a].up and self.nodes[b].up
                and frozenset((a, b)) not in self.cuts)

    # --- jobs ---------------------------------------------------------------------------

    def submit(self, origin: str, job_id: str, command: list[str], compute_milli: int,
               memory_mib: int, kind: str = "any", count: int = 1, priority: int = 0,
               preemptible: bool = False) -> None:
        job = JobRecord(id=job_id, origin=origin, command=command,
                        compute_milli=compute_milli, memory_mib=memory_mib, kind=kind,
                        created_at=self.now, count=count, priority=priority,
                        preemptible=preemptible)
        self.submitted.add(job_id)
        self.nodes[origin].disk_jobs[job_id] = replace(job)  # journaled before the answer
        self.nodes[origin].node.submit(job, self.now)
        self._pump(origin)

    def submit_gang(self, origin: str, gang: str, size: int, command: list[str],
                    compute_milli: int, memory_mib: int, kind: str = "any",
                    count: int = 1) -> list[str]:
        """Submit a gang of ``size`` members (as the API does); returns their job ids."""
        members = gang_members(gang, size, origin=origin, command=command,
                               compute_milli=compute_milli, memory_mib=memory_mib, kind=kind,
                               created_at=self.now, count=count)
        for job in members:
            self.submitted.add(job.id)
            self.nodes[origin].disk_jobs[job.id] = replace(job)
        for job in members:
            self.nodes[origin].node.submit(job, self.now)
        self._pump(origin)
        return [job.id for job in members]

    def output(self, job_id: str, stream: str = "stdout") -> tuple[bytes, bytes]:
        """(what the job's origin received, what its last run on its owner wrote)."""
        job = self.job(job_id)
        assert job is not None
        got = self.nodes[job.origin].received.get(job_id, {}).get(stream, bytearray())
        log = self.nodes[job.node].logs.get(job_id) if job.node else None
        return bytes(got), (log.read(stream, 0, 1 << 30, self.now) if log else b"")

    # --- running ------------------------------------------------------------------------

    def run_until(self, t: float, check: bool = True) -> None:
        while self._heap and self._heap[0][0] <= t:
            when, _, fn = heapq.heappop(self._heap)
            self.now = when
            fn()
            if check:
                self.check()
        self.now = t

    def run_for(self, seconds: float, check: bool = True) -> None:
        self.run_until(self.now + seconds, check)

    def _pump(self, name: str) -> None:
        """Carry out a node's effects and schedule its next tick."""
        sim = self.nodes[name]
        if not sim.up:
            return
        while effects := sim.node.drain():
            for eff in effects:
                self._effect(name, eff)
        deadline = max(sim.node.next_deadline(), self.now, sim.stalled_until)
        if sim.tick_at < self.now or deadline < sim.tick_at:
            sim.tick_at = deadline
            node = sim.node
            self.at(deadline, lambda: self._tick(name, node))

    def _tick(self, name: str, node: Node) -> None:
        sim = self.nodes[name]
        if not sim.up or sim.node is not node or self.now < sim.tick_at:
            return
        if self.now < sim.stalled_until:
            sim.tick_at = -1.0
            self._pump(name)
            return
        sim.tick_at = -1.0
        node.tick(self.now)
        self._pump(name)

    def _effect(self, name: str, eff: Effect) -> None:
        sim = self.nodes[name]
        match eff:
            case SendPacket():
                self._send_packet(name, eff)
            case StartPushPull():
                self._pushpull(name, eff)
            case Call():
                self._rpc(name, eff)
            case RunJob():
                self._run_job(name, eff)
            case StopJob():
                run = eff.lease_id or sim.process_lease.get(eff.job_id, "")
                self.at(self.now + 0.01,
                        lambda: self._exit(name, eff.job_id, 143, "terminated", run))
            case PersistJob():
                sim.disk_jobs[eff.job.id] = replace(eff.job)
            case PersistRun():
                sim.disk_runs[eff.run.id] = replace(eff.run)
            case PersistLease():
                self._journal_lease(name, eff.lease)
            case ForgetJob():  # its journal row and the output it received go
                sim.disk_jobs.pop(eff.job_id, None)
                for kept in (sim.received, sim.archived):
                    kept.pop(eff.job_id, None)
            case ForgetRun():  # its journal row and the output it wrote go
                sim.disk_runs.pop(eff.job_id, None)
                sim.logs.pop(eff.job_id, None)
            case ForgetLease():
                sim.disk_leases.pop(eff.lease_id, None)
            case JobOutput() if self.now < sim.disk_full_until:
                sim.node.output_failed(eff.job_id, eff.stream, eff.offset, self.now)
            case JobOutput():
                got = sim.received.setdefault(eff.job_id, {}).setdefault(eff.stream, bytearray())
                if eff.offset > len(got):
                    raise InvariantError(f"seed {self.seed}: {name} got output of "
                                         f"{eff.job_id} at {eff.offset}, past {len(got)}")
                got[eff.offset:eff.offset + len(eff.data)] = eff.data
            case ArchiveOutput():
                if eff.job_id in sim.received:
                    sim.archived.setdefault(eff.job_id, []).append(sim.received.pop(eff.job_id))
            case LogEvent() | MemberEvent() | FactsEvent() | NameConflict() | CollectResults():
                pass  # (simulated runs leave no results)
            case _:
                assert_never(eff)

    def _journal_lease(self, name: str, lease: Lease) -> None:
        sim = self.nodes[name]
        if sim.tokens.setdefault(lease.token, lease.id) != lease.id:
            raise InvariantError(f"seed {self.seed}: {name} handed out token {lease.token} "
                                 f"twice ({sim.tokens[lease.token]}, {lease.id})")
        sim.disk_leases[lease.id] = replace(lease)
        sim.disk_token = max(sim.disk_token, sim.node.leases.token)
        sim.disk_max_term = max(sim.disk_max_term, sim.node.leases.max_term)

    def _run_job(self, name: str, eff: RunJob) -> None:
        # ["sleep", S] runs S seconds and exits 0; ["false", S] runs S seconds and exits 1;
        # anything else runs 1 s and exits 0.
        cmd = eff.job.command
        timed = len(cmd) == 2 and cmd[0] in ("sleep", "false")
        duration = float(cmd[1]) if timed else 1.0
        code = 1 if timed and cmd[0] == "false" else 0
        check_start(self, name, eff)
        sim = self.nodes[name]
        node = sim.node
        job_id = eff.job.id
        sim.processes[job_id] = self.now + duration
        lease = sim.process_lease[job_id] = eff.job.lease_id
        sim.logs[job_id] = SimLog(f"{job_id}#{eff.job.attempts}", self.now, self.now + duration)
        self.runs.append((name, job_id, dict(eff.job.env)))

        def started() -> None:
            if self.nodes[name].node is node and self.nodes[name].up:
                node.job_started(job_id, 1000 + len(self.nodes[name].processes), None, self.now,
                                 lease_id=eff.job.lease_id)
                self._pump(name)
        self.at(self.now + 0.01, started)
        self.at(self.now + duration,
                lambda: self._exit(name, job_id, code, f"exited with code {code}", lease))

    def _exit(self, name: str, job_id: str, code: int, reason: str, lease: str) -> None:
        """The process of ``job_id``'s run under ``lease`` ends (if it is still the one)."""
        sim = self.nodes[name]
        if job_id not in sim.processes or sim.process_lease.get(job_id) != lease:
            return
        del sim.processes[job_id]
        sim.logs[job_id].stop(self.now)
        if not sim.up:
            return  # ended while the agent was down: its restart finds it vanished
        # (Re-adopted after a restart, not a child of this agent instance: its supervisor
        # recorded how it ended, as in the runtime.)
        sim.adopted.discard(job_id)
        sim.node.job_exited(job_id, code, reason, self.now)
        self._pump(name)

    # --- invariants and views -----------------------------------------------------------

    def check(self) -> None:
        check_world(self)
