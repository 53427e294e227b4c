"""The coordinator's queue: requests waiting for a device, placed through a policy.

Sans-IO. The node feeds it submissions and the cluster view; it answers which lease
requests to send. It never grants anything itself: an owner's refusal puts the request
back in the queue, and grants it has seen but the owner's gossip does not yet show are
kept as *shadow* reservations, so a burst of placements does not pile onto one device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flexmesh.policies import Candidate, MultiPlacement, NoFit, Placement, Policy, Request
from flexmesh.protocol import wire


@dataclass(slots=True)
class Queued:
    submit: wire.Submit
    enqueued: float
    seq: int
    inflight: bool = False
    not_before: float = 0.0
    reason: str = "waiting for a device"
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Shadow:
    node: str
    device: str
    compute_milli: int
    memory_mib: int
    facts_version: int  # the owner's facts version that first includes this grant


@dataclass(frozen=True, slots=True)
class Proposal:
    job_id: str
    placement: Placement | MultiPlacement
    submit: wire.Submit


@dataclass
class Scheduler:
    policy: Policy
    retry_after: float = 1.0
    queue: dict[str, Queued] = field(default_factory=dict)
    shadows: list[Shadow] = field(default_factory=list)
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
            q = None  # an older attempt still queued here: the new one replaces it
        if q is None:
            self._seq += 1
            q = Queued(submit, now, self._seq)
            self.queue[submit.job_id] = q
        return q

    def withdraw(self, job_id: str) -> None:
        self.queue.pop(job_id, None)

    def propose(self, candidates: list[Candidate], now: float, limit: int = 64) -> list[Proposal]:
        """Placements to try now, highest priority and oldest first."""
        ready = [q for q in self.queue.values() if not q.inflight and q.not_before <= now]
        ready.sort(key=lambda q: (-q.submit.priority, q.seq))
        out: list[Proposal] = []
        view = {(c.node, c.device): c for c in candidates}
        for q in ready[:limit]:
            s = q.submit
            req = Request(s.compute_milli, s.memory_mib, s.kind, s.origin, s.priority,
                          count=max(s.count, 1))
            t0 = self.timer() if self.timer else 0.0
            result = self.policy(req, view.values())
            if self.timer and self.on_decision:
                self.on_decision(self.timer() - t0)
            q.attempts += 1
            if isinstance(result, NoFit) or not result.devices:
                why = result.reason if isinstance(result, NoFit) else "no device chosen"
                q.reason = f"waiting: {why}"
                q.not_before = now + self.retry_after
                continue
            q.inflight = True
            out.append(Proposal(s.job_id, result, s))
            # Take the placement off the view so the next request sees it as used.
            for device in result.devices:
                c = view[(result.node, device)]
                view[(c.node, c.device)] = _minus(c, s.compute_milli, s.memory_mib)
        return out

    def granted(self, job_id: str, placed: wire.Placed, compute: int, memory: int,
                facts_version: int, now: float) -> None:
        q = self.queue.pop(job_id, None)
        self.placed[job_id] = (placed, now, q.submit.attempt if q else 0)
        for device in (placed.device, *placed.more):
            self.shadows.append(Shadow(placed.node, device, compute, memory, facts_version))
        self.counters["placements"] = self.counters.get("placements", 0) + 1

    def refused(self, job_id: str, reason: str, now: float) -> None:
        q = self.queue.get(job_id)
        self.counters["refusals"] = self.counters.get("refusals", 0) + 1
        if q is not None:
            q.inflight = False
            q.reason = f"waiting: owner refused ({reason})"
            q.not_before = now + self.retry_after

    def prune_placed(self, before: float) -> None:
        """Forget placements older than ``before``; their leases are started or expired."""
        for job_id in [j for j, (_, t, _) in self.placed.items() if t < before]:
            del self.placed[job_id]

    def prune_shadows(self, facts_versions: dict[str, int]) -> None:
        self.shadows = [
            s for s in self.shadows if facts_versions.get(s.node, -1) < s.facts_version
        ]

    def apply_shadows(self, candidates: list[Candidate]) -> list[Candidate]:
        if not self.shadows:
            return candidates
        by_key: dict[tuple[str, str], tuple[int, int]] = {}
        for s in self.shadows:
            c, m = by_key.get((s.node, s.device), (0, 0))
            by_key[(s.node, s.device)] = (c + s.compute_milli, m + s.memory_mib)
        out = []
        for cand in candidates:
            used = by_key.get((cand.node, cand.device))
            out.append(cand if used is None else _minus(cand, *used))
        return out


def _minus(c: Candidate, compute: int, memory: int) -> Candidate:
    return Candidate(
        node=c.node, device=c.device, kind=c.kind, model=c.model,
        compute_milli=c.compute_milli, memory_mib=c.memory_mib,
        free_compute_milli=max(c.free_compute_milli - compute, 0),
        free_memory_mib=max(c.free_memory_mib - memory, 0),
        healthy=c.healthy, attrs=c.attrs,
    )
