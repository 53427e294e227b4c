"""What a node is told at start: its name and address, and the timings of its roles."""

from __future__ import annotations

from dataclasses import dataclass, field

from flexmesh.agent.neverfit import DEFAULT_GRACE
from flexmesh.policies import DEFAULT_POLICY
from flexmesh.protocol.membership import Config


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    addr: str
    membership: Config = field(default_factory=Config)
    priority: int = 0
    eligible: bool = True  # may be elected coordinator
    policy: str = DEFAULT_POLICY
    lease_ttl: float = 15.0  # a reserved lease not started within this is taken back
    # A request no device of the mesh could ever hold fails after this (``neverfit``).
    impossible_grace: float = DEFAULT_GRACE
    call_timeout: float = 5.0
    submit_refresh: float = 5.0  # re-send Submit for a still-queued job this often
    local_fallback_after: float = 6.0  # no coordinator answer: place on own devices
    # An owner that left the mesh (a restart, an upgrade) keeps running its jobs; they are
    # followed again when it is back, and marked lost only if it is not back within this.
    owner_away_limit: float = 900.0
    # An owner declared dead may only be out of reach (a radio shadow): its jobs go on
    # being followed if it is back within this, else they are requeued. An owner stops
    # the runs of an origin it has declared dead after ``orphan_limit`` (shorter, so a
    # job cut off from its origin is stopped before the origin runs it elsewhere).
    owner_dead_grace: float = 60.0
    orphan_limit: float = 30.0
    # Ended jobs and finished leases are kept (in memory and in the journal) this many at
    # most, and no longer than this many seconds; then they are forgotten.
    keep_finished: int = 1000
    keep_finished_for: float = 7 * 86400.0


# (owner_dead_grace, orphan_limit) by membership profile: a radio shadow lasts minutes.
DEAD_GRACE: dict[str, tuple[float, float]] = {
    "local": (30.0, 15.0), "lan": (60.0, 30.0), "wan": (180.0, 120.0), "edge": (300.0, 240.0)}
