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
    # Ended jobs and finished leases are kept (in memory and in the journal) this many at
    # most, and no longer than this many seconds; then they are forgotten.
    keep_finished: int = 1000
    keep_finished_for: float = 7 * 86400.0
