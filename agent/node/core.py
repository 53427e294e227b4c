"""One node's sans-IO core: inputs in, effects out, and the roles a node plays.

The runtime (or the simulator) feeds the node its inputs and carries out the effects it
returns from ``drain()`` (see ``effects``):

- ``step_packet(src, bytes, now)``: a UDP datagram; anything undecodable is counted.
- ``handle_request(msg, now) -> reply``: an agent-to-agent call that arrived over TCP.
- ``call_result(call_id, reply | None, error, now)``: the outcome of a ``Call`` effect.
- ``tick(now)``: time passed; call again no later than ``next_deadline()``.
- ``submit``, ``cancel`` (the local user), ``job_started``, ``job_exited`` (processes),
  ``set_devices``, ``set_power`` (device and battery readings), ``recover`` (the journal).

A job's life across nodes, and the role that handles each step::

    origin --Submit--> coordinator --LeaseRequest--> owner      (owner reserves on its books)
    origin <--Placed-- coordinator                              (lease id + fencing token)
    origin --StartJob--> owner                                  (owner starts the process)
    origin --JobSync (long poll)--> owner                       (state and output)

Every node is an origin (``origin``, ``follow``) and an owner (``owner``); the one the
election picks is also the coordinator (``coordinator``), an object that exists only while
this node coordinates. A request is routed by its type, a reply by the type of the call it
answers (``routes``); a call to oneself takes the same path, answered in memory after the
current input is done with.

Only the origin starts a job, once per lease, so a coordinator that dies half-way can
cause at most a reserved lease that expires, never a job that runs twice.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

from flexmesh.agent.devices.base import Device
from flexmesh.agent.models import JobRecord, RunRecord
from flexmesh.agent.node.config import NodeConfig
from flexmesh.agent.node.coordinator import Coordinator
from flexmesh.agent.node.effects import Call, Effect, Outbox, PendingCall
from flexmesh.agent.node.electorate import Electorate
from flexmesh.agent.node.nearby import Nearby
from flexmesh.agent.node.origin import Origin
from flexmesh.agent.node.owner import Owner
from flexmesh.agent.node.power import Power, PowerPolicy, PowerReading
from flexmesh.agent.node.records import Records
from flexmesh.agent.node.results import with_results
from flexmesh.agent.node.routes import REPLIES, REQUESTS
from flexmesh.agent.node.views import Views
from flexmesh.agent.scheduler import Scheduler
from flexmesh.policies import get_policy, get_spec
from flexmesh.protocol import facts, wire
from flexmesh.protocol.election import Belief, decide, plausible_term
from flexmesh.protocol.lease import Lease, LeaseTable
from flexmesh.protocol.membership import (
    DEAD,
    LEFT,
    ConfirmedEvent,
    FactsEvent,
    Member,
    MemberEvent,
    Membership,
)

HOUSEKEEPING = 0.5  # seconds between the roles' own timers (retries, follow-ups, pruning)
FORGET_EVERY = 10.0  # seconds between looks for ended records past their retention


class Node:
    def __init__(self, config: NodeConfig, rng: random.Random, now: float,
                 incarnation: int = 0, token: int = 0, max_term: int = 0) -> None:
        self.config = config
        self.name = config.name
        self.rng = rng
        self.out = Outbox()
        self.counters = self.out.counters
        self.membership = Membership(config.name, config.addr, config.membership, rng, now,
                                     incarnation)
        self.leases = LeaseTable(config.name, token, max_term)
        # The placement policy and its hooks outlive any one term as coordinator.
        self.scheduler = Scheduler(get_policy(config.policy), spec=get_spec(config.policy),
                                   rtt_from=Nearby(self.membership))
        self.scheduler.never_fit.grace = config.impossible_grace
        self.enforcement = "none"  # how this node holds jobs to their fractions (runtime)
        self.runtimes: tuple[str, ...] = ()  # container runtimes that work here (runtime)
        self.held: tuple[bytes, ...] = ()  # digest of bundles and images here (``holdings``)
        self.belief, self.claim, self.max_term = Belief(None, 0), 0, max_term
        self.owner: Owner = Owner(self)
        self.power = Power(self)
        self.origin: Origin = Origin(self)
        self.coordinator: Coordinator | None = None
        self.views = Views(self)
        self._calls: dict[int, PendingCall] = {}
        self._self_calls: deque[int] = deque()
        self._call_seq = 0
        self.electorate = Electorate(self.membership)
        self._joining_until = 0.0
        self._dirty_election, self._dirty_schedule = True, False
        self._next_housekeeping = now
        self._next_forget = now + FORGET_EVERY
        self.records = Records(self)
        self._now = now
        self.publish_facts()

    # --- effects ------------------------------------------------------------------------

    def drain(self) -> list[Effect]:
        self._pull_membership()
        return self.out.drain()

    def persist(self, job: JobRecord) -> None:
        """Journal a job as it is now (see ``records``)."""
        self.records.persist(job, self._now)

    def persist_run(self, run: RunRecord) -> None:
        """Journal a run as it is now (see ``records``)."""
        self.records.persist_run(run, self._now)

    def call(self, node: str, msg: wire.Message, now: float, job_id: str = "",
             gang: tuple[str, int] | None = None, lease_id: str = "") -> None:
        """Ask another agent (or this one) ``msg``; its reply is routed by ``routes.REPLIES``."""
        self._call_seq += 1
        call_id = self._call_seq
        self._calls[call_id] = PendingCall(node, msg, job_id, gang, lease_id)
        if node == self.name:
            self._self_calls.append(call_id)
            return
        member = self.membership.members.get(node)
        if member is None or member.state in (DEAD, LEFT):
            self._answer(call_id, None, f"node {node} is not a live member", now)
            return
        timeout = self.config.call_timeout
        if isinstance(msg, wire.JobSync):
            timeout += msg.wait_ms / 1000  # the owner holds a long poll that long
        self.out.emit(Call(call_id, node, member.addr, msg, timeout))

    def _answer(self, call_id: int, reply: wire.Message | None, error: str,
                now: float) -> None:
        pending = self._calls.pop(call_id, None)
        if pending is None:
            return
        handler = REPLIES.get(type(pending.msg))
        if handler is not None:
            handler(self, pending, reply, error, now)

    # --- inputs -------------------------------------------------------------------------

    def step_packet(self, src: str, data: bytes, now: float) -> None:
        try:
            msgs = wire.decode_packet(data)
        except wire.DecodeError:
            self.out.count("packets_dropped_malformed")
            return
        self.membership.step(src, msgs, now)
        self._after_input(now)

    def handle_request(self, msg: wire.Message, now: float) -> wire.Message:
        reply = self._dispatch(msg, now)
        self._after_input(now)
        return reply

    def call_result(self, call_id: int, reply: wire.Message | None, error: str,
                    now: float) -> None:
        if call_id in self._calls:
            self._answer(call_id, reply, error, now)
            self._after_input(now)

    def tick(self, now: float) -> None:
        self._now = now
        self.membership.tick(now)
        if self.owner.expire(now):
            self.publish_facts()
        if now >= self._next_forget:
            self._next_forget = now + FORGET_EVERY
            self.records.forget_finished(now)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING
            if self._joining_until and now >= self._joining_until:
                self._joining_until = 0.0
                self._dirty_election = True
            self.origin.tick(now)
            self.owner.orphans.tick(now)
            if self.coordinator is not None:
                self.coordinator.tick(now)
                self._dirty_schedule = self._dirty_schedule or self.coordinator.has_queue()
        self._after_input(now)

    def next_deadline(self) -> float:
        times = [self.membership.next_deadline(), self._next_forget]
        if self._waits():
            times.append(self._next_housekeeping)
        if (lease_deadline := self.leases.next_deadline()) is not None:
            times.append(lease_deadline)
        return min(times)

    def _waits(self) -> bool:
        """Whether a role waits on a timer: an idle node wakes only for its membership."""
        return bool(self._joining_until or self.origin.waits() or self.owner.orphans.waits()
                    or (self.coordinator is not None and self.coordinator.waits()))

    def submit(self, job: JobRecord, now: float) -> None:
        """A job accepted on this node (already journaled by the runtime)."""
        self._now = now
        self.origin.submit(job, now)
        self._after_input(now)

    def cancel(self, job_id: str, now: float, reason: str = "cancelled by user") -> str:
        """Cancel a job submitted here; returns what was done, for the user."""
        self._now = now
        result = self.origin.cancel(job_id, now, reason)
        self._after_input(now)
        return result

    def stop_job(self, job_id: str, reason: str, state: str, now: float) -> None:
        """Stop a job this node runs (the watchdog, a device gone); it ends in ``state``."""
        self._now = now
        self.owner.stop_job(job_id, reason, state, now)
        self._after_input(now)

    def job_started(self, job_id: str, pid: int, pid_start: int | None, now: float,
                    lease_id: str | None = None) -> None:
        """The process of a job this node runs (under ``lease_id``, as RunJob gave it) began."""
        self._now = now
        self.owner.job_started(job_id, pid, pid_start, now, lease_id)
        self._after_input(now)

    def job_exited(self, job_id: str, exit_code: int | None, reason: str, now: float,
                   state: str | None = None) -> None:
        """The process of a job this node runs has ended (or could not start)."""
        self._now = now
        self.owner.job_exited(job_id, exit_code, reason, now, state)
        self._after_input(now)

    def output_failed(self, job_id: str, stream: str, offset: int, now: float) -> None:
        """A ``JobOutput`` effect could not be carried out (its bytes are not on disk)."""
        self._now = now
        self.origin.follow.output_failed(job_id, stream, offset, now)
        self._after_input(now)

    def set_devices(self, devices: list[Device], lendable: dict[str, tuple[int, int]],
                    now: float) -> None:
        """Declare local devices and what of each may be lent (capacity minus local use)."""
        self._now = now
        self.owner.set_devices(devices, lendable, now)
        self.publish_facts()
        self._after_input(now)

    def set_power(self, reading: PowerReading, policy: PowerPolicy, now: float) -> None:
        """The battery as last read, and the floors it is judged against (``power``)."""
        self._now = now
        self.power.update(reading, policy, now)
        self._after_input(now)

    def recover(self, jobs: list[JobRecord], runs: list[RunRecord], leases: list[Lease],
                adopt: Callable[[RunRecord], bool | None], now: float,
                output: Callable[[str], tuple[int, int]] | None = None) -> None:
        """After a restart: take back the journal's leases and jobs.

        A job this node ran whose process is gone (``adopt``: whether it could be re-watched,
        None: it never started) ends ``lost`` (``preempted``: placed again) and gives its
        lease back; queued jobs are submitted again and remote ones followed again, from
        the output already here (``output``: bytes of stdout and stderr kept for a job).
        """
        self._now = now
        self.owner.restore(leases)
        self.origin.adopt(jobs)
        for run in runs:
            self.owner.recover_run(run, run.terminal or adopt(run), now)
        self.origin.recover(now, output or (lambda _job: (0, 0)))
        self.records.read_back(jobs, runs, now)
        self.power.refresh(now)  # (below the floor, borrowed runs read back are handed back)
        self._after_input(now)

    def join(self, seeds: list[str], now: float) -> None:
        """Join the mesh through seeds. Until the first exchange with one of them (or a
        grace period), a lone node does not elect itself: a node that is joining should
        not claim a term only to give the role up a moment later."""
        if seeds:
            self._joining_until = now + 4 * self.config.membership.probe_interval
        self.membership.join(seeds)
        self._after_input(now)

    def pushpull_request(self, join: bool) -> wire.PushPull:
        return wire.PushPull(join, self.name, self.membership.local_state())

    def pushpull_reply(self, reply: wire.Message | None, now: float) -> None:
        if isinstance(reply, wire.PushPull):
            self.membership.merge_remote_state(reply.states, now)
            self._after_input(now)

    def sync_reply(self, msg: wire.JobSync, stdout: bytes, stderr: bytes, chunk: int,
                   now: float) -> wire.Message:
        """Owner: a JobSync, answered with the output the caller read for it."""
        return with_results(self, msg, self.owner.sync_reply(msg, stdout, stderr, chunk, now))

    # --- the loop after every input -----------------------------------------------------

    def _after_input(self, now: float) -> None:
        self._now = now
        while True:
            self._pull_membership()
            if self._dirty_election:
                self._dirty_election = False
                self._elect(now)
            if self._dirty_schedule and self.coordinator is not None:
                self._dirty_schedule = False
                self.coordinator.schedule(now)
            if not self._self_calls:
                break
            call_id = self._self_calls.popleft()
            pending = self._calls.get(call_id)
            if pending is not None:
                self._answer(call_id, self._dispatch(pending.msg, now), "", now)

    def _dispatch(self, msg: wire.Message, now: float) -> wire.Message:
        handler = REQUESTS.get(type(msg))
        if handler is None:
            self.out.count("unexpected_requests")
            return wire.Error(f"unexpected request {type(msg).__name__}")
        return handler(self, msg, now)

    def _pull_membership(self) -> None:
        for eff in self.membership.drain():
            if isinstance(eff, ConfirmedEvent):
                self._dirty_schedule = True  # a member may draw placements from now on
                continue
            self.out.emit(eff)
            if isinstance(eff, MemberEvent):
                self._on_member_event(eff)
            elif isinstance(eff, FactsEvent):
                self._dirty_schedule = True
                # Most facts changes are device usage: the election (O(members)) runs
                # again only when what it reads of the member changed.
                if self.electorate.refresh(eff.name):
                    self._dirty_election = True

    def _on_member_event(self, ev: MemberEvent) -> None:
        self._dirty_election = True
        self._dirty_schedule = True
        self.electorate.refresh(ev.name)
        self.origin.follow.member(ev.name, ev.state, self._now)

    # --- facts --------------------------------------------------------------------------

    def facts_of(self, m: Member) -> facts.NodeFacts:
        """A member's facts, decoded once per version."""
        return self.electorate.facts_of(m)

    def publish_facts(self) -> None:
        ours = facts.NodeFacts(
            self.owner.device_facts(self.enforcement), self.config.priority,
            self.config.eligible, self.claim, self.max_term, self.owner.preemptible_facts(),
            battery=self.power.fact(), runtimes=self.runtimes, held=self.held)
        me = self.membership.me
        data = facts.fit(ours, self.name, me.incarnation, me.facts_version + 1).encode()
        if data != me.facts:  # unchanged facts are not news to gossip
            self.membership.set_facts(data)

    def saw_term(self, term: int) -> None:
        if term > self.max_term:
            self.max_term = term
            self._dirty_election = True

    # --- election -----------------------------------------------------------------------

    @property
    def is_coordinator(self) -> bool:
        return self.belief.coordinator == self.name

    def _elect(self, now: float) -> None:
        m = self.membership
        if self._joining_until > now and (m.live_count() == 1 or m.catching_up):
            return  # tick() or the first push-pull reply (not cut short) elects
        voters = self.electorate.voters()
        if any(not plausible_term(max(v.claim, v.max_term), self.max_term) for v in voters):
            self.out.count("implausible_term")  # such a voter is not heard
            voters = [v for v in voters
                      if plausible_term(max(v.claim, v.max_term), self.max_term)]
        before = self.belief
        self.belief, claim = decide(voters, self.name, self.belief, self.claim)
        term_seen = max(self.max_term, self.belief.term,
                        max((max(v.claim, v.max_term) for v in voters), default=0))
        changed_claim = claim != self.claim
        self.claim = claim
        if term_seen != self.max_term or changed_claim:
            self.max_term = term_seen
            self.publish_facts()
        if self.belief == before:
            return
        self.out.log("coordinator", name=self.belief.coordinator, term=self.belief.term)
        if self.is_coordinator and self.coordinator is None:
            self.coordinator = Coordinator(self)
        elif not self.is_coordinator and self.coordinator is not None:
            self.scheduler.reset()  # the origins re-submit to the new coordinator
            self.coordinator = None
        # A coordinator pings every member not yet confirmed, and each newcomer: a member
        # draws placements only once it has answered.
        self.membership.set_confirming(self.coordinator is not None, now)
        self.origin.coordinator_changed(now)
        self._dirty_schedule = True
