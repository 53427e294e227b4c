"""What a node shows of itself: the status snapshot and the tables the API, the metrics
and the web page read. Read-only; nothing here changes the node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flexmesh.agent.devices import vnpu
from flexmesh.agent.node.power import battery_view
from flexmesh.protocol.membership import ALIVE

if TYPE_CHECKING:
    from flexmesh.agent.node.core import Node


@dataclass(frozen=True, slots=True)
class DeviceUse:
    """One of this node's devices, and what of it is leased and still lendable."""

    id: str
    kind: str
    model: str
    backend: str
    healthy: bool
    compute_milli: int
    memory_mib: int
    leased_compute_milli: int
    leased_memory_mib: int
    lendable_compute_milli: int
    lendable_memory_mib: int


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    coordinator: str | None
    term: int  # of the coordinator this node follows
    max_term: int  # the highest term it has seen
    is_coordinator: bool
    queue: int  # requests waiting in this node's queue (coordinator only)
    counters: dict[str, int]  # the node's, its membership's and its scheduler's, merged
    members: dict[str, int]  # by state
    awareness: int  # Lifeguard's local health score
    devices: tuple[DeviceUse, ...]
    jobs: dict[tuple[str, str], int]  # (state, role) -> jobs this node keeps


class Views:
    def __init__(self, node: Node) -> None:
        self.node = node

    def status(self) -> NodeStatus:
        n = self.node
        counters: dict[str, int] = {}
        for source in (n.membership.counters, n.counters, n.scheduler.counters):
            for key, v in source.items():
                counters[key] = counters.get(key, 0) + v
        members: dict[str, int] = {}
        for m in n.membership.members.values():
            members[m.state] = members.get(m.state, 0) + 1
        jobs: dict[tuple[str, str], int] = {}
        for state, role in self.roles():
            jobs[state, role] = jobs.get((state, role), 0) + 1
        return NodeStatus(n.name, n.belief.coordinator, n.belief.term, n.max_term,
                          n.is_coordinator, len(n.scheduler.queue), counters, members,
                          n.membership.awareness.score, self.device_use(), jobs)

    def roles(self) -> list[tuple[str, str]]:
        """(state, role) of each job this node keeps: ``origin`` (submitted here, run
        elsewhere or not yet), ``both`` (submitted and run here; the job's state) or
        ``owner`` (run here for another node; the run's state)."""
        n = self.node
        out = [(job.state, "both" if n.origin.runs_here(job) else "origin")
               for job in n.origin.jobs.values()]
        out += [(run.state, "owner") for run in n.owner.runs.values()
                if run.origin != n.name]
        return out

    def device_use(self) -> tuple[DeviceUse, ...]:
        leases = self.node.leases
        out = []
        for d in sorted(self.node.owner.devices.values(), key=lambda d: d.id):
            used_c, used_m = leases.used(d.id)
            free_c, free_m = leases.free(d.id)
            out.append(DeviceUse(d.id, d.kind, d.model, d.backend, d.healthy, d.compute_milli,
                                 d.memory_mib, used_c, used_m, free_c, free_m))
        return tuple(out)

    def nodes(self) -> list[dict[str, Any]]:
        """Every member; ``battery`` is None on mains power, else its ``level`` (percent,
        None where this node's own source cannot be read), ``charging``, the ``floor`` it
        lends at now and whether it is ``lending`` to other nodes; ``held``: how many
        bundles and images it gossips that it holds."""
        n = self.node
        return [
            {"name": m.name, "address": m.addr, "state": m.state, "incarnation": m.incarnation,
             "coordinator": m.name == n.belief.coordinator,
             "devices": len(n.facts_of(m).devices), "held": len(n.facts_of(m).held),
             "battery": n.power.view() if m.name == n.name
             else battery_view(n.facts_of(m).battery)}
            for m in sorted(n.membership.members.values(), key=lambda m: m.name)
        ]

    def devices(self) -> list[dict[str, Any]]:
        """Every live member's devices as gossiped; this node's own also name the jobs
        that hold a lease on each (``jobs``)."""
        n = self.node
        holders: dict[str, list[str]] = {}
        for lease in n.leases.active():
            for device in lease.devices:
                holders.setdefault(device, []).append(lease.job_id)
        out = []
        for m in sorted(n.membership.members.values(), key=lambda m: m.name):
            if m.state != ALIVE:
                continue
            for d in n.facts_of(m).devices:
                mine = sorted(holders.get(d.id, [])) if m.name == n.name else None
                out.append({
                    "node": m.name, "id": d.id, "kind": d.kind, "model": d.model,
                    "memory_mib": d.memory_mib, "compute_milli": d.compute_milli,
                    "leased_compute_milli": d.leased_compute_milli,
                    "leased_memory_mib": d.leased_memory_mib,
                    "lendable_compute_milli": d.lendable_compute_milli,
                    "lendable_memory_mib": d.lendable_memory_mib,
                    "backend": d.backend, "healthy": d.healthy, "enforcement": d.enforcement,
                    "jobs": mine,  # None: another node's device (its jobs are its own)
                    # How each of those jobs is held to its share (an NPU fraction: vnpu
                    # in a container, none as a plain process).
                    "job_enforcement": None if mine is None else self._job_modes(d.id, mine),
                })
        return out

    def _job_modes(self, device_id: str, jobs: list[str]) -> dict[str, str]:
        n = self.node
        device = n.owner.devices.get(device_id)
        if device is None:
            return {}
        leases = {x.job_id: x for x in n.leases.active() if x.holds(device_id)}
        out = {}
        for job in jobs:
            run, lease = n.owner.runs.get(job), leases.get(job)
            compute = lease.compute_milli if lease is not None else device.compute_milli
            out[job] = vnpu.run_enforcement(device, n.enforcement, compute,
                                            bool(run is not None and run.image))
        return out
