"""Part of ``Simulator``: a node's battery, as the runtime would read it from its source."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexmesh.agent.node.power import MAINS, PowerPolicy, PowerReading

if TYPE_CHECKING:
    from flexmesh.agent.simulator import _SimNode

PowerState = tuple[PowerReading, PowerPolicy]  # a reading and the floors it is judged by


class SimPower:
    nodes: dict[str, _SimNode]
    now: float

    if TYPE_CHECKING:  # provided by ``Simulator``, which this is mixed into
        def _pump(self, name: str) -> None: ...

    def battery(self, n: str, level: int | None, charging: bool = False,
                policy: PowerPolicy | None = None) -> None:
        """Node ``n``'s battery now reads ``level`` percent (None: mains power), judged
        against ``policy`` (by default the one it had). It survives a restart."""
        sim = self.nodes[n]
        reading = MAINS if level is None else PowerReading("file", level, charging)
        sim.power = (reading, policy or sim.power[1])
        if sim.up:
            sim.node.set_power(*sim.power, self.now)
            self._pump(n)


def no_battery() -> PowerState:
    return MAINS, PowerPolicy()
