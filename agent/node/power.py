"""Battery: whether this node lends to other nodes, judged from its last battery reading.

Sans-IO. The runtime reads the battery (``agent/runtime/power.py``) and hands each reading
in with ``Node.set_power(reading, policy, now)``, with the floors it is to be judged
against (from the settings, which a reload may change). The rules:

- No level (mains power, no source configured, or a source that cannot be read): the node
  lends as on mains. A source that fails is the runtime's to log and count.
- On battery the node lends while its level is at least ``lend_floor``; on its charger
  (charging, or full) while it is at least ``charging_lend_floor``.
- Once it has stopped lending it lends again only at that floor plus ``hysteresis``, so a
  level that hovers at the floor does not stop and start lending at every reading.
- While it does not lend it hands back what it lent: every run borrowed by another node is
  preempted with a reason (``battery 18% below lend floor 20% (lends again at 25%)``),
  which its origin reads and requeues the job elsewhere; leases reserved for other nodes
  and not started yet are released. Its own jobs run on, and its own new ones still get
  leases here. A lease request from another node is refused with the same reason.

What the node gossips (``facts.BatteryFact``) names the floor it applies at the moment
(hysteresis included), so a coordinator's policy (``policies.filters.node_battery``) leaves
it out of other nodes' placements exactly while it would refuse them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flexmesh.protocol import facts

if TYPE_CHECKING:
    from flexmesh.agent.node.core import Node

SOURCES = ("none", "sysfs", "file")


@dataclass(frozen=True, slots=True)
class PowerPolicy:
    lend_floor: int = 20  # percent: on battery, below it lend nothing to other nodes
    charging_lend_floor: int = 10  # ... on the charger (a drone on its pad may lend more)
    hysteresis: int = 5  # percentage points above the floor before lending again

    def base(self, charging: bool) -> int:
        return self.charging_lend_floor if charging else self.lend_floor

    def floor(self, charging: bool, lending: bool) -> int:
        """The level at which a node lends: its floor while it lends, the floor plus the
        hysteresis once it has stopped (100 at most, so a full battery always lends)."""
        base = self.base(charging)
        return base if lending else min(base + self.hysteresis, 100)


@dataclass(frozen=True, slots=True)
class PowerReading:
    source: str = "none"  # none (mains), sysfs or file
    level: int | None = None  # percent; None: mains, or not known (``problem`` says why)
    charging: bool = False  # on its charger: charging, or full
    problem: str = ""  # why a configured source gave no level


MAINS = PowerReading()


class Power:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.reading = MAINS
        self.policy = PowerPolicy()
        self.lending = True

    def update(self, reading: PowerReading, policy: PowerPolicy, now: float) -> None:
        self.reading, self.policy = reading, policy
        lending = self._lends()
        if lending != self.lending:
            self.lending = lending
            out = self.node.out
            out.count("lending_resumed" if lending else "lending_stopped")
            out.log("battery_lending", lending=lending, level=reading.level,
                    charging=reading.charging, reason="" if lending else self.reason())
        if not lending:
            self._hand_back(now)
        self.node.publish_facts()

    def refresh(self, now: float) -> None:
        """Judge the last reading again (leases were read back from the journal) and
        publish the facts."""
        self.update(self.reading, self.policy, now)

    def _lends(self) -> bool:
        r = self.reading
        return r.level is None or r.level >= self.policy.floor(r.charging, self.lending)

    def _hand_back(self, now: float) -> None:
        """Preempt every run borrowed by another node, release what is reserved for one."""
        owner, me = self.node.owner, self.node.name
        stopping = owner.stopping()
        for lease in list(self.node.leases.active()):
            if lease.origin != me and lease.job_id not in stopping:
                self.node.out.count("battery_handbacks")
                owner.take_back(lease, self.reason(), now)

    def reason(self) -> str:
        r, p = self.reading, self.policy
        where = " on its charger" if r.charging else ""
        base, again = p.base(r.charging), p.floor(r.charging, False)
        if r.level is not None and r.level >= base:
            return (f"battery {r.level}%{where} not yet back to {again}% since it fell "
                    f"below lend floor {base}%")
        return f"battery {r.level}%{where} below lend floor {base}% (lends again at {again}%)"

    def refusal(self, origin: str) -> str | None:
        """Why a lease for a job of ``origin`` is refused here now, or None."""
        if self.lending or origin == self.node.name:
            return None
        self.node.out.count("leases_refused_battery")
        return self.reason()

    def fact(self) -> facts.BatteryFact | None:
        r = self.reading
        if r.level is None:
            return None
        return facts.BatteryFact(r.level, r.charging, self.policy.floor(r.charging, self.lending))

    def view(self) -> dict[str, Any] | None:
        """This node's battery for the status views; None on mains."""
        r = self.reading
        if r.source == "none":
            return None
        out: dict[str, Any] = battery_view(self.fact()) or {
            "level": None, "charging": False, "floor": None, "lending": True}
        out["source"] = r.source
        if r.problem:
            out["problem"] = r.problem
        return out


def battery_view(fact: facts.BatteryFact | None) -> dict[str, Any] | None:
    """A gossiped battery for the status views; None on mains."""
    if fact is None:
        return None
    return {"level": fact.level, "charging": fact.charging, "floor": fact.floor,
            "lending": fact.lending}
