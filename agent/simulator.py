"""A deterministic, seeded simulator that runs real ``agent.node`` code in virtual time.

Theory of operation
-------------------
Every node is the production ``Node``; only the world around it is simulated: a network
that loses, delays, duplicates and reorders datagrams, TCP calls that fail across a cut,
processes that run for as long as their ``sleep N`` command says. One event heap orders
everything by (virtual time, sequence number), and all randomness comes from one
``random.Random(seed)``, so a seed replays exactly.

Faults are one line each: ``cut(a, b)``, ``isolate(n)``, ``heal()``, ``crash(n)``,
``restart(n)``, ``stall(n, seconds)``. ``check()`` verifies the invariants: no device
leased beyond its capacity, and every accepted job in exactly one state.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from flexmesh.agent.devices.base import Device
from flexmesh.agent.jobs import ADOPTED_EXIT_REASON
from flexmesh.agent.models import LOST, RUNNING, TERMINAL, JobRecord, gang_members
from flexmesh.agent.node import (
    Call,
    Node,
    NodeConfig,
    PersistJob,
    PersistLease,
    RunJob,
    StopJob,
    WatchJob,
)
from flexmesh.protocol import wire
from flexmesh.protocol.lease import ACTIVE, Lease
from flexmesh.protocol.membership import PRESETS, Config, SendPacket, StartPushPull


class InvariantError(AssertionError):
    pass


@dataclass
class LinkFaults:
    loss: float = 0.0
    delay: float = 0.002
    jitter: float = 0.002
    duplicate: float = 0.0


@dataclass
class _SimNode:
    node: Node
    devices: list[Device]
    config: NodeConfig
    up: bool = True
    stalled_until: float = 0.0
    tick_at: float = -1.0
    incarnation: int = 0
    processes: dict[str, float] = field(default_factory=dict)  # job -> end time
    adopted: set[str] = field(default_factory=set)  # processes an earlier instance started
    # What the node journaled: survives a crash, read back on restart (as SQLite would).
    disk_jobs: dict[str, JobRecord] = field(default_factory=dict)
    disk_leases: dict[str, Lease] = field(default_factory=dict)


class Simulator:
    def __init__(self, seed: int, faults: LinkFaults | None = None,
                 membership: Config | None = None) -> None:
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
                            priority=priority)
        node = Node(config, random.Random(self.rng.getrandbits(64)), self.now)
        sim = _SimNode(node, list(devices or []), config)
        node.set_devices(sim.devices, {})
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
        self.nodes[n].up = False
        self.nodes[n].processes.clear()

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
        token = max((x.token for x in old.disk_leases.values()), default=0)
        node = Node(old.config, random.Random(self.rng.getrandbits(64)), self.now,
                    incarnation=old.incarnation, token=token)
        node.set_devices(old.devices, {})
        node.recover([replace(j) for j in old.disk_jobs.values()],
                     [replace(x) for x in old.disk_leases.values()],
                     # a crash took every process with it; a leave kept them
                     lambda job: job.id in old.processes, self.now)
        old.adopted = set(old.processes)
        old.node, old.up, old.tick_at = node, True, -1.0
        node.join([self.nodes[j].config.addr for j in join], self.now)
        self._pump(n)
        return node

    def stall(self, n: str, seconds: float) -> None:
        self.nodes[n].stalled_until = self.now + seconds

    def reachable(self, a: str, b: str) -> bool:
        return (self.nodes[a].up and self.nodes[b].up
                and frozenset((a, b)) not in self.cuts)

    # --- jobs ---------------------------------------------------------------------------

    def submit(self, origin: str, job_id: str, command: list[str], compute_milli: int,
               memory_mib: int, kind: str = "any", count: int = 1, priority: int = 0,
               preemptible: bool = False) -> None:
        job = JobRecord(id=job_id, origin=origin, command=command,
                        compute_milli=compute_milli, memory_mib=memory_mib, kind=kind,
                        created_at=self.now, role="origin", count=count, priority=priority,
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
                               created_at=self.now, role="origin", count=count)
        for job in members:
            self.submitted.add(job.id)
            self.nodes[origin].disk_jobs[job.id] = replace(job)
        for job in members:
            self.nodes[origin].node.submit(job, self.now)
        self._pump(origin)
        return [job.id for job in members]

    def job(self, job_id: str) -> JobRecord | None:
        """The origin's record of a job."""
        for sim in self.nodes.values():
            job = sim.node.jobs.get(job_id)
            if job is not None and job.role in ("origin", "both"):
                return job
        return None

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
        for eff in sim.node.drain():
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

    def _effect(self, name: str, eff: Any) -> None:
        if isinstance(eff, SendPacket):
            self._send_packet(name, eff)
        elif isinstance(eff, StartPushPull):
            self._pushpull(name, eff)
        elif isinstance(eff, Call):
            self._rpc(name, eff)
        elif isinstance(eff, RunJob):
            self._run_job(name, eff)
        elif isinstance(eff, StopJob):
            self.at(self.now + 0.01, lambda: self._exit(name, eff.job_id, 143, "terminated"))
        elif isinstance(eff, WatchJob):
            self.at(self.now + 0.2, lambda: self._sync(name, eff))
        elif isinstance(eff, PersistJob):
            self.nodes[name].disk_jobs[eff.job.id] = replace(eff.job)
        elif isinstance(eff, PersistLease):
            self.nodes[name].disk_leases[eff.lease.id] = replace(eff.lease)

    def _latency(self) -> float:
        return self.faults.delay + self.rng.random() * self.faults.jitter

    def _send_packet(self, src: str, eff: SendPacket) -> None:
        dst = self.by_addr.get(eff.addr)
        self.stats["packets"] += 1
        self.stats["bytes"] += len(eff.data)
        if dst is None or not self.reachable(src, dst) or self.rng.random() < self.faults.loss:
            self.stats["dropped"] += 1
            return
        copies = 2 if self.rng.random() < self.faults.duplicate else 1
        src_addr = self.nodes[src].config.addr
        target = self.nodes[dst].node
        for _ in range(copies):
            self.at(self.now + self._latency(), lambda: self._deliver(dst, target, src_addr,
                                                                      eff.data))

    def _deliver(self, dst: str, target: Node, src_addr: str, data: bytes) -> None:
        sim = self.nodes[dst]
        if not sim.up or sim.node is not target:
            return
        if self.now < sim.stalled_until:  # a frozen loop reads its socket late
            self.at(sim.stalled_until, lambda: self._deliver(dst, target, src_addr, data))
            return
        target.step_packet(src_addr, data, self.now)
        self._pump(dst)

    def _pushpull(self, src: str, eff: StartPushPull) -> None:
        dst = self.by_addr.get(eff.addr)
        node = self.nodes[src].node
        if dst is None or not self.reachable(src, dst):
            return
        request = node.pushpull_request(eff.join)
        rtt = 2 * self._latency()

        def deliver() -> None:
            if not self.reachable(src, dst):
                return
            reply = self.nodes[dst].node.handle_request(request, self.now)
            self._pump(dst)
            self.at(self.now + rtt / 2, lambda: self._pushpull_back(src, node, reply))
        self.at(self.now + rtt / 2, deliver)

    def _pushpull_back(self, src: str, node: Node, reply: wire.Message) -> None:
        if self.nodes[src].node is node and self.nodes[src].up:
            node.pushpull_reply(reply, self.now)
            self._pump(src)

    def _rpc(self, src: str, eff: Call) -> None:
        dst = eff.node
        node = self.nodes[src].node
        # Calls go through the wire codec, as they do between real agents.
        frame = wire.encode_frame(eff.msg)

        def fail(why: str) -> None:
            if self.nodes[src].node is node and self.nodes[src].up:
                node.call_result(eff.call_id, None, why, self.now)
                self._pump(src)

        if dst not in self.nodes or not self.reachable(src, dst):
            self.at(self.now + eff.timeout, lambda: fail("timed out"))
            return
        latency = self._latency()

        def deliver() -> None:
            if not self.reachable(src, dst):
                self.at(self.now + eff.timeout, lambda: fail("timed out"))
                return
            msg = wire.decode_frame_body(frame[4:])
            reply = self.nodes[dst].node.handle_request(msg, self.now)
            self._pump(dst)

            def back() -> None:
                if self.nodes[src].node is node and self.nodes[src].up:
                    node.call_result(eff.call_id, reply, "", self.now)
                    self._pump(src)
            self.at(self.now + latency, back)
        self.at(self.now + latency, deliver)

    def _run_job(self, name: str, eff: RunJob) -> None:
        # ["sleep", S] runs S seconds and exits 0; ["false", S] runs S seconds and exits 1;
        # anything else runs 1 s and exits 0.
        cmd = eff.job.command
        timed = len(cmd) == 2 and cmd[0] in ("sleep", "false")
        duration = float(cmd[1]) if timed else 1.0
        code = 1 if timed and cmd[0] == "false" else 0
        node = self.nodes[name].node
        job_id = eff.job.id
        self.nodes[name].processes[job_id] = self.now + duration
        self.runs.append((name, job_id, dict(eff.job.env)))

        def started() -> None:
            if self.nodes[name].node is node and self.nodes[name].up:
                node.job_started(job_id, 1000 + len(self.nodes[name].processes), None, self.now,
                                 lease_id=eff.job.lease_id)
                self._pump(name)
        self.at(self.now + 0.01, started)
        self.at(self.now + duration,
                lambda: self._exit(name, job_id, code, f"exited with code {code}"))

    def _exit(self, name: str, job_id: str, code: int, reason: str) -> None:
        sim = self.nodes[name]
        if job_id not in sim.processes:
            return
        del sim.processes[job_id]
        if not sim.up:
            return  # ended while the agent was down: its restart finds it vanished
        if job_id in sim.adopted:
            # Not a child of this agent instance: as in the runtime, no exit code is known.
            sim.adopted.discard(job_id)
            sim.node.job_exited(job_id, None, ADOPTED_EXIT_REASON, self.now, state=LOST)
            self._pump(name)
            return
        sim.node.job_exited(job_id, code, reason, self.now)
        self._pump(name)

    def _sync(self, origin: str, eff: WatchJob, lease: str | None = None) -> None:
        node = self.nodes[origin].node
        job = node.jobs.get(eff.job_id)
        if lease is None and job is not None:
            lease = job.lease_id  # the placement this watch follows, as the runtime does
        if job is None or job.terminal or not self.nodes[origin].up or job.lease_id != lease:
            return
        if self.reachable(origin, eff.node):
            remote = self.nodes[eff.node].node.jobs.get(eff.job_id)
            if remote is not None:
                node.remote_update(eff.job_id, remote.state, remote.reason, remote.exit_code,
                                   self.now, lease_id=lease)
                self._pump(origin)
        self.at(self.now + 0.5, lambda: self._sync(origin, eff, lease))

    # --- invariants and views -----------------------------------------------------------

    def check(self) -> None:
        for name, sim in self.nodes.items():
            if not sim.up:
                continue
            for d in sim.devices:
                c = m = 0
                for lease in sim.node.leases.leases.values():
                    if lease.holds(d.id) and lease.state in ACTIVE:
                        c += lease.compute_milli
                        m += lease.memory_mib
                if c > d.compute_milli or m > d.memory_mib:
                    raise InvariantError(
                        f"seed {self.seed}: {name}/{d.id} leased {c} milli {m} MiB beyond "
                        f"{d.compute_milli}/{d.memory_mib} at t={self.now:.3f}")
            running = [j for j in sim.node.jobs.values()
                       if j.role in ("owner", "both") and j.state == RUNNING]
            for j in running:
                held = sim.node.leases.leases.get(j.lease_id)
                if held is None or held.state not in ACTIVE:
                    raise InvariantError(f"seed {self.seed}: job {j.id} runs on {name} "
                                         f"without an active lease")

    def up_nodes(self) -> list[str]:
        return [n for n, s in self.nodes.items() if s.up]

    def groups(self) -> list[set[str]]:
        """Connected groups of up nodes under the current cuts."""
        left = set(self.up_nodes())
        out = []
        while left:
            start = left.pop()
            group, todo = {start}, [start]
            while todo:
                a = todo.pop()
                for b in list(left):
                    if self.reachable(a, b):
                        left.discard(b)
                        group.add(b)
                        todo.append(b)
            out.append(group)
        return out

    def converged(self, group: set[str]) -> bool:
        """Every node in ``group`` sees exactly the group alive, nobody suspect, and agrees
        on one coordinator."""
        beliefs = set()
        for n in group:
            node = self.nodes[n].node
            members = node.membership.members.values()
            alive = {m.name for m in members if m.state == "alive"}
            if alive != group or any(m.state == "suspect" for m in members):
                return False
            beliefs.add(node.belief)
        return len(beliefs) == 1 and all(b.coordinator and b.term for b in beliefs)

    def terminal_jobs(self) -> dict[str, str]:
        out = {}
        for job_id in self.submitted:
            job = self.job(job_id)
            if job is not None and job.state in TERMINAL:
                out[job_id] = job.state
        return out
