"""The scheduler's judgement of requests no device of the mesh could ever hold.

Sans-IO. Such a request waits with the reason ``impossible: ...`` (not ``waiting: ...``,
which means busy), for ``grace`` seconds from when this coordinator first found it so,
since nodes still joining may bring the capacity; then it fails, unless it was submitted
to wait for capacity. A failure is told to the origin as a call (``wire.Unplaceable``), and
kept here to answer the origin's next ``Submit`` of that attempt, should the call be lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexmesh.protocol import wire

DEFAULT_GRACE = 60.0  # seconds an impossible request waits before it fails


@dataclass(frozen=True, slots=True)
class Impossible:
    """Tell ``origin`` that its job cannot be placed, ever (the job fails there)."""

    origin: str
    msg: wire.Unplaceable


@dataclass
class NeverFit:
    grace: float = DEFAULT_GRACE
    since: dict[str, float] = field(default_factory=dict)  # job -> first found impossible
    failed: dict[str, tuple[wire.Unplaceable, float]] = field(default_factory=dict)

    def judge(self, s: wire.Submit, never: str, now: float) -> str | Impossible:
        """The reason ``s`` waits with, or its failure once the grace is over."""
        since = self.since.setdefault(s.job_id, now)
        if s.wait_for_capacity:
            return f"impossible: {never} (waiting for capacity)"
        if now - since < self.grace:
            return f"impossible: {never} (fails after {self.grace:g}s unless capacity joins)"
        return self.fail(s, never, now)

    def fail(self, s: wire.Submit, never: str, now: float) -> Impossible:
        """``s`` fails now (a gang's members all together, when one's grace is over)."""
        self.since.pop(s.job_id, None)
        msg = wire.Unplaceable(s.job_id, s.attempt, f"impossible: {never}")
        self.failed[s.job_id] = (msg, now)
        return Impossible(s.origin, msg)

    def answer(self, s: wire.Submit) -> wire.Unplaceable | None:
        """The failure already decided for this attempt of the job, if any."""
        got = self.failed.get(s.job_id)
        return got[0] if got is not None and got[0].attempt == s.attempt else None

    def clear(self, job_id: str) -> None:
        """The request could fit (or left the queue): its grace starts afresh."""
        self.since.pop(job_id, None)

    def prune(self, before: float) -> None:
        for job_id in [j for j, (_, t) in self.failed.items() if t < before]:
            del self.failed[job_id]
