"""One node's sans-IO composition: membership, facts, election, scheduler, leases, jobs.

Theory of operation
-------------------
The runtime (or the simulator) feeds the node four kinds of input and carries out the
effects it returns from ``drain()``:

- ``step_packet(src, bytes, now)``: a UDP datagram; anything undecodable is counted.
- ``handle_request(msg, now) -> reply``: an agent-to-agent call that arrived over TCP.
- ``call_result(call_id, reply | None, error, now)``: the outcome of a ``Call`` effect.
- ``tick(now)``: time passed; call again no later than ``next_deadline()``.

A job's life across nodes::

    origin --Submit--> coordinator --LeaseRequest--> owner      (owner reserves on its books)
    origin <--Placed-- coordinator                              (lease id + fencing token)
    origin --StartJob--> owner                                  (owner starts the process)
    origin --JobSync (long poll)--> owner                       (state and output, by runtime)

Only the origin starts a job, once per lease, so a coordinator that dies half-way can
cause at most a reserved lease that expires, never a job that runs twice. The origin
re-submits a queued job whenever the coordinator changes and every ``submit_refresh``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from flexmesh.agent.devices.base import Device
from flexmesh.agent.models import (
    CANCELLED,
    FAILED,
    LOST,
    PLACED,
    PREEMPTED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    member_id,
)
from flexmesh.agent.scheduler import PreemptOrder, Scheduler
from flexmesh.policies import (
    DEFAULT_POLICY,
    Candidate,
    NoFit,
    Request,
    RunningJob,
    get_policy,
    get_spec,
)
from flexmesh.protocol import wire
from flexmesh.protocol.election import Belief, Voter, decide
from flexmesh.protocol.lease import ACTIVE, RESERVED, Lease, LeaseTable, Refusal
from flexmesh.protocol.membership import (
    ALIVE,
    DEAD,
    LEFT,
    Config,
    FactsEvent,
    Member,
    MemberEvent,
    Membership,
    SendPacket,
    StartPushPull,
)

MAX_GOSSIPED_PREEMPTIBLE = 16  # preemptible jobs a node lists in its facts
CANCEL_RETRY = 2.0  # seconds between attempts to tell an owner of a cancel
PREEMPT_RECHECK = 3.0  # an owner refused a preemption: choose again after this
MAX_GANG = 64  # members of one gang, each on a node of its own


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    addr: str
    membership: Config = field(default_factory=Config)
    priority: int = 0
    eligible: bool = True  # may be elected coordinator
    policy: str = DEFAULT_POLICY
    lease_ttl: float = 15.0  # a reserved lease not started within this is taken back
    call_timeout: float = 5.0
    submit_refresh: float = 5.0  # re-send Submit for a still-queued job this often
    local_fallback_after: float = 6.0  # no coordinator answer: place on own devices
    # An owner that left the mesh (a restart, an upgrade) keeps running its jobs; they are
    # followed again when it is back, and marked lost only if it is not back within this.
    owner_away_limit: float = 900.0


# --- effects the runtime carries out -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    call_id: int
    node: str
    addr: str
    msg: wire.Message
    timeout: float


@dataclass(frozen=True, slots=True)
class PersistJob:
    job: JobRecord


@dataclass(frozen=True, slots=True)
class PersistLease:
    lease: Lease


@dataclass(frozen=True, slots=True)
class RunJob:
    job: JobRecord
    device: Device
    more: tuple[Device, ...] = ()  # further devices of a job that holds several


@dataclass(frozen=True, slots=True)
class StopJob:
    job_id: str
    reason: str
    state: str  # the terminal state the job gets once stopped


@dataclass(frozen=True, slots=True)
class ArchiveOutput:
    """Origin: a job goes back to the queue; keep its output so far apart from the next run."""

    job_id: str


@dataclass(frozen=True, slots=True)
class WatchJob:
    """Origin: follow a job that runs on another node (state and output)."""

    job_id: str
    node: str


@dataclass(frozen=True, slots=True)
class LogEvent:
    event: str
    fields: dict[str, Any]


Effect = (SendPacket | StartPushPull | MemberEvent | FactsEvent | Call | PersistJob
          | PersistLease | RunJob | StopJob | WatchJob | ArchiveOutput | LogEvent)
Continuation = Callable[[wire.Message | None, str, float], None]


@dataclass(slots=True)
class _OriginState:
    sent_to: tuple[str, int] | None = None  # (coordinator, term) that acknowledged it
    next_submit: float = 0.0
    coordinator_silent_since: float | None = None
    start_deadline: float = 0.0
    start_inflight: bool = False


class Node:
    def __init__(
        self, config: NodeConfig, rng: random.Random, now: float, incarnation: int = 0,
        token: int = 0, max_term: int = 0,
    ) -> None:
        self.config = config
        self.name = config.name
        self.rng = rng
        self.membership = Membership(config.name, config.addr, config.membership, rng, now,
                                     incarnation)
        self.leases = LeaseTable(config.name, token, max_term)
        self.scheduler = Scheduler(get_policy(config.policy), spec=get_spec(config.policy))
        self.devices: dict[str, Device] = {}
        self.enforcement = "none"  # how this node holds jobs to their fractions (runtime)
        self.foreign: dict[str, tuple[int, int]] = {}
        self.jobs: dict[str, JobRecord] = {}
        self.belief = Belief(None, 0)
        self.claim = 0
        self.max_term = max_term
        self.counters: dict[str, int] = {}
        self._out: list[Effect] = []
        self._calls: dict[int, Continuation] = {}
        self._self_calls: list[tuple[wire.Message, Continuation]] = []
        self._joining_until = 0.0
        self._call_seq = 0
        self._origin: dict[str, _OriginState] = {}
        self._stopping: dict[str, StopJob] = {}
        self._dirty_election = True
        self._dirty_schedule = False
        self._candidate_cache: dict[str, tuple[tuple[int, int], list[Candidate]]] = {}
        self._owner_away: dict[str, float] = {}  # owner that left -> since when
        self._cancel_retry: dict[str, float] = {}  # job -> when to tell its owner again
        # Coordinator: gangs whose owners are being asked, member job -> the owner's answer
        # (None until it comes): all granted, or every lease granted is given back.
        self._gang_asks: dict[tuple[str, int], dict[str, tuple[
            wire.LeaseRequest, str, wire.LeaseReply | str | None]]] = {}  # by (gang, term)
        self._voter_map: dict[str, Voter] = {}  # what the election reads, by member
        self._next_housekeeping = now
        self._now = now
        self._publish_facts()

    # --- effects ------------------------------------------------------------------------

    def drain(self) -> list[Effect]:
        self._pull_membership()
        out, self._out = self._out, []
        return out

    def _pull_membership(self) -> None:
        for eff in self.membership.drain():
            self._out.append(eff)
            if isinstance(eff, MemberEvent):
                self._on_member_event(eff)
            elif isinstance(eff, FactsEvent):
                self._dirty_schedule = True
                # Most facts changes are device usage: the election (O(members)) runs
                # again only when what it reads of the member changed.
                if self._refresh_voter(eff.name):
                    self._dirty_election = True

    def _log(self, event: str, **fields: Any) -> None:
        self._out.append(LogEvent(event, fields))

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def _call(self, node: str, msg: wire.Message, then: Continuation, now: float) -> None:
        if node == self.name:
            # A call to ourselves (the coordinator leasing its own device, placing its own
            # job) is answered in memory, after the current input is done with.
            self._self_calls.append((msg, then))
            return
        member = self.membership.members.get(node)
        if member is None or member.state in (DEAD, LEFT):
            then(None, f"node {node} is not a live member", now)
            return
        self._call_seq += 1
        self._calls[self._call_seq] = then
        self._out.append(Call(self._call_seq, node, member.addr, msg, self.config.call_timeout))

    # --- inputs -------------------------------------------------------------------------

    def step_packet(self, src: str, data: bytes, now: float) -> None:
        try:
            msgs = wire.decode_packet(data)
        except wire.DecodeError:
            self._count("packets_dropped_malformed")
            return
        self.membership.step(src, msgs, now)
        self._after_input(now)

    def call_result(self, call_id: int, reply: wire.Message | None, error: str,
                    now: float) -> None:
        then = self._calls.pop(call_id, None)
        if then is not None:
            then(reply, error, now)
            self._after_input(now)

    def tick(self, now: float) -> None:
        self.membership.tick(now)
        for lease in self.leases.expire(now):
            self._log("lease_expired", lease=lease.id, job=lease.job_id)
            self._out.append(PersistLease(lease))
            self._publish_facts()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + 0.5
            if self._joining_until and now >= self._joining_until:
                self._joining_until = 0.0
                self._dirty_election = True
            self._tick_origin(now)
            for job_id, when in list(self._cancel_retry.items()):
                job = self.jobs.get(job_id)
                if job is None or job.terminal or job.state not in (PLACED, RUNNING):
                    del self._cancel_retry[job_id]
                elif when <= now and job.node not in self._owner_away:
                    self._send_cancel(job, now)
            for node, since in list(self._owner_away.items()):
                if now - since >= self.config.owner_away_limit:
                    del self._owner_away[node]
                    self._lose_jobs_on(node, f"owner {node} left the mesh and was not back "
                                             f"within {self.config.owner_away_limit:g} s")
            self.scheduler.prune_placed(now - 4 * self.config.lease_ttl)
            self._dirty_schedule = self._dirty_schedule or bool(self.scheduler.queue)
        self._after_input(now)

    def next_deadline(self) -> float:
        times = [self.membership.next_deadline(), self._next_housekeeping]
        lease_deadline = self.leases.next_deadline()
        if lease_deadline is not None:
            times.append(lease_deadline)
        return min(times)

    def _after_input(self, now: float) -> None:
        self._now = now
        while True:
            self._pull_membership()
            if self._dirty_election:
                self._dirty_election = False
                self._elect(now)
            if self._dirty_schedule and self.is_coordinator:
                self._dirty_schedule = False
                self._schedule(now)
            if not self._self_calls:
                break
            msg, then = self._self_calls.pop(0)
            then(self._dispatch(msg, now), "", now)

    # --- membership and election --------------------------------------------------------

    @property
    def is_coordinator(self) -> bool:
        return self.belief.coordinator == self.name

    def _on_member_event(self, ev: MemberEvent) -> None:
        self._dirty_election = True
        self._dirty_schedule = True
        self._refresh_voter(ev.name)
        if ev.state in (DEAD, LEFT):
            self._owner_gone(ev.name, ev.state)
        elif ev.state == ALIVE and self._owner_away.pop(ev.name, None) is not None:
            self._owner_back(ev.name)

    def _refresh_voter(self, name: str) -> bool:
        """Read a member again as the election sees it; True when that changed."""
        m = self.membership.members.get(name)
        if m is None:
            return self._voter_map.pop(name, None) is not None
        voter = _voter(m)
        if self._voter_map.get(name) == voter:
            return False
        self._voter_map[name] = voter
        return True

    def _voters(self) -> list[Voter]:
        """Every member as the election sees it: kept per member and read again only when
        an event touches it (at 30% loss state flips are many, and members thousands)."""
        vm, members = self._voter_map, self.membership.members
        if len(vm) != len(members) or any(n not in members for n in vm):
            for name in [n for n in vm if n not in members]:
                del vm[name]  # reaped
            for name, m in members.items():
                if name not in vm:
                    vm[name] = _voter(m)
        return list(vm.values())

    def join(self, seeds: list[str], now: float) -> None:
        """Join the mesh through seeds. Until the first exchange with one of them (or a
        grace period), a lone node does not elect itself: a node that is joining should
        not claim a term only to give the role up a moment later."""
        if seeds:
            self._joining_until = now + 4 * self.config.membership.probe_interval
        self.membership.join(seeds)
        self._after_input(now)

    def _elect(self, now: float) -> None:
        if self._joining_until > now and self.membership.live_count() == 1:
            return  # tick() or the first push-pull reply elects
        voters = self._voters()
        before = self.belief
        self.belief, claim = decide(voters, self.name, self.belief, self.claim)
        term_seen = max(self.max_term, self.belief.term, max((max(v.claim, v.max_term)
                                                               for v in voters), default=0))
        changed_claim = claim != self.claim
        self.claim = claim
        if term_seen != self.max_term or changed_claim:
            self.max_term = term_seen
            self._publish_facts()
        if self.belief != before:
            self._log("coordinator", name=self.belief.coordinator, term=self.belief.term)
            if self.belief.coordinator != before.coordinator and not self.is_coordinator:
                self.scheduler.reset()  # their origins re-submit to the new one
            for st in self._origin.values():
                st.sent_to = None
                st.next_submit = now
            self._dirty_schedule = True

    # --- facts --------------------------------------------------------------------------

    def set_devices(self, devices: list[Device], lendable: dict[str, tuple[int, int]]) -> None:
        """Declare local devices and what of each may be lent (capacity minus local use)."""
        known = set(self.devices)
        self.devices = {d.id: d for d in devices}
        for d in devices:
            lend_c, lend_m = lendable.get(d.id, (d.compute_milli, d.memory_mib))
            if not d.healthy:
                # Lend nothing more, but do not take back what runs: a failing reading is
                # not a reason to kill jobs (a device that is gone is, below).
                lend_c, lend_m = self.leases.used(d.id)
            self.leases.set_device(d.id, d.compute_milli, d.memory_mib, lend_c, lend_m)
        for gone in known - set(self.devices):
            for lease in self.leases.remove_device(gone):
                self._out.append(PersistLease(lease))
                self.stop_job(lease.job_id, f"device {gone} is gone", LOST, self._now)
        for d in devices:
            self._reclaim(d.id)
        self._publish_facts()

    def _reclaim(self, device: str) -> None:
        """The owner's own use grew into what was lent: take fractions back.

        Victims are the lowest-priority, then newest, jobs on the device, until what stays
        leased fits what the owner can lend now. Reserved leases whose job has not started
        go first: nothing runs on them yet.
        """
        lend_c, lend_m = self.leases.lendable(device)
        used_c, used_m = self.leases.used(device, excluding=set(self._stopping))
        if used_c <= lend_c and used_m <= lend_m:
            return
        active = [x for x in self.leases.active() if x.holds(device)
                  and x.job_id not in self._stopping]
        active.sort(key=lambda x: (x.state != "reserved", x.priority, -x.created))
        for lease in active:
            if used_c <= lend_c and used_m <= lend_m:
                break
            used_c -= lease.compute_milli
            used_m -= lease.memory_mib
            self._count("reclaims")
            self._take_back(lease, f"reclaimed by {self.name}: its own workload needs {device}")

    def _take_back(self, lease: Lease, reason: str) -> None:
        """Owner: end a lease before its job is done; a running job is preempted."""
        if lease.job_id in self.jobs and self.jobs[lease.job_id].role in ("owner", "both"):
            self.stop_job(lease.job_id, reason, PREEMPTED, self._now)
        else:  # reserved, its job not started here: nothing runs on it yet
            self.leases.release(lease.id)
            self._out.append(PersistLease(lease))
            self._log("lease_reclaimed", lease=lease.id, job=lease.job_id)
            self._publish_facts()

    def _handle_preempt(self, msg: wire.Preempt, now: float) -> wire.Message:
        """Owner: a coordinator stops preemptible jobs here for a higher-priority one."""
        if msg.term < self.leases.max_term:
            return wire.Error(f"stale coordinator term {msg.term} (this owner has seen "
                              f"{self.leases.max_term})")
        held = {x.job_id: x for x in self.leases.active()}
        stopped, refused = [], []
        for job_id in msg.job_ids:
            lease = held.get(job_id)
            if lease is None or not lease.preemptible or lease.priority >= msg.priority:
                # gone already, never preemptible, or not below the request: left alone
                refused.append(job_id)
                continue
            if job_id in self._stopping:
                stopped.append(job_id)  # already on its way out
                continue
            stopped.append(job_id)
            self._count("preempted")
            self._take_back(lease, msg.reason)
        self._log("preempted", jobs=stopped, refused=refused, coordinator=msg.coordinator)
        if not stopped:
            return wire.Error(f"no preemptible job among {', '.join(msg.job_ids)}")
        return wire.Ok(f"stopping {len(stopped)}")

    def _publish_facts(self) -> None:
        rows = []
        for d in self.devices.values():
            used_c, used_m = self.leases.used(d.id)
            free_c, free_m = self.leases.free(d.id)
            rows.append([d.id, d.kind, d.model, d.memory_mib, d.compute_milli, used_c, used_m,
                         free_c, free_m, d.backend, d.healthy, self.enforcement])
        facts = {
            "dev": rows, "prio": self.config.priority, "elig": self.config.eligible,
            "claim": self.claim, "mt": self.max_term,
        }
        # Jobs a higher-priority request may preempt here, cheapest first (lowest
        # priority, then least device share, then newest), as many as leave the facts
        # within one datagram.
        pre = sorted(
            (x for x in self.leases.active()
             if x.preemptible and x.job_id not in self._stopping),
            key=lambda x: (x.priority, x.compute_milli * len(x.devices), -x.token),
        )[:MAX_GOSSIPED_PREEMPTIBLE]
        rows = [[x.job_id, list(x.devices), x.compute_milli, x.memory_mib, x.priority]
                for x in pre]
        me = self.membership.me
        while rows:
            facts["pre"] = rows
            size = len(wire.encode_message(
                wire.Facts(self.name, me.incarnation, me.facts_version + 1, facts)))
            if size + wire.packet_overhead(1) <= wire.UDP_BUDGET:
                break
            rows.pop()  # the costliest victims go first: facts that fit keep travelling
        else:
            facts.pop("pre", None)
        if facts != self.membership.me.facts:  # unchanged facts are not news to gossip
            self.membership.set_facts(facts)

    def preemptible_jobs(self) -> list[RunningJob]:
        """Preemptible jobs on alive nodes, as their owners gossip them."""
        out = []
        for m in self.membership.members.values():
            if m.state == ALIVE:
                out.extend(_preemptible_rows(m))
        return out

    def candidates(self, nodes: set[str] | None = None) -> list[Candidate]:
        out = []
        for name, cands in self.candidates_by_node().items():
            if nodes is None or name in nodes:
                out.extend(cands)
        return out

    def candidates_by_node(self) -> dict[str, list[Candidate]]:
        """Each alive member's devices as placement candidates. A member's list is built
        again only when its facts change, and is otherwise the very same object (the
        scheduler's index skips what it has already seen)."""
        out: dict[str, list[Candidate]] = {}
        cache = self._candidate_cache
        for m in self.membership.members.values():
            if m.state != ALIVE:
                continue
            key = (m.facts_inc, m.facts_version)
            hit = cache.get(m.name)
            if hit is None or hit[0] != key:
                hit = cache[m.name] = (key, _device_candidates(m))
            if hit[1]:
                out[m.name] = hit[1]
        if len(cache) > 2 * len(self.membership.members):
            for name in [n for n in cache if n not in self.membership.members]:
                del cache[name]
        return out

    # --- coordinator --------------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        versions = {m.name: m.facts_version for m in self.membership.members.values()}
        self.scheduler.prune_shadows(versions)
        view = self.scheduler.apply_shadows_by_node(self.candidates_by_node())
        self.scheduler.running = self.preemptible_jobs()
        for prop in self.scheduler.propose(view, now):
            if isinstance(prop, PreemptOrder):
                self._send_preempt(prop, now)
                continue
            s = prop.submit
            first, *more = prop.placement.devices
            req = wire.LeaseRequest(s.job_id, s.origin, first, s.compute_milli,
                                    s.memory_mib, self.belief.term, self.name, more,
                                    s.priority, s.preemptible)
            self._log("propose", job=s.job_id, node=prop.placement.node,
                      device=",".join(prop.placement.devices))
            owner = prop.placement.node
            gang = (s.gang, req.term) if s.gang else None
            if gang is not None:
                self._gang_asks.setdefault(gang, {})[s.job_id] = (req, owner, None)
            self._call(owner, req, self._lease_reply_handler(req, owner, gang), now)

    def _send_preempt(self, order: PreemptOrder, now: float) -> None:
        reason = f"preempted for job {order.job_id} (priority {order.priority})"
        msg = wire.Preempt(list(order.victims), reason, self.belief.term, self.name,
                           order.priority)
        self._log("preempt", job=order.job_id, node=order.node, victims=list(order.victims))

        def then(reply: wire.Message | None, error: str, t: float) -> None:
            if not isinstance(reply, wire.Ok):
                why = reply.reason if isinstance(reply, wire.Error) else error
                self._log("preempt_failed", job=order.job_id, node=order.node, error=why)
                if isinstance(reply, wire.Error):
                    # The owner stopped none of them (stale term, or they ended already):
                    # choose again once its gossip can show what is free. On no answer at
                    # all it may be stopping them: the hold stays.
                    self.scheduler.preempt_failed(order.job_id, t + PREEMPT_RECHECK)
        self._call(order.node, msg, then, now)

    def _lease_reply_handler(self, req: wire.LeaseRequest, owner: str,
                             gang: tuple[str, int] | None = None) -> Continuation:
        def then(reply: wire.Message | None, error: str, now: float) -> None:
            if (isinstance(reply, wire.LeaseReply) and reply.granted and req.more
                    and reply.devices != [req.device, *req.more]):
                # An owner of an older version granted the first device only: not what
                # the job asked for. Given back (else it lapses unstarted at its TTL).
                self._call(owner, wire.Release(req.job_id, reply.lease_id, reply.token),
                           _ignore, now)
                reply = wire.LeaseReply(False, "", 0, reply.facts_version,
                                        f"{owner} cannot lease several devices at once")
            answer: wire.LeaseReply | str
            if isinstance(reply, wire.LeaseReply) and reply.granted:
                answer = reply
            else:
                answer = reply.reason if isinstance(reply, wire.LeaseReply) else (
                    error or f"unexpected reply {type(reply).__name__}")
            asks = self._gang_asks.get(gang) if gang is not None else None
            if asks is None:
                self._lease_answered(req, owner, answer, now)
                return
            asks[req.job_id] = (req, owner, answer)
            if any(a is None for _, _, a in asks.values()):
                return  # the gang's other owners have not all answered yet
            del self._gang_asks[gang]
            refused = [(r, o, a) for r, o, a in asks.values() if isinstance(a, str)]
            if not refused and (not self.is_coordinator or self.belief.term != req.term):
                # No longer the coordinator of that term: the new one places the gang
                # afresh, so these grants must not reach the origin as well.
                refused = [(req, owner, f"coordinator term {req.term} is over")]
            if not refused:
                for r, o, a in asks.values():
                    if a is not None:
                        self._lease_answered(r, o, a, now)
                return
            # All or nothing: one owner refused, so the leases the others granted are
            # given back at once (if this is lost, they lapse unstarted at their TTL).
            r0, o0, why = refused[0]
            reason = f"gang member {r0.job_id} on {o0}: {why}"
            for r, o, a in asks.values():
                if isinstance(a, wire.LeaseReply):
                    self._call(o, wire.Release(r.job_id, a.lease_id, a.token), _ignore, now)
                self._lease_answered(r, o, reason if not isinstance(a, str) else a, now)
        return then

    def _lease_answered(self, req: wire.LeaseRequest, owner: str,
                        answer: wire.LeaseReply | str, now: float) -> None:
        if isinstance(answer, wire.LeaseReply):
            placed = wire.Placed(req.job_id, owner, req.device, answer.lease_id, answer.token,
                                 req.term, list(req.more))
            self.scheduler.granted(req.job_id, placed, req.compute_milli, req.memory_mib,
                                   answer.facts_version, now)
            self._log("placed", job=req.job_id, node=owner, device=req.device,
                      lease=answer.lease_id)
            self._call(req.origin, placed, _ignore, now)
            return
        self._log("lease_refused", job=req.job_id, node=owner, reason=answer)
        self.scheduler.refused(req.job_id, answer, now)
        self._dirty_schedule = True

    def _handle_submit(self, msg: wire.Submit, now: float) -> wire.Message:
        if not self.is_coordinator:
            return wire.Error(f"not the coordinator (ask {self.belief.coordinator})")
        if not (0 < msg.compute_milli <= 1000 and msg.memory_mib >= 0 and msg.count >= 1
                and (msg.count == 1 or msg.compute_milli == 1000)):
            return wire.Error(f"a request of {msg.count} x {msg.compute_milli} milli, "
                              f"{msg.memory_mib} MiB cannot be placed")
        if msg.gang and (msg.preemptible or not 2 <= msg.gang_size <= MAX_GANG
                         or not 0 <= msg.rank < msg.gang_size):
            return wire.Error(f"gang member {msg.rank} of {msg.gang_size} cannot be placed "
                              f"(a gang has 2 to {MAX_GANG} members, none preemptible)")
        result = self.scheduler.enqueue(msg, now)
        if isinstance(result, wire.Placed):
            return result
        self._dirty_schedule = True
        return wire.Ok(result.reason)

    # --- owner --------------------------------------------------------------------------

    def _handle_lease_request(self, msg: wire.LeaseRequest, now: float) -> wire.Message:
        result = self.leases.request(
            job_id=msg.job_id, device=msg.device, compute_milli=msg.compute_milli,
            memory_mib=msg.memory_mib, term=msg.term, coordinator=msg.coordinator,
            origin=msg.origin, now=now, ttl=self.config.lease_ttl, more=tuple(msg.more),
            priority=msg.priority, preemptible=msg.preemptible,
        )
        if isinstance(result, Refusal):
            self._count("leases_refused")
            return wire.LeaseReply(False, "", 0, self.membership.me.facts_version, result.reason)
        if result.term > self.max_term:
            self.max_term = result.term
            self._dirty_election = True
        self._out.append(PersistLease(result))
        self._publish_facts()
        return wire.LeaseReply(True, result.id, result.token, self.membership.me.facts_version,
                               "", list(result.devices))

    def _handle_release(self, msg: wire.Release) -> wire.Message:
        lease = self.leases.leases.get(msg.lease_id)
        if (lease is None or lease.job_id != msg.job_id or lease.token != msg.token
                or lease.state != RESERVED):
            return wire.Ok("nothing to give back")  # started, expired, or not ours
        released = self.leases.release(lease.id)
        if released is not None:
            self._out.append(PersistLease(released))
            self._publish_facts()
        self._log("lease_released", job=msg.job_id, lease=msg.lease_id)
        return wire.Ok("released")

    def _handle_start(self, msg: wire.StartJob, now: float) -> wire.Message:
        job = self.jobs.get(msg.job_id)
        if job is not None and job.lease_id == msg.lease_id and job.role in ("owner", "both"):
            return wire.Ok(job.state)  # already started: starting is idempotent
        result = self.leases.start(msg.lease_id, msg.job_id, msg.token)
        if isinstance(result, Refusal):
            return wire.Error(result.reason)
        held = [self.devices.get(d) for d in result.devices]
        gone = [d for d, dev in zip(result.devices, held, strict=True) if dev is None]
        if gone:
            self.leases.release(result.id)
            return wire.Error(f"device {','.join(gone)} is gone")
        device, *more = [dev for dev in held if dev is not None]
        if job is not None and job.role == "owner" and job.terminal:
            job = None  # an earlier run here ended (preempted): this is a new attempt
        if job is None:
            job = JobRecord(
                id=msg.job_id, origin=msg.origin, command=list(msg.command),
                compute_milli=result.compute_milli, memory_mib=result.memory_mib,
                env=dict(msg.env), created_at=now, role="owner",
            )
            self.jobs[job.id] = job
        else:
            job.role = "both"
            job.env = dict(msg.env)  # as the origin sends it (a gang member: with the gang's)
        job.state, job.node, job.device = PLACED, self.name, result.device
        job.more_devices = list(result.more)
        job.lease_id, job.token, job.term = result.id, result.token, result.term
        job.updated_at, job.pid, job.exit_code = now, None, None
        job.attempts += 1
        self._out.append(PersistLease(result))
        self._out.append(PersistJob(replace(job)))
        self._out.append(RunJob(replace(job), device, tuple(more)))
        self._log("job_start", job=job.id, device=",".join(result.devices), origin=job.origin)
        return wire.Ok("starting")

    def job_started(self, job_id: str, pid: int, pid_start: int | None, now: float,
                    lease_id: str | None = None) -> None:
        """The process of a job this node runs (under ``lease_id``, as RunJob gave it) has
        started."""
        job = self.jobs.get(job_id)
        current = (job is not None and job.role in ("owner", "both") and job.state == PLACED
                   and (lease_id is None or job.lease_id == lease_id))
        if not current:
            # Stopped (cancelled, preempted, reclaimed) while its process was being started,
            # maybe requeued since: its lease is given back, so the process must not run on.
            self._log("stale_start", job=job_id, pid=pid)
            self._out.append(StopJob(job_id, "stopped before it had started",
                                     job.state if job is not None and job.terminal
                                     else CANCELLED))
            return
        assert job is not None
        job.state, job.pid, job.pid_start, job.updated_at = RUNNING, pid, pid_start, now
        self._out.append(PersistJob(replace(job)))
        self._after_input(now)

    def job_exited(self, job_id: str, exit_code: int | None, reason: str, now: float,
                   state: str | None = None) -> None:
        """The process of a job this node owns has ended (or could not start)."""
        job = self.jobs.get(job_id)
        if (job is None or job.terminal or job.role not in ("owner", "both")
                or job.state not in (PLACED, RUNNING)):
            return  # not a run of ours (any more): e.g. stopped while starting, requeued
        stop = self._stopping.pop(job_id, None)
        if stop is not None:
            state, reason = stop.state, stop.reason
        elif state is None:
            state = SUCCEEDED if exit_code == 0 else FAILED
        self._end_job(job, exit_code, reason, now, state)
        self._after_input(now)

    def _end_job(self, job: JobRecord, exit_code: int | None, reason: str, now: float,
                 state: str) -> None:
        job.state, job.exit_code, job.reason, job.updated_at = state, exit_code, reason, now
        lease = self.leases.release(job.lease_id)
        if lease is not None:
            self._out.append(PersistLease(lease))
        self._log("job_end", job=job.id, state=state, reason=reason)
        self._publish_facts()
        if job.role == "both" and state == PREEMPTED and job.requeue and not job.gang:
            self._requeue(job, f"preempted on {job.node}/{job.device}: {reason}", now)
        else:
            self._out.append(PersistJob(replace(job)))
            if job.role == "both":
                self._gang_ended(job, now)

    def _followed_on(self, node: str) -> list[JobRecord]:
        return [j for j in self.jobs.values()
                if j.role == "origin" and j.node == node and j.state in (PLACED, RUNNING)]

    def _owner_gone(self, node: str, state: str) -> None:
        """Origin: the owner of some of our jobs died (they are lost) or left the mesh
        (they go on there, and are followed again when it comes back)."""
        if state == LEFT:
            jobs = self._followed_on(node)
            if jobs:
                self._owner_away[node] = self._now
            for job in jobs:
                job.reason = (f"owner {node} left the mesh; the job goes on there and is "
                              f"followed again when {node} is back")
                self._out.append(PersistJob(replace(job)))
            return
        self._owner_away.pop(node, None)
        self._lose_jobs_on(node, f"node {node} died")

    def _lose_jobs_on(self, node: str, reason: str) -> None:
        for job in self._followed_on(node):
            job.state, job.reason = LOST, reason
            self._out.append(PersistJob(replace(job)))
            self._log("job_lost", job=job.id, node=node)
            self._gang_ended(job, self._now)

    def _owner_back(self, node: str) -> None:
        for job in self._followed_on(node):
            job.reason = ""
            self._out.append(PersistJob(replace(job)))
            if job.cancel_requested:
                self._cancel_retry[job.id] = self._now
            if job.state == RUNNING:
                self._watch(job)  # the runtime does not follow a job twice

    # --- origin -------------------------------------------------------------------------

    def submit(self, job: JobRecord, now: float) -> None:
        """A job accepted on this node (already journaled by the runtime)."""
        self.jobs[job.id] = job
        self._origin[job.id] = _OriginState(next_submit=now)
        self._tick_origin(now)
        self._after_input(now)

    def recover(self, jobs: list[JobRecord], leases: list[Lease],
                adopt: Callable[[JobRecord], bool], now: float) -> None:
        """After a restart: take back the journal's leases and jobs.

        A job this node ran whose process is gone (``adopt`` says whether it could be
        re-watched) ends ``lost`` and gives its lease back; queued jobs are submitted again
        and remote ones followed again.
        """
        for lease in leases:
            if lease.state in ACTIVE:
                self.leases.restore(lease)
        for job in jobs:
            if job.terminal:
                self.jobs[job.id] = job
            elif job.role in ("owner", "both") and job.state in (PLACED, RUNNING):
                self.jobs[job.id] = job
                if not adopt(job):
                    self._log("job_lost", job=job.id, reason="process vanished")
                    self._end_job(job, None, "process vanished while the agent was down", now,
                                  LOST)
            else:
                self.resume(job, now)
        for job in list(self.jobs.values()):
            # a member that ended (or was found gone) while this node was down: its
            # siblings, read after it, end with it
            if job.gang and job.terminal and job.role != "owner":
                self._gang_ended(job, now)
        self._publish_facts()

    def resume(self, job: JobRecord, now: float) -> None:
        """Re-adopt a job read from the journal after a restart."""
        self.jobs[job.id] = job
        if job.role in ("origin", "both") and job.state == QUEUED:
            self._origin[job.id] = _OriginState(next_submit=now)
        elif job.role == "origin" and job.state in (PLACED, RUNNING):
            self._watch(job)
            if job.state == PLACED:  # starting is idempotent: ask again, requeue if refused
                self._origin[job.id] = _OriginState(start_deadline=now + self.config.lease_ttl)
            if job.cancel_requested:
                self._cancel_retry[job.id] = now

    def _tick_origin(self, now: float) -> None:
        for job_id, st in list(self._origin.items()):
            job = self.jobs.get(job_id)
            if job is None or job.state != QUEUED:
                if job is not None and job.state == PLACED and job.role == "origin":
                    self._maybe_retry_start(job, st, now)
                    continue
                del self._origin[job_id]
                continue
            if now >= st.next_submit:
                self._send_submit(job, st, now)

    def _send_submit(self, job: JobRecord, st: _OriginState, now: float) -> None:
        st.next_submit = now + self.config.submit_refresh
        coordinator = self.belief.coordinator
        silent = st.coordinator_silent_since
        fallback = coordinator is None or (
            silent is not None and now - silent >= self.config.local_fallback_after)
        if fallback and not job.gang and self._place_locally(job, now):
            return  # (a gang needs nodes of its own: it waits for a coordinator)
        if coordinator is None:
            return
        msg = wire.Submit(job.id, self.name, job.compute_milli, job.memory_mib, job.kind,
                          job.priority, job.attempts, job.count, job.preemptible, job.gang,
                          job.gang_size, job.rank)
        if coordinator == self.name:
            self._on_submit_reply(job.id, self._handle_submit(msg, now), "", now)
            return

        def then(reply: wire.Message | None, error: str, t: float) -> None:
            self._on_submit_reply(job.id, reply, error, t)
        self._call(coordinator, msg, then, now)

    def _on_submit_reply(self, job_id: str, reply: wire.Message | None, error: str,
                         now: float) -> None:
        st = self._origin.get(job_id)
        job = self.jobs.get(job_id)
        if st is None or job is None:
            return
        if isinstance(reply, wire.Placed):
            self._handle_placed(reply, now)
        elif isinstance(reply, wire.Ok):
            st.sent_to = (self.belief.coordinator or "", self.belief.term)
            st.coordinator_silent_since = None
            if reply.detail and not job.reason.startswith("requeued:"):
                job.reason = reply.detail  # why it waits, as the coordinator sees it
        else:
            if st.coordinator_silent_since is None:
                st.coordinator_silent_since = now
            st.next_submit = min(st.next_submit, now + 1.0)
            self._log("submit_failed", job=job_id, error=error or str(reply))

    def _place_locally(self, job: JobRecord, now: float) -> bool:
        """No coordinator answers: place on this node's own devices if the job fits."""
        req = Request(job.compute_milli, job.memory_mib, job.kind, self.name, job.priority,
                      count=job.count)
        mine = self.candidates({self.name})
        result = self.scheduler.policy(req, mine)
        if isinstance(result, NoFit) or not result.devices:
            return False
        first, *more = result.devices
        lease = self.leases.request(
            job_id=job.id, device=first, compute_milli=job.compute_milli,
            memory_mib=job.memory_mib, term=self.leases.max_term, coordinator=self.name,
            origin=self.name, now=now, ttl=self.config.lease_ttl, more=tuple(more),
            priority=job.priority, preemptible=job.preemptible,
        )
        if isinstance(lease, Refusal):
            return False
        self._out.append(PersistLease(lease))
        self._log("placed_locally", job=job.id, device=",".join(lease.devices))
        self._publish_facts()
        self._accept_placed(wire.Placed(job.id, self.name, first, lease.id, lease.token,
                                        lease.term, list(more)), now)
        return True

    def _handle_placed(self, msg: wire.Placed, now: float) -> wire.Message:
        job = self.jobs.get(msg.job_id)
        if job is None:
            return wire.Error(f"unknown job {msg.job_id}")
        if job.state == PLACED and job.lease_id == msg.lease_id:
            return wire.Ok("already placed")
        if job.state != QUEUED:
            return wire.Error(f"job {msg.job_id} is {job.state}")
        if 1 + len(msg.more) != job.count:
            # A coordinator of an older version placed fewer devices than asked for.
            job.reason = (f"waiting: placed on {1 + len(msg.more)} device(s) by "
                          f"{self.belief.coordinator}, {job.count} asked")
            return wire.Error(f"job {msg.job_id} asks for {job.count} device(s)")
        self._accept_placed(msg, now)
        return wire.Ok("placed")

    def _accept_placed(self, msg: wire.Placed, now: float) -> None:
        job = self.jobs[msg.job_id]
        if job.state != QUEUED:
            return
        job.state, job.node, job.device = PLACED, msg.node, msg.device
        job.more_devices = list(msg.more)
        job.lease_id, job.token, job.term = msg.lease_id, msg.token, msg.term
        job.reason, job.updated_at = "", now
        self._out.append(PersistJob(replace(job)))
        self._log("job_placed", job=job.id, node=msg.node, device=",".join(job.devices))
        st = self._origin.setdefault(job.id, _OriginState())
        st.start_deadline = now + self.config.lease_ttl
        if not job.gang:
            self._send_start(job, now)
            return
        if self._gang_ready(job):
            for m in self._gang_members(job):  # the last is placed: every member starts
                if m.state == PLACED:
                    self._send_start(m, now)

    def _gang_members(self, job: JobRecord) -> list[JobRecord]:
        """Every member of ``job``'s gang known here, by rank."""
        return [j for j in (self.jobs.get(member_id(job.gang, r)) for r in range(job.gang_size))
                if j is not None and j.gang == job.gang]

    def _gang_ready(self, job: JobRecord) -> bool:
        """Whether every member of the gang has its placement (and none has ended): then,
        and only then, the members are started."""
        members = self._gang_members(job)
        return len(members) == job.gang_size and all(m.state in (PLACED, RUNNING)
                                                     for m in members)

    def _gang_env(self, job: JobRecord) -> dict[str, str]:
        """What a gang member's process is told of its gang: where each rank runs."""
        members = self._gang_members(job)
        addrs = []
        for m in members:
            member = self.membership.members.get(m.node)
            host = member.addr.rsplit(":", 1)[0] if member is not None else ""
            addrs.append(host.strip("[]"))
        return {
            "FLEXMESH_GANG": job.gang,
            "FLEXMESH_GANG_RANK": str(job.rank),
            "FLEXMESH_GANG_SIZE": str(job.gang_size),
            "FLEXMESH_GANG_NODES": ",".join(m.node for m in members),
            "FLEXMESH_GANG_ADDRS": ",".join(addrs),
        }

    def _send_start(self, job: JobRecord, now: float) -> None:
        # The user's variables, none of flexmesh's own names (the owner sets those; the
        # gang's are set here)
        env = {k: v for k, v in job.env.items() if not k.startswith("FLEXMESH_")}
        if job.gang:
            env.update(self._gang_env(job))
        msg = wire.StartJob(job.id, job.lease_id, job.token, self.name, job.command, env,
                            job.compute_milli, job.memory_mib)
        if job.node == self.name:
            reply = self._handle_start(msg, now)
            self._on_start_reply(job.id, reply, "", now)
            return

        def then(reply: wire.Message | None, error: str, t: float) -> None:
            self._on_start_reply(job.id, reply, error, t)
        st = self._origin.get(job.id)
        if st is not None:
            st.start_inflight = True
        self._call(job.node, msg, then, now)

    def _on_start_reply(self, job_id: str, reply: wire.Message | None, error: str,
                        now: float) -> None:
        job = self.jobs.get(job_id)
        st = self._origin.get(job_id)
        if st is not None:
            st.start_inflight = False
        if job is None or job.state != PLACED:
            return
        if isinstance(reply, wire.Ok):
            self._origin.pop(job_id, None)
            if job.role == "origin":
                self._watch(job)
        elif isinstance(reply, wire.Error):
            why = f"owner {job.node} refused to start: {reply.reason}"
            if job.gang:  # its siblings may run already: the gang ends (see _gang_ended)
                self._end_origin_job(job, FAILED, why, now)
            else:
                self._requeue(job, why, now)
        # No reply at all: _tick_origin retries until the lease would have expired.

    def _maybe_retry_start(self, job: JobRecord, st: _OriginState, now: float) -> None:
        if st.start_inflight:
            return
        gang_waits = bool(job.gang) and not self._gang_ready(job)
        if now >= st.start_deadline:
            why = f"owner {job.node} did not answer before the lease expired"
            if job.gang and not gang_waits and not job.cancel_requested:
                # a start was sent: it may run there, unheard; told to stop, once
                self._call(job.node, wire.Cancel(job.id, why), _ignore, now)
                self._end_origin_job(job, LOST, why, now)
            else:
                self._requeue(job, why, now)
        elif not job.cancel_requested and not gang_waits:
            # (cancelled: let the reservation lapse; a gang member whose siblings are not
            # all placed yet: starts with them)
            self._send_start(job, now)

    def _end_origin_job(self, job: JobRecord, state: str, reason: str, now: float) -> None:
        """Origin: a job ends here without (more) word from its owner."""
        job.state, job.reason, job.updated_at = state, reason, now
        self._origin.pop(job.id, None)
        self._out.append(PersistJob(replace(job)))
        self._log("job_end", job=job.id, state=state, reason=reason)
        self._gang_ended(job, now)

    def _gang_ended(self, job: JobRecord, now: float) -> None:
        """A gang member ended: if it did not succeed, its siblings are cancelled (a gang
        runs all together or not at all)."""
        if not job.gang or job.state == SUCCEEDED or not job.terminal:
            return
        for m in self._gang_members(job):
            if m.id == job.id or m.terminal or m.role == "owner":
                continue
            self._log("gang_stop", job=m.id, because=job.id)
            self.cancel(m.id, now, f"gang member {job.id} {job.state}: {job.reason}")

    def _requeue(self, job: JobRecord, reason: str, now: float) -> None:
        if job.cancel_requested:  # it ended there before the cancel arrived: done
            job.state, job.updated_at = CANCELLED, now
            job.reason = job.reason or "cancelled by user"
            job.role = "origin" if job.role == "both" else job.role
            self._out.append(PersistJob(replace(job)))
            self._origin.pop(job.id, None)
            self._gang_ended(job, now)
            return
        self._log("job_requeued", job=job.id, reason=reason)
        if job.attempts or job.state in (RUNNING, PLACED):
            self._out.append(ArchiveOutput(job.id))
        job.state, job.node, job.device, job.lease_id, job.token = QUEUED, "", "", "", 0
        job.more_devices = []
        job.role = "origin" if job.role == "both" else job.role
        job.pid = job.pid_start = job.exit_code = None
        job.attempts += 1
        job.reason, job.updated_at = f"requeued: {reason}", now
        self._out.append(PersistJob(replace(job)))
        self._origin[job.id] = _OriginState(next_submit=now)

    def _watch(self, job: JobRecord) -> None:
        # The owner may not be known yet (right after a restart): the runtime looks its
        # address up at every attempt.
        self._out.append(WatchJob(job.id, job.node))

    def remote_update(self, job_id: str, state: str, reason: str, exit_code: int | None,
                      now: float, lease_id: str | None = None) -> None:
        """Origin: what the owner reported about a job it runs (under ``lease_id``, when the
        caller knows which placement it followed)."""
        job = self.jobs.get(job_id)
        if job is None or job.terminal or state == job.state or state in (QUEUED, ""):
            return
        if lease_id is not None and lease_id != job.lease_id:
            return  # about an earlier placement of this job
        if job.state not in (PLACED, RUNNING):
            return  # a late report about a placement this job has left (requeued since)
        if state == PREEMPTED and job.requeue and not job.gang:
            self._requeue(job, f"preempted on {job.node}/{job.device}: {reason}", now)
            return
        job.state, job.reason, job.exit_code, job.updated_at = state, reason, exit_code, now
        self._out.append(PersistJob(replace(job)))
        self._gang_ended(job, now)

    def cancel(self, job_id: str, now: float, reason: str = "cancelled by user") -> str:
        """Cancel a job submitted here; returns what was done, for the user."""
        job = self.jobs.get(job_id)
        if job is None:
            return "unknown"
        if job.terminal:
            return job.state
        if job.state == QUEUED:
            coordinator = self.belief.coordinator
            if coordinator == self.name:
                self.scheduler.withdraw(job_id)
            elif coordinator:
                self._call(coordinator, wire.Withdraw(job_id), _ignore, now)
            self._end_origin_job(job, CANCELLED, reason, now)
            return CANCELLED
        if job.gang and job.state == PLACED and not self._gang_ready(job):
            # placed, but never started (its gang is not all placed): nothing runs; the
            # lease its owner reserved is given back
            release = wire.Release(job.id, job.lease_id, job.token)
            if job.node == self.name:
                self._handle_release(release)
            else:
                self._call(job.node, release, _ignore, now)
            self._end_origin_job(job, CANCELLED, reason, now)
            return CANCELLED
        if job.node == self.name:
            self._handle_cancel(wire.Cancel(job_id, reason), now)
        else:
            # Told to the owner until it answers: a cancel is never lost to a failed call
            # or an owner that is away for a while.
            job.cancel_requested = True
            job.reason = reason
            self._out.append(PersistJob(replace(job)))
            self._send_cancel(job, now)
        self._after_input(now)
        return "cancelling"

    def _send_cancel(self, job: JobRecord, now: float) -> None:
        self._cancel_retry.pop(job.id, None)

        def then(reply: wire.Message | None, error: str, t: float) -> None:
            current = self.jobs.get(job.id)
            if current is None or current.terminal or not current.cancel_requested:
                return
            if isinstance(reply, wire.Error) and current.state == RUNNING:
                # The owner answered and runs no such job (it lost it): nothing to stop.
                self._end_origin_job(current, CANCELLED, f"{current.reason or 'cancelled by user'}"
                                     f" ({job.node}: {reply.reason})", t)
            elif not isinstance(reply, wire.Ok):
                self._log("cancel_retry", job=job.id, node=job.node,
                          error=reply.reason if isinstance(reply, wire.Error) else error)
                self._cancel_retry[job.id] = t + CANCEL_RETRY
        self._call(job.node, wire.Cancel(job.id, job.reason or "cancelled by user"), then, now)

    def _handle_cancel(self, msg: wire.Cancel, now: float) -> wire.Message:
        job = self.jobs.get(msg.job_id)
        if job is None or job.role not in ("owner", "both"):
            return wire.Error(f"no job {msg.job_id} runs here")
        if job.terminal:
            return wire.Ok(job.state)
        self.stop_job(job.id, msg.reason, CANCELLED, now)
        return wire.Ok("stopping")

    def stop_job(self, job_id: str, reason: str, state: str, now: float) -> None:
        """Owner: stop a job's process; it ends in ``state`` with ``reason``."""
        job = self.jobs.get(job_id)
        if job is None or job.terminal or job_id in self._stopping:
            return
        stop = StopJob(job_id, reason, state)
        self._stopping[job_id] = stop
        self._log("job_stop", job=job_id, state=state, reason=reason)
        if job.state == PLACED and job.pid is None:
            # Not started yet: nothing to signal.
            self._stopping.pop(job_id)
            self._end_job(job, None, reason, now, state)
            return
        self._out.append(stop)

    # --- requests from peers ------------------------------------------------------------

    def handle_request(self, msg: wire.Message, now: float) -> wire.Message:
        reply = self._dispatch(msg, now)
        self._after_input(now)
        return reply

    def _dispatch(self, msg: wire.Message, now: float) -> wire.Message:
        reply: wire.Message
        if isinstance(msg, wire.Submit):
            reply = self._handle_submit(msg, now)
        elif isinstance(msg, wire.Withdraw):
            self.scheduler.withdraw(msg.job_id)
            reply = wire.Ok("withdrawn")
        elif isinstance(msg, wire.LeaseRequest):
            reply = self._handle_lease_request(msg, now)
        elif isinstance(msg, wire.Placed):
            reply = self._handle_placed(msg, now)
        elif isinstance(msg, wire.StartJob):
            reply = self._handle_start(msg, now)
        elif isinstance(msg, wire.Cancel):
            reply = self._handle_cancel(msg, now)
        elif isinstance(msg, wire.Preempt):
            reply = self._handle_preempt(msg, now)
        elif isinstance(msg, wire.Release):
            reply = self._handle_release(msg)
        elif isinstance(msg, wire.PushPull):
            self.membership.merge_remote_state(msg.states, now)
            reply = wire.PushPull(False, self.name, self.membership.local_state())
        else:
            self._count("unexpected_requests")
            reply = wire.Error(f"unexpected request {type(msg).__name__}")
        return reply

    def pushpull_request(self, join: bool) -> wire.PushPull:
        return wire.PushPull(join, self.name, self.membership.local_state())

    def pushpull_reply(self, reply: wire.Message | None, now: float) -> None:
        if isinstance(reply, wire.PushPull):
            self.membership.merge_remote_state(reply.states, now)
            self._after_input(now)

    # --- views for the API ----------------------------------------------------------------

    def nodes_view(self) -> list[dict[str, Any]]:
        return [
            {"name": m.name, "address": m.addr, "state": m.state, "incarnation": m.incarnation,
             "coordinator": m.name == self.belief.coordinator,
             "devices": len(m.facts.get("dev", []) if isinstance(m.facts.get("dev"), list)
                            else [])}
            for m in sorted(self.membership.members.values(), key=lambda m: m.name)
        ]

    def devices_view(self) -> list[dict[str, Any]]:
        out = []
        for m in sorted(self.membership.members.values(), key=lambda m: m.name):
            if m.state != ALIVE:
                continue
            for row in _device_rows(m):
                out.append({
                    "node": m.name, "id": row[0], "kind": row[1], "model": row[2],
                    "memory_mib": row[3], "compute_milli": row[4],
                    "leased_compute_milli": row[5], "leased_memory_mib": row[6],
                    "lendable_compute_milli": row[7], "lendable_memory_mib": row[8],
                    "backend": row[9], "healthy": row[10],
                    "enforcement": row[11] if len(row) > 11 and isinstance(row[11], str)
                    else "unknown",
                })
        return out


def _ignore(reply: wire.Message | None, error: str, now: float) -> None:
    """For calls whose answer changes nothing (the other side retries on its own)."""


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


_ROW_TYPES = (str, str, str, int, int, int, int, int, int, str, bool)


def _device_rows(m: Member) -> list[list[Any]]:
    """A member's device rows, skipping any that do not have the expected shape, that name
    a device twice or that claim no capacity."""
    rows = m.facts.get("dev")
    if not isinstance(rows, list):
        return []
    out, ids = [], set()
    for r in rows:
        if (isinstance(r, list) and len(r) >= len(_ROW_TYPES)
                and all(isinstance(v, t) and (t is not int or not isinstance(v, bool))
                        for v, t in zip(r, _ROW_TYPES, strict=False))
                and r[0] not in ids and r[3] >= 0 and r[4] > 0):
            ids.add(r[0])
            out.append(r)
    return out


def _voter(m: Member) -> Voter:
    f = m.facts
    return Voter(m.name, m.state, _int(f.get("prio")), bool(f.get("elig", True)),
                 _int(f.get("claim")), _int(f.get("mt")))


def _preemptible_rows(m: Member) -> list[RunningJob]:
    rows = m.facts.get("pre")
    out: list[RunningJob] = []
    if not isinstance(rows, list):
        return out
    for r in rows:
        if not (isinstance(r, list) and len(r) >= 5 and isinstance(r[0], str)
                and isinstance(r[1], list) and r[1] and all(isinstance(d, str) for d in r[1])
                and all(isinstance(v, int) and not isinstance(v, bool) for v in r[2:5])
                and r[2] > 0 and r[3] >= 0):
            continue
        devices = tuple(r[1])
        out.append(RunningJob(
            id=r[0], node=m.name, devices=devices, compute_milli=r[2], memory_mib=r[3],
            priority=r[4], preemptible=True,
            # Run times are not comparable across nodes' clocks: the work lost is counted
            # as the device share stopped.
            work_lost=r[2] * len(devices) / 1000,
        ))
    return out


def _device_candidates(m: Member) -> list[Candidate]:
    return [
        Candidate(node=m.name, device=r[0], kind=r[1], model=r[2], compute_milli=r[4],
                  memory_mib=r[3], free_compute_milli=r[7], free_memory_mib=r[8],
                  healthy=r[10])
        for r in _device_rows(m)
    ]
