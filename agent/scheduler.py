"""The coordinator's queue: requests waiting for a device, placed through a policy.

Sans-IO. The node feeds it submissions and the cluster view; it answers which lease
requests to send. It never grants anything itself: an owner's refusal puts the request
back in the queue, and grants it has seen but the owner's gossip does not yet show are
kept as *shadow* reservations, so a burst of placements does not pile onto one device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from flexmesh.agent.neverfit import Impossible, NeverFit
from flexmesh.agent.queueorder import Order, Queued
from flexmesh.agent.shadows import Holds, Shadow, Shadows, minus
from flexmesh.agent.victims import PreemptOrder, preempt_for
from flexmesh.policies import (
    DEFAULT_POLICY,
    Candidate,
    Cluster,
    GangPlacement,
    MultiPlacement,
    NoFit,
    Placement,
    Policy,
    PolicySpec,
    Request,
    RunningJob,
    get_spec,
)
from flexmesh.policies.capacity import Capacity
from flexmesh.policies.cluster import group_candidates, node_spec
from flexmesh.policies.engine import Placer
from flexmesh.policies.gang import place_gang
from flexmesh.protocol import wire

Decision = Placement | MultiPlacement | NoFit
__all__ = ["Impossible", "PreemptOrder", "Proposal", "Queued", "Scheduler"]


@dataclass(frozen=True, slots=True)
class Proposal:
    job_id: str
    placement: Placement | MultiPlacement
    submit: wire.Submit
    request: Request  # what to lease: the submit's, any zero filled in (``proportional``)


@dataclass
class Scheduler:
    policy: Policy
    spec: PolicySpec | None = None  # scores for choosing victims (None: never preempts)
    retry_after: float = 1.0
    # How long victims get to stop before the same request may choose victims again.
    preempt_hold: float = 30.0
    # Preemptible jobs running in the mesh, as the owners gossip them (set by the node).
    running: list[RunningJob] = field(default_factory=list)
    # Round trips (ms) from an origin to the nodes nearest it (set by the node; ``nearby``).
    rtt_from: Callable[[str], Mapping[str, float] | None] | None = None
    # The incremental index the placer scores (classes of identical nodes, cached scores):
    # a node is re-indexed only when what the coordinator sees of it changed.
    _cluster: Cluster = field(default_factory=Cluster)
    _placer: Placer | None = None
    _held: Holds = field(default_factory=Holds)
    _seen: dict[str, Sequence[Candidate]] = field(default_factory=dict)
    _order: Order = field(default_factory=Order)
    _doomed: dict[str, float] = field(default_factory=dict)  # victim -> chosen until
    # Sizes of devices (for requests in proportion) and what each node has of them
    _sizes: Capacity = field(default_factory=Capacity)
    # Requests no device could ever hold: their grace, and those failed for it
    never_fit: NeverFit = field(default_factory=NeverFit)
    queue: dict[str, Queued] = field(default_factory=dict)
    # Gang members queued here, by gang id and job id (placed only all together).
    gangs: dict[str, dict[str, Queued]] = field(default_factory=dict)
    shadows: Shadows = field(default_factory=Shadows)
    # Recent placements (placed, when, attempt), to answer an origin that asks again.
    placed: dict[str, tuple[wire.Placed, float, int]] = field(default_factory=dict)
    _seq: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    # Injected by the runtime to time decisions (the scheduler itself reads no clock).
    timer: Callable[[], float] | None = None
    on_decision: Callable[[float], None] | None = None
    # Nodes that gossip no container runtime (set by the node): no job with an image there.
    no_runtime: frozenset[str] = frozenset()
    # Node -> bytes it holds of what a request needs (set by the node; ``holdings``).
    saved_for: Callable[[wire.Submit], Mapping[str, int] | None] | None = None

    def enqueue(self, submit: wire.Submit,
                now: float) -> Queued | wire.Placed | wire.Unplaceable:
        done = self.placed.get(submit.job_id)
        if done is not None and done[2] == submit.attempt:
            return done[0]
        failed = self.never_fit.answer(submit)
        if failed is not None:
            return failed  # (told to the origin already; it asked again before it heard)
        q = self.queue.get(submit.job_id)
        if q is not None and q.submit.attempt < submit.attempt:
            self._unbook(self._pop(submit.job_id))
            q = None  # an older attempt still queued here: the new one replaces it
        if q is None:
            self._seq += 1
            q = Queued(submit, now, self._seq)
            self.queue[submit.job_id] = q
            if submit.gang:
                self.gangs.setdefault(submit.gang, {})[submit.job_id] = q
            self._wait(q)
            if self._placer is not None:
                self._placer.observe(_request(submit))  # the recent mix FGD measures against
        return q

    def withdraw(self, job_id: str) -> None:
        self._unbook(self._pop(job_id))

    def _pop(self, job_id: str) -> Queued | None:
        self.never_fit.clear(job_id)
        q = self.queue.pop(job_id, None)
        if q is not None and q.submit.gang:
            members = self.gangs.get(q.submit.gang)
            if members is not None:
                members.pop(job_id, None)
                if not members:
                    del self.gangs[q.submit.gang]
        return q

    def propose(self, view: Sequence[Candidate] | Mapping[str, Sequence[Candidate]],
                now: float, limit: int = 64) -> list[Proposal | PreemptOrder | Impossible]:
        """Placements to try now, highest priority and oldest first; where a request fits
        nowhere, the preemptible lower-priority jobs to stop for it; where it never could,
        past its grace, its failure. ``view`` is the candidates, flat or by node (a node's
        unchanged list passed again as the same object is not even compared)."""
        ready = self._order.take(self.queue, now, limit)
        out: list[Proposal | PreemptOrder | Impossible] = []
        if not ready:
            return out
        placer = self._index(view if isinstance(view, Mapping) else group_candidates(view))
        for job_id in [j for j, until in self._doomed.items() if until <= now]:
            del self._doomed[job_id]
        doomed = self._doomed  # victims told to stop are not chosen again while they stop
        tried: set[str] = set()  # gangs tried this round (their members wait again already)
        for q in ready:
            s = q.submit
            if q.inflight or s.gang in tried:
                continue  # placed, or tried, this round with the rest of its gang
            if s.gang:
                got = self._propose_gang(q, placer, now)
                if got is not None:  # the whole gang was placed, or waits again
                    tried.add(s.gang)
                    out.extend(got)
                continue
            one = self._propose_one(q, placer, doomed, now)
            if one is not None:
                out.append(one)
        return out

    def _propose_one(self, q: Queued, placer: Placer, doomed: dict[str, float],
                     now: float) -> Proposal | PreemptOrder | Impossible | None:
        """A placement for one request, or the victims to stop for it; None: it waits."""
        s = q.submit
        t0 = self.timer() if self.timer else 0.0
        req, result = self._decide(_request(s), placer, self._excluded(s),
                                   self.saved_for(s) if self.saved_for else None)
        if self.timer and self.on_decision:
            self.on_decision(self.timer() - t0)
        q.attempts += 1
        if isinstance(result, NoFit) or not result.devices:
            why = result.reason if isinstance(result, NoFit) else "no device chosen"
            return self._no_fit(q, req, why, placer, doomed, now)
        try:
            # Booked in the index until the owner answers, so that the next request sees
            # it as used; the answer re-reads the node from gossip and shadows.
            placer.commit(req, result)
        except ValueError as exc:  # the view contradicts itself: try again later
            q.reason = f"waiting: {exc}"
            q.not_before = now + self.retry_after
            self._wait(q)
            return None
        self._book(q, req, result)
        q.preempting_until = 0.0
        q.inflight = True
        return Proposal(s.job_id, result, s, req)

    def _excluded(self, s: wire.Submit) -> frozenset[str]:
        return self.no_runtime if s.container else frozenset()

    def _decide(self, asked: Request, placer: Placer, exclude: frozenset[str] = frozenset(),
                saved: Mapping[str, int] | None = None) -> tuple[Request, Decision]:
        """(the request made concrete, the placer's answer): one in proportion is tried on
        each size of device in the view, smallest first (no fit: the largest's)."""
        kind = "device" if asked.kind == "any" else asked.kind.upper()
        result: Decision = NoFit(f"no {kind} in view is large enough")
        req = asked
        for req in self._sizes.sized(asked):
            rtt = self.rtt_from(req.origin) if self.rtt_from and req.origin else None
            result = placer.decide(req, rtt, explain=True, exclude=exclude, saved=saved)
            if not isinstance(result, NoFit) and result.devices:
                break
        if isinstance(result, NoFit) and exclude:
            result = NoFit(f"{result.reason} (an image runs only on a node with podman or "
                           f"docker: {len(exclude)} node(s) without are left out)")
        return req, result

    def _no_fit(self, q: Queued, req: Request, why: str, placer: Placer,
                doomed: dict[str, float], now: float) -> PreemptOrder | Impossible | None:
        """Nothing fits ``q`` now: stop lower-priority jobs for it, or let it wait (or
        fail, if nothing ever could)."""
        never = self._sizes.never(_request(q.submit))
        if never is not None:  # no victim could make room either
            return self._never(q, never, now)
        self.never_fit.clear(q.submit.job_id)
        if q.preempting_until > now:
            self._wait(q)  # victims are stopping: try again as soon as room frees
            return None
        excluded = self._excluded(q.submit)
        running = [j for j in self.running if j.node not in excluded]
        order = preempt_for(self.spec, running, req, q.submit.job_id, placer, doomed)
        if order is not None:
            self.counters["preemptions"] = self.counters.get("preemptions", 0) + len(order.victims)
            for victim in order.victims:
                doomed[victim] = now + self.preempt_hold
            q.preempting_until = now + self.preempt_hold
            q.reason = (f"waiting: preempting {len(order.victims)} lower-priority "
                        f"job(s) on {order.node}")
            self._wait(q)
            return order
        q.reason = f"waiting: {why}"
        q.not_before = now + self.retry_after
        self._wait(q)
        return None

    def _never(self, q: Queued, never: str, now: float) -> Impossible | None:
        """``q`` could never fit: it waits, told why, or its grace is over and it fails."""
        verdict = self.never_fit.judge(q.submit, never, now)
        if isinstance(verdict, Impossible):
            self._pop(q.submit.job_id)
            return verdict
        q.reason = verdict
        q.not_before = now + self.retry_after
        self._wait(q)
        return None

    def _propose_gang(self, q: Queued, placer: Placer,
                      now: float) -> list[Proposal | Impossible] | None:
        """Place every member of ``q``'s gang, each on a node of its own, or none. None:
        the gang is not complete here (or a member is still out with an owner), and only
        ``q`` waits again; else the proposals, empty when it does not fit (every member
        waits again)."""
        s = q.submit
        members = sorted(self.gangs.get(s.gang, {}).values(), key=lambda m: m.submit.rank)
        if len(members) != s.gang_size or any(m.inflight for m in members):
            q.reason = f"waiting for the gang's members ({len(members)} of {s.gang_size} here)"
            q.not_before = now + self.retry_after
            self._wait(q)
            return None
        t0 = self.timer() if self.timer else 0.0
        asked = [_request(m.submit) for m in members]
        result: GangPlacement | NoFit = NoFit("no device of the gang's kind in view")
        for model in self._sizes.gang(asked):  # booked in the index if placed
            reqs = [model.get(id(r), r) for r in asked]
            result = place_gang(placer, reqs, distinct_nodes=True, exclude=self._excluded(s))
            if isinstance(result, GangPlacement):
                break
        if self.timer and self.on_decision:
            self.on_decision(self.timer() - t0)
        if not isinstance(result, GangPlacement):
            return self._gang_no_fit(members, result.reason, now)
        out: list[Proposal | Impossible] = []
        for i, m in enumerate(members):
            m.attempts += 1
            self._book(m, reqs[i], result.parts[i])
            m.preempting_until = 0.0
            m.inflight = True
            out.append(Proposal(m.submit.job_id, result.parts[i], m.submit, reqs[i]))
        return out

    def _gang_no_fit(self, members: list[Queued], why: str,
                     now: float) -> list[Proposal | Impossible]:
        """The gang does not fit: every member waits, or, if it never could, all fail
        together once one's grace is over."""
        never = self._sizes.never(_request(members[0].submit), nodes=len(members))
        reasons = [f"waiting: {why}" if never is None
                   else self.never_fit.judge(m.submit, never, now) for m in members]
        if never is not None and any(isinstance(r, Impossible) for r in reasons):
            for m in members:
                self._pop(m.submit.job_id)
            return [self.never_fit.fail(m.submit, never, now) for m in members]
        for m, reason in zip(members, reasons, strict=True):
            if never is None:
                self.never_fit.clear(m.submit.job_id)
            m.attempts += 1
            m.reason, m.not_before = str(reason), now + self.retry_after
            self._wait(m)
        return []

    def _wait(self, q: Queued) -> None:
        self._order.wait(q)

    def _index(self, grouped: Mapping[str, Sequence[Candidate]]) -> Placer:
        """Bring the index up to date with the view; only changed nodes are re-indexed."""
        spec = self.spec or _FALLBACK_SPEC
        if self._placer is None or self._placer.spec is not spec:
            self._cluster, self._seen = Cluster(), {}
            for q in self.queue.values():
                q.booked = None
            self._held.clear()
            self._placer = Placer(self._cluster, spec)
            self._sizes = Capacity()
            for q in self.queue.values():
                self._placer.observe(_request(q.submit))
        nodes = self._cluster.nodes
        if len(nodes) != len(grouped) or any(n not in grouped for n in nodes):
            for name in [n for n in nodes if n not in grouped]:
                self._seen.pop(name, None)  # (its holds stay until their owners answer)
                self._cluster.remove(name)
                self._sizes.set(name, ())
        seen, cluster, held = self._seen, self._cluster, self._held.by_node
        for name, cands in grouped.items():
            if seen.get(name) is cands or not cands:
                continue
            seen[name] = cands
            self._sizes.set(name, cands)
            try:
                # in place where the node's devices are the same (the usual gossip update):
                # a node whose state did not change keeps its class and cached scores.
                # What is booked on it while its owner is asked stays taken.
                taken = held.get(name)
                if not cluster.refresh(name, cands, taken):
                    if taken:
                        cands = [c if c.device not in taken else minus(c, *taken[c.device])
                                 for c in cands]
                    cluster.upsert(node_spec(name, cands))
            except ValueError:  # gossip the index cannot take (a device listed twice)
                self.counters["bad_views"] = self.counters.get("bad_views", 0) + 1
                seen.pop(name, None)
                cluster.remove(name)
        return self._placer

    def reset(self) -> None:
        """No longer the coordinator: forget the queue and every booking with it."""
        self.queue.clear()
        self.gangs.clear()
        self._order.clear()
        self.never_fit.since.clear()
        self._doomed.clear()
        self._held.clear()
        self._placer = None  # rebuilt from the view next time

    def preempt_failed(self, job_id: str, retry_at: float = 0.0) -> None:
        """No victim was stopped: choose again at ``retry_at`` (not the same victims)."""
        q = self.queue.get(job_id)
        if q is not None:
            q.preempting_until = min(q.preempting_until, retry_at)

    def _book(self, q: Queued, req: Request, where: Placement | MultiPlacement) -> None:
        q.booked = (req, where)
        self.never_fit.clear(q.submit.job_id)  # it fits: should it come back, its grace is new
        self._held.add(where.node, where.devices, req.compute_milli, req.memory_mib)

    def _unbook(self, q: Queued | None) -> None:
        """The owner answered: forget the booking and read the node afresh next time."""
        if q is None or q.booked is None:
            return
        req, where = q.booked
        q.booked = None
        self._seen.pop(where.node, None)  # re-read (with the grant, from gossip) next round
        self._held.remove(where.node, where.devices, req.compute_milli, req.memory_mib)

    def granted(self, job_id: str, placed: wire.Placed, compute: int, memory: int,
                facts_version: int, now: float) -> None:
        q = self._pop(job_id)
        self._unbook(q)
        self.placed[job_id] = (placed, now, q.submit.attempt if q else 0)
        for device in (placed.device, *placed.more):
            self.shadows.append(Shadow(placed.node, device, compute, memory, facts_version))
        self.counters["placements"] = self.counters.get("placements", 0) + 1

    def refused(self, job_id: str, reason: str, now: float) -> None:
        q = self.queue.get(job_id)
        self.counters["refusals"] = self.counters.get("refusals", 0) + 1
        self._unbook(q)
        if q is not None:
            q.inflight = False
            q.reason = f"waiting: owner refused ({reason})"
            q.not_before = now + self.retry_after
            self._wait(q)

    def prune_placed(self, before: float) -> None:
        """Forget placements older than ``before``; their leases are started or expired."""
        for job_id in [j for j, (_, t, _) in self.placed.items() if t < before]:
            del self.placed[job_id]
        self.never_fit.prune(before)


_FALLBACK_SPEC = get_spec(DEFAULT_POLICY)


def _request(s: wire.Submit) -> Request:
    return Request(s.compute_milli, s.memory_mib, s.kind, s.origin, s.priority,
                   count=max(s.count, 1), preemptible=s.preemptible)
