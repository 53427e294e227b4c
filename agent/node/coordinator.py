"""The coordinator role: exists only while the election has picked this node.

It keeps the queue of jobs waiting for room (``agent.scheduler``), reads every live
member's gossiped devices as placement candidates, proposes a placement, and asks the
owner for a lease; only an owner's grant becomes a ``Placed`` for the job's origin. A gang
is asked for all at once: if one owner refuses, every lease the others granted is given
back (``Release``). When the node stops coordinating this object is dropped with its
queue: the origins submit again to the next coordinator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexmesh.agent.models import request_problem
from flexmesh.agent.node.effects import PendingCall
from flexmesh.agent.node.holdings import HeldIndex
from flexmesh.agent.scheduler import Impossible, PreemptOrder, Proposal
from flexmesh.policies import Candidate, RunningJob
from flexmesh.protocol import facts, wire
from flexmesh.protocol.membership import ALIVE, Member

if TYPE_CHECKING:
    from flexmesh.agent.node.core import Node

PREEMPT_RECHECK = 3.0  # an owner refused a preemption: choose again after this

# An owner's answer to a lease ask: the grant, or why not
Answer = wire.LeaseReply | str
GangAsks = dict[str, tuple[wire.LeaseRequest, str, Answer | None]]


class Coordinator:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.out = node.out
        self.scheduler = node.scheduler
        self._candidates: dict[str, tuple[tuple[int, int], list[Candidate]]] = {}
        # Gangs whose owners are being asked, by (gang, term): member job -> the owner's
        # answer (None until it comes). All granted, or every lease granted is given back.
        self.gang_asks: dict[tuple[str, int], GangAsks] = {}

    def has_queue(self) -> bool:
        return bool(self.scheduler.queue)

    def waits(self) -> bool:
        return bool(self.scheduler.queue or self.scheduler.placed)

    def tick(self, now: float) -> None:
        self.scheduler.prune_placed(now - 4 * self.node.config.lease_ttl)

    def handle_submit(self, msg: wire.Submit, now: float) -> wire.Message:
        problem = request_problem(msg.compute_milli, msg.memory_mib, msg.count,
                                  msg.gang_size if msg.gang else 1, msg.preemptible)
        if problem is None and msg.gang and not (msg.gang_size >= 2
                                                 and 0 <= msg.rank < msg.gang_size):
            problem = f"gang member {msg.rank} of {msg.gang_size} has no place in its gang"
        if problem is not None:
            return wire.Error(f"job {msg.job_id} cannot be placed: {problem}")
        result = self.scheduler.enqueue(msg, now)
        if isinstance(result, (wire.Placed, wire.Unplaceable)):
            return result
        self.node._dirty_schedule = True
        return wire.Ok(result.reason)

    # --- the cluster as the scheduler sees it -------------------------------------------

    def candidates_by_node(self) -> dict[str, list[Candidate]]:
        """Each alive member's devices as placement candidates, once it has answered a
        probe of this node (confirmed). A member's list is built again only when its facts
        change, and is otherwise the very same object (the scheduler's index skips what it
        has already seen)."""
        out: dict[str, list[Candidate]] = {}
        cache, members = self._candidates, self.node.membership.members
        for m in members.values():
            if m.state != ALIVE or not m.confirmed:
                continue  # a member never heard from directly may not even exist
            key = (m.facts_inc, m.facts_version)
            hit = cache.get(m.name)
            if hit is None or hit[0] != key:
                hit = cache[m.name] = (key, device_candidates(m, self.node.facts_of(m)))
            if hit[1]:
                out[m.name] = hit[1]
        if len(cache) > 2 * len(members):
            for name in [n for n in cache if n not in members]:
                del cache[name]
        return out

    def preemptible_jobs(self) -> list[RunningJob]:
        """Preemptible jobs on alive nodes, as their owners gossip them."""
        out: list[RunningJob] = []
        for m in self.node.membership.members.values():
            if m.state == ALIVE and m.confirmed:
                out.extend(_running(m.name, p) for p in self.node.facts_of(m).preemptible)
        return out

    # --- placing ------------------------------------------------------------------------

    def schedule(self, now: float) -> None:
        members = self.node.membership.members.values()
        self.scheduler.shadows.prune({m.name: m.facts_version for m in members})
        view = self.scheduler.shadows.apply_by_node(self.candidates_by_node())
        self.scheduler.running = self.preemptible_jobs()
        members_by_name = self.node.membership.members
        self.scheduler.no_runtime = frozenset(
            n for n in view if not self.node.facts_of(members_by_name[n]).runtimes)
        self.scheduler.saved_for = HeldIndex(self.node)  # (built if a request asks)
        for prop in self.scheduler.propose(view, now):
            if isinstance(prop, PreemptOrder):
                self._send_preempt(prop, now)
            elif isinstance(prop, Impossible):
                # (were this lost, the origin's next Submit of the job is answered so)
                self.out.log("impossible", job=prop.msg.job_id, reason=prop.msg.reason)
                self.node.call(prop.origin, prop.msg, now)
            else:
                self._ask_owner(prop, now)

    def _ask_owner(self, prop: Proposal, now: float) -> None:
        s, asked = prop.submit, prop.request
        first, *more = prop.placement.devices
        req = wire.LeaseRequest(s.job_id, s.origin, first, asked.compute_milli, asked.memory_mib,
                                self.node.belief.term, self.node.name, more, s.priority,
                                s.preemptible, s.container)
        owner = prop.placement.node
        self.out.log("propose", job=s.job_id, node=owner,
                     device=",".join(prop.placement.devices))
        gang = (s.gang, req.term) if s.gang else None
        if gang is not None:
            self.gang_asks.setdefault(gang, {})[s.job_id] = (req, owner, None)
        self.node.call(owner, req, now, gang=gang)

    def _send_preempt(self, order: PreemptOrder, now: float) -> None:
        reason = f"preempted for job {order.job_id} (priority {order.priority})"
        msg = wire.Preempt(list(order.victims), reason, self.node.belief.term, self.node.name,
                           order.priority)
        self.out.log("preempt", job=order.job_id, node=order.node, victims=list(order.victims))
        self.node.call(order.node, msg, now, job_id=order.job_id)

    def on_preempt_reply(self, call: PendingCall, reply: wire.Message | None, error: str,
                         now: float) -> None:
        if isinstance(reply, wire.Ok):
            return
        why = reply.reason if isinstance(reply, wire.Error) else error
        self.out.log("preempt_failed", job=call.job_id, node=call.node, error=why)
        if isinstance(reply, wire.Error):
            # The owner stopped none of them (stale term, or they ended already): choose
            # again once its gossip can show what is free. On no answer at all it may be
            # stopping them: the hold stays.
            self.scheduler.preempt_failed(call.job_id, now + PREEMPT_RECHECK)

    def lease_answered(self, req: wire.LeaseRequest, owner: str, answer: Answer,
                       now: float) -> None:
        if isinstance(answer, wire.LeaseReply):
            placed = _placed(req, owner, answer)
            self.scheduler.granted(req.job_id, placed, req.compute_milli, req.memory_mib,
                                   answer.facts_version, now)
            self.out.log("placed", job=req.job_id, node=owner, device=req.device,
                         lease=answer.lease_id)
            self.node.call(req.origin, placed, now)
            return
        self.out.log("lease_refused", job=req.job_id, node=owner, reason=answer)
        self.scheduler.refused(req.job_id, answer, now)
        self.node._dirty_schedule = True

    def gang_answered(self, gang: tuple[str, int], req: wire.LeaseRequest, owner: str,
                      answer: Answer, now: float) -> bool:
        """One owner of a gang answered; False if the gang is not (any more) being asked."""
        asks = self.gang_asks.get(gang)
        if asks is None:
            return False
        asks[req.job_id] = (req, owner, answer)
        if any(a is None for _, _, a in asks.values()):
            return True  # the gang's other owners have not all answered yet
        del self.gang_asks[gang]
        refused = [(r, o, a) for r, o, a in asks.values() if isinstance(a, str)]
        if not refused and self.node.belief.term != req.term:
            # No longer the coordinator of that term: the new one places the gang afresh,
            # so these grants must not reach the origin as well.
            refused = [(req, owner, f"coordinator term {req.term} is over")]
        if not refused:
            for r, o, a in asks.values():
                if a is not None:
                    self.lease_answered(r, o, a, now)
            return True
        # All or nothing: one owner refused, so the leases the others granted are given
        # back at once (if this is lost, they lapse unstarted at their TTL).
        r0, o0, why = refused[0]
        reason = f"gang member {r0.job_id} on {o0}: {why}"
        for r, o, a in asks.values():
            if isinstance(a, wire.LeaseReply):
                self.node.call(o, wire.Release(r.job_id, a.lease_id, a.token), now)
            self.lease_answered(r, o, a if isinstance(a, str) else reason, now)
        return True


def lease_reply(node: Node, call: PendingCall, reply: wire.Message | None, error: str,
                now: float) -> None:
    """An owner answered a lease ask (or did not). After a step down the coordinator is
    gone: a grant for a single job still reaches its origin, a gang's is given back."""
    req = call.msg
    assert isinstance(req, wire.LeaseRequest)
    owner = call.node
    if (isinstance(reply, wire.LeaseReply) and reply.granted and req.more
            and reply.devices != [req.device, *req.more]):
        # An owner of an older version granted the first device only: not what the job
        # asked for. Given back (else it lapses unstarted at its TTL).
        node.call(owner, wire.Release(req.job_id, reply.lease_id, reply.token), now)
        reply = wire.LeaseReply(False, "", 0, reply.facts_version,
                                f"{owner} cannot lease several devices at once")
    answer: Answer
    if isinstance(reply, wire.LeaseReply) and reply.granted:
        answer = reply
    else:
        answer = reply.reason if isinstance(reply, wire.LeaseReply) else (
            error or f"unexpected reply {type(reply).__name__}")
    coordinator = node.coordinator
    if call.gang is not None:
        asked = coordinator is not None and coordinator.gang_answered(call.gang, req, owner,
                                                                      answer, now)
        if not asked and isinstance(answer, wire.LeaseReply):  # the gang is placed afresh
            node.call(owner, wire.Release(req.job_id, answer.lease_id, answer.token), now)
        return
    if coordinator is not None:
        coordinator.lease_answered(req, owner, answer, now)
    elif isinstance(answer, wire.LeaseReply):
        node.call(req.origin, _placed(req, owner, answer), now)


def _placed(req: wire.LeaseRequest, owner: str, answer: wire.LeaseReply) -> wire.Placed:
    return wire.Placed(req.job_id, owner, req.device, answer.lease_id, answer.token, req.term,
                       list(req.more))


def device_candidates(m: Member, f: facts.NodeFacts) -> list[Candidate]:
    """A member's devices as it gossips them. A member on battery below the floor it
    gossips is passed over for other nodes' jobs (``policies.filters.node_battery``)."""
    battery, floor = (f.battery.level, f.battery.floor) if f.battery else (None, 0)
    return [
        Candidate(node=m.name, device=d.id, kind=d.kind, model=d.model,
                  compute_milli=d.compute_milli, memory_mib=d.memory_mib,
                  free_compute_milli=d.lendable_compute_milli,
                  free_memory_mib=d.lendable_memory_mib, healthy=d.healthy,
                  battery_pct=battery, battery_floor_pct=floor)
        for d in f.devices
    ]


def _running(node: str, p: facts.PreemptibleFact) -> RunningJob:
    return RunningJob(
        id=p.job_id, node=node, devices=p.devices, compute_milli=p.compute_milli,
        memory_mib=p.memory_mib, priority=p.priority, preemptible=True,
        # Run times are not comparable across nodes' clocks: the work lost is counted as
        # the device share stopped.
        work_lost=p.compute_milli * len(p.devices) / 1000,
    )
