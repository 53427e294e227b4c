"""Filters: may this node (class), or this device of it, take the request at all?

Each filter is a small pure predicate. Node filters look at a :class:`NodeClass` (every
node in a class passes or fails alike); device filters look at one device's state inside
the class. :func:`choices` then lists the distinct ways the request can be laid on the
node's devices, which is what the scores compare.
"""

from __future__ import annotations

from collections.abc import Callable

from flexmesh.policies.nodes import UNKNOWN, DevState, NodeClass
from flexmesh.policies.types import Request

Choice = tuple[int, ...]  # positions into NodeClass.devs
NodeFilter = Callable[[Request, NodeClass], bool]
DeviceFilter = Callable[[Request, DevState], bool]

# -- node filters ---------------------------------------------------------------------------


def node_healthy(req: Request, cls: NodeClass) -> bool:
    """The node is up and its devices answer."""
    return cls.healthy


def node_battery(req: Request, cls: NodeClass) -> bool:
    """A node below its battery floor lends nothing (its own jobs are let through by the
    engine, which exempts the submitting node)."""
    return cls.battery_ok


def node_kind(req: Request, cls: NodeClass) -> bool:
    """A device of the kind asked for (a request for no device may go anywhere)."""
    return req.count <= 0 or req.kind == "any" or any(k == req.kind for k, _ in cls.km)


def node_model(req: Request, cls: NodeClass) -> bool:
    """A device of an allowed model (a request for no device may go anywhere)."""
    return req.count <= 0 or not req.models or any(m in req.models for _, m in cls.km)


def node_cpu(req: Request, cls: NodeClass) -> bool:
    """Node CPU, where the node reports it."""
    return cls.cpu_free == UNKNOWN or cls.cpu_free >= req.cpu_milli


def node_memory(req: Request, cls: NodeClass) -> bool:
    """Node RAM, where the node reports it."""
    return cls.mem_free == UNKNOWN or cls.mem_free >= req.host_memory_mib


def node_capacity(req: Request, cls: NodeClass) -> bool:
    """Quick bound: enough lendable compute on the node at all."""
    return cls.total_free >= req.compute_milli * req.count and len(cls.devs) >= req.count


# -- device filters -------------------------------------------------------------------------


def dev_kind(req: Request, d: DevState) -> bool:
    return req.kind == "any" or d[4] == req.kind


def dev_model(req: Request, d: DevState) -> bool:
    return not req.models or d[5] in req.models


def dev_compute(req: Request, d: DevState) -> bool:
    """Lendable compute: a fraction needs that much free; a whole device must be unused."""
    if req.compute_milli >= d[2]:
        return d[0] >= d[2]
    return d[0] >= req.compute_milli


def dev_memory(req: Request, d: DevState) -> bool:
    """Device memory: what is asked must be free (a whole device takes all of it)."""
    if req.compute_milli >= d[2]:
        return d[1] >= d[3] and d[1] >= req.memory_mib
    return d[1] >= req.memory_mib


NODE_FILTERS: dict[str, NodeFilter] = {
    "healthy": node_healthy,
    "battery": node_battery,
    "kind": node_kind,
    "model": node_model,
    "cpu": node_cpu,
    "memory": node_memory,
    "capacity": node_capacity,
}
DEVICE_FILTERS: dict[str, DeviceFilter] = {
    "kind": dev_kind,
    "model": dev_model,
    "compute": dev_compute,
    "memory": dev_memory,
}


def node_passes(req: Request, cls: NodeClass, *, exempt_battery: bool = False) -> bool:
    """All node filters (the submitting node may ignore its own battery floor).

    The same checks as the filters above, written out: this runs for every class a
    request shape is scored against."""
    if not cls.healthy or not (exempt_battery or cls.battery_ok):
        return False
    count = req.count
    if count > 0:
        kind = req.kind
        if kind != "any" and not any(k == kind for k, _ in cls.km):
            return False
        models = req.models
        if models and not any(m in models for _, m in cls.km):
            return False
        if cls.total_free < req.compute_milli * count or len(cls.devs) < count:
            return False
    cpu = cls.cpu_free
    if cpu != UNKNOWN and cpu < req.cpu_milli:
        return False
    mem = cls.mem_free
    return mem == UNKNOWN or mem >= req.host_memory_mib


def device_ok(req: Request, d: DevState) -> bool:
    return dev_kind(req, d) and dev_model(req, d) and dev_compute(req, d) and dev_memory(req, d)


def node_reject_reason(req: Request, cls: NodeClass, *, exempt_battery: bool = False) -> str:
    """The first node filter that fails, by name ('' if none does)."""
    for name, f in NODE_FILTERS.items():
        if name == "battery" and exempt_battery:
            continue
        if not f(req, cls):
            return name
    return ""


def choices(req: Request, cls: NodeClass) -> list[Choice]:
    """The distinct ways to lay the request on this node's devices (empty: it cannot).

    Devices in a class are sorted by free capacity, so identical devices sit side by side:
    a fractional request gets one choice per distinct device state; ``count`` whole devices
    are all alike, so they get one; ``count`` fractions take the tightest devices that fit.
    """
    devs = cls.devs
    count = req.count
    if count <= 0:
        return [()]  # needs no device: the node filters decide
    c = req.compute_milli
    m = req.memory_mib
    kind = req.kind
    anykind = kind == "any"
    models = req.models
    if count == 1:
        out: list[Choice] = []
        prev: DevState | None = None
        for i, d in enumerate(devs):
            if d == prev:
                continue
            prev = d
            fc, fm, cc, cm, k, mo = d
            if c < cc and fc < c:
                break  # devices are sorted by free compute: none further fits a fraction
            if (
                (anykind or k == kind)
                and (not models or mo in models)
                and ((fc >= cc and fm >= cm and fm >= m) if c >= cc else fm >= m)
            ):
                out.append((i,))
        return out
    elig = [i for i, d in enumerate(devs) if device_ok(req, d)]
    if len(elig) < count:
        return []
    # One job's devices are alike: never a GPU beside an NPU, nor two models at once.
    groups: dict[tuple[str, str], list[int]] = {}
    for i in elig:
        groups.setdefault((devs[i][4], devs[i][5]), []).append(i)
    out = []
    for group in groups.values():
        if len(group) < count:
            continue
        if req.whole:
            out.append(tuple(group[:count]))
        else:  # fractions on several devices: the tightest fits (most-free first)
            out.append(tuple(sorted(group[-count:])))
    return out
