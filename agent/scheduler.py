"""The coordinator's queue: requests waiting for a device, placed through a policy.

Sans-IO. The node feeds it submissions and the cluster view; it answers which lease
requests to send. It never grants anything itself: an owner's refusal puts the request
back in the queue, and grants it has seen but the owner's gossip does not yet show are
kept as *shadow* reservations, so a burst of placements does not pile onto one device.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from flexmesh.agent.shadows import Holds, Shadow, Shadows, minus
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
    Preemption,
    Request,
    RunningJob,
    choose_victims,
    get_spec,
)
from flexmesh.policies.cluster import group_candidates, node_spec
from flexmesh.policies.engine import Placer
from flexmesh.policies.gang import place_gang
from flexmesh.policies.preempt import may_preempt
from flexmesh.policies.proportional import Sizes
from flexmesh.protocol import wire

Decision = Placement | MultiPlacement | NoFit


@dataclass(slots=True)
class Queued:
    submit: wire.Submit
    enqueued: float
    seq: int
    inflight: bool = False
    not_before: float = 0.0
    reason: str = "waiting for a device"
    attempts: int = 0
    preempting_until: float = 0.0  # victims were told to stop; no new ones before this
    booked: tuple[Request, Placement | MultiPlacement] | None = None  # until owner answers


@dataclass(frozen=True, slots=True)
class Proposal:
    job_id: str
    placement: Placement | MultiPlacement
    submit: wire.Submit
    request: Request  # what to lease: the submit's, any zero filled in (``proportional``)


@dataclass(frozen=True, slots=True)
class PreemptOrder:
    """Stop ``victims`` (jobs on ``node``) so that queued job ``job_id`` fits there."""

    job_id: str
    node: str
    victims: tuple[str, ...]
    priority: int


@dataclass
class Scheduler:
    policy: Policy
    spec: PolicySpec | None = None  # scores for choosing victims (None: never preempts)
    retry_after: float = 1.0
    # How long victims get to stop before the same request may choose victims again.
    preempt_hold: float = 30.0
    # Preemptible jobs running in the mesh, as the owners gossip them (set by the node).
    running: list[RunningJob] = field(default_factory=list)
    # The incremental index the placer scores (classes of identical nodes, cached scores):
    # a node is re-indexed only when what the coordinator sees of it changed.
    _cluster: Cluster = field(default_factory=Cluster)
    _placer: Placer | None = None
    _held: Holds = field(default_factory=Holds)
    _seen: dict[str, Sequence[Candidate]] = field(default_factory=dict)
    _waiting: list[tuple[float, int, int, str]] = field(default_factory=list)
    _ready: list[tuple[int, int, str]] = field(default_factory=list)
    _doomed: dict[str, float] = field(default_factory=dict)  # victim -> chosen until
    _sizes: Sizes = field(default_factory=Sizes)  # of devices, for requests in proportion
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

    def enqueue(self, submit: wire.Submit, now: float) -> Queued | wire.Placed:
        done = self.placed.get(submit.job_id)
        if done is not None and done[2] == submit.attempt:
            return done[0]
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
        q = self.queue.pop(job_id, None)
        if q is not None and q.submit.gang:
            members = self.gangs.get(q.submit.gang)
            if members is not None:
                members.pop(job_id, None)
                if not members:
                    del self.gangs[q.submit.gang]
        return q

    def propose(self, view: Sequence[Candidate] | Mapping[str, Sequence[Candidate]],
                now: float, limit: int = 64) -> list[Proposal | PreemptOrder]:
        """Placements to try now, highest priority and oldest first; where a request fits
        nowhere, the preemptible lower-priority jobs to stop for it. ``view`` is the
        candidates, flat or by node (a node's unchanged list passed again as the same
        object is not even compared)."""
        ready = self._take_ready(now, limit)
        out: list[Proposal | PreemptOrder] = []
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
                     now: float) -> Proposal | PreemptOrder | None:
        """A placement for one request, or the victims to stop for it; None: it waits."""
        s = q.submit
        t0 = self.timer() if self.timer else 0.0
        req, result = self._decide(_request(s), placer)
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

    def _decide(self, asked: Request, placer: Placer) -> tuple[Request, Decision]:
        """(the request made concrete, the placer's answer): one in proportion is tried on
        each size of device in the view, smallest first (no fit: the largest's)."""
        kind = "device" if asked.kind == "any" else asked.kind.upper()
        result: Decision = NoFit(f"no {kind} in view is large enough")
        req = asked
        for req in self._sizes.sized(asked):
            result = placer.decide(req, explain=True)
            if not isinstance(result, NoFit) and result.devices:
                break
        return req, result

    def _no_fit(self, q: Queued, req: Request, why: str, placer: Placer,
                doomed: dict[str, float], now: float) -> PreemptOrder | None:
        """Nothing fits ``q`` now: stop lower-priority jobs for it, or let it wait."""
        if q.preempting_until > now:
            self._wait(q)  # victims are stopping: try again as soon as room frees
            return None
        order = self._preempt_for(req, q, placer, doomed)
        if order is not None:
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

    def _propose_gang(self, q: Queued, placer: Placer, now: float) -> list[Proposal] | None:
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
            result = place_gang(placer, reqs, distinct_nodes=True)
            if isinstance(result, GangPlacement):
                break
        if self.timer and self.on_decision:
            self.on_decision(self.timer() - t0)
        out: list[Proposal] = []
        for i, m in enumerate(members):
            m.attempts += 1
            if not isinstance(result, GangPlacement):
                m.reason = f"waiting: {result.reason}"
                m.not_before = now + self.retry_after
                self._wait(m)
                continue
            self._book(m, reqs[i], result.parts[i])
            m.preempting_until = 0.0
            m.inflight = True
            out.append(Proposal(m.submit.job_id, result.parts[i], m.submit, reqs[i]))
        return out

    # The queue's order without sorting it: requests wait in a heap by the time they may
    # be tried again, and move to a heap by (priority, age) once that time has come. Heap
    # entries are checked when taken (a request withdrawn, placed or re-queued since is
    # skipped), so a round costs O(limit log n), whatever the backlog.

    def _wait(self, q: Queued) -> None:
        heapq.heappush(self._waiting, (q.not_before, -q.submit.priority, q.seq, q.submit.job_id))

    def _take_ready(self, now: float, limit: int) -> list[Queued]:
        waiting, ready = self._waiting, self._ready
        while waiting and waiting[0][0] <= now:
            _, prio, seq, job_id = heapq.heappop(waiting)
            heapq.heappush(ready, (prio, seq, job_id))
        out: list[Queued] = []
        taken: set[str] = set()
        while ready and len(out) < limit:
            _, seq, job_id = heapq.heappop(ready)
            q = self.queue.get(job_id)
            if q is None or q.seq != seq or q.inflight or job_id in taken:
                continue
            if q.not_before > now:
                self._wait(q)
                continue
            taken.add(job_id)
            out.append(q)
        return out

    def _index(self, grouped: Mapping[str, Sequence[Candidate]]) -> Placer:
        """Bring the index up to date with the view; only changed nodes are re-indexed."""
        spec = self.spec or _FALLBACK_SPEC
        if self._placer is None or self._placer.spec is not spec:
            self._cluster, self._seen = Cluster(), {}
            for q in self.queue.values():
                q.booked = None
            self._held.clear()
            self._placer = Placer(self._cluster, spec)
            self._sizes = Sizes()
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
        self._waiting.clear()
        self._ready.clear()
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
        self._held.add(where.node, where.devices, req.compute_milli, req.memory_mib)

    def _unbook(self, q: Queued | None) -> None:
        """The owner answered: forget the booking and read the node afresh next time."""
        if q is None or q.booked is None:
            return
        req, where = q.booked
        q.booked = None
        self._seen.pop(where.node, None)  # re-read (with the grant, from gossip) next round
        self._held.remove(where.node, where.devices, req.compute_milli, req.memory_mib)

    def _preempt_for(self, req: Request, q: Queued, placer: Placer,
                     doomed: Mapping[str, float]) -> PreemptOrder | None:
        if self.spec is None:
            return None
        running = [j for j in self.running if j.id not in doomed and may_preempt(req, j)]
        if not running:
            return None
        result = choose_victims(req, placer.cluster, running, self.spec, placer=placer)
        if not isinstance(result, Preemption) or not result.victims:
            return None
        self.counters["preemptions"] = self.counters.get("preemptions", 0) + len(result.victims)
        return PreemptOrder(q.submit.job_id, result.placement.node, result.victims,
                            req.priority)

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


_FALLBACK_SPEC = get_spec(DEFAULT_POLICY)


def _request(s: wire.Submit) -> Request:
    return Request(s.compute_milli, s.memory_mib, s.kind, s.origin, s.priority,
                   count=max(s.count, 1), preemptible=s.preemptible)
