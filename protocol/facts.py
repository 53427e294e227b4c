"""What a node gossips about itself: its devices, the jobs it lets be preempted, and the
facts the election reads (priority, eligibility, claim, highest term seen).

This module owns the shape of those facts on the wire and nothing else. It does no I/O and
keeps no state: ``NodeFacts.encode()`` gives the msgpack-ready mapping the membership
layer carries as an opaque ``Facts.data``, ``decode()`` reads a peer's mapping back and
never raises (a row of the wrong shape is skipped, a missing field takes its default), and
``fit()`` trims what is optional until the facts fit one datagram.

The encoding is positional and must stay byte-identical for the same state (peers of other
versions read it): a device is the row ``[id, kind, model, memory_mib, compute_milli,
leased_compute_milli, leased_memory_mib, lendable_compute_milli, lendable_memory_mib,
backend, healthy, enforcement]``, a preemptible job ``[job_id, [device, ...],
compute_milli, memory_mib, priority]``. Only append fields to a row; a reader takes rows
longer than it knows. A node on battery adds ``"bat": [level, charging, floor]``
(``BatteryFact``); a node on mains power (or without a reading) leaves the key out, so its
encoding is what it was before batteries were gossiped.

A node that holds bundles or container images adds ``"held": [key, ...]``, a bounded
digest of them (``MAX_HELD`` keys of ``HELD_KEY_BYTES`` bytes each, most recently used
first; see ``agent.node.holdings`` for the keys): the placement prefers a node that will
not have to fetch what a job needs. A list of short hash prefixes rather than a Bloom
filter: it is exact (a false positive would send a job where it must fetch after all),
its order lets ``fit`` drop the least recently used keys first when a datagram is tight,
and 32 keys cost under 300 bytes of the 1,400.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from flexmesh.protocol import wire

MAX_PREEMPTIBLE = 16  # preemptible jobs a node lists at most, cheapest first
MAX_HELD = 32  # keys of bundles and images held a node lists at most, most recent first
HELD_KEY_BYTES = 8  # a key is a hash prefix: 2**-64 per pair to collide
UNKNOWN_ENFORCEMENT = "unknown"  # a peer too old to say how it enforces fractions


@dataclass(frozen=True, slots=True)
class DeviceFact:
    id: str
    kind: str
    model: str
    memory_mib: int
    compute_milli: int
    leased_compute_milli: int
    leased_memory_mib: int
    lendable_compute_milli: int
    lendable_memory_mib: int
    backend: str
    healthy: bool
    enforcement: str = UNKNOWN_ENFORCEMENT

    def encode(self) -> list[Any]:
        return [self.id, self.kind, self.model, self.memory_mib, self.compute_milli,
                self.leased_compute_milli, self.leased_memory_mib,
                self.lendable_compute_milli, self.lendable_memory_mib, self.backend,
                self.healthy, self.enforcement]


@dataclass(frozen=True, slots=True)
class PreemptibleFact:
    """A job running on the node that a higher-priority request may stop."""

    job_id: str
    devices: tuple[str, ...]
    compute_milli: int  # per device
    memory_mib: int  # per device
    priority: int

    def encode(self) -> list[Any]:
        return [self.job_id, list(self.devices), self.compute_milli, self.memory_mib,
                self.priority]


@dataclass(frozen=True, slots=True)
class BatteryFact:
    """A node's battery: its charge in percent, whether it is on its charger, and the
    level it lends to other nodes at now (its floor, hysteresis included): below it, the
    node lends nothing to others (its own jobs still place there)."""

    level: int  # 0..100
    charging: bool
    floor: int  # 0..100

    @property
    def lending(self) -> bool:
        return self.level >= self.floor

    def encode(self) -> list[Any]:
        return [self.level, self.charging, self.floor]


@dataclass(frozen=True, slots=True)
class NodeFacts:
    devices: tuple[DeviceFact, ...] = ()
    priority: int = 0  # election priority
    eligible: bool = True  # may be elected coordinator
    claim: int = 0  # the term this node claims as coordinator (0: none)
    max_term: int = 0  # the highest coordinator term this node has seen
    preemptible: tuple[PreemptibleFact, ...] = ()
    battery: BatteryFact | None = None  # None: mains power, or no reading
    # The container runtimes that work on the node ("podman", "docker"): a job with an
    # image goes only where there is one. Left out of the encoding when empty.
    runtimes: tuple[str, ...] = ()
    # Keys of the bundles and images the node holds, most recently used first (left out
    # of the encoding when empty).
    held: tuple[bytes, ...] = ()

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dev": [d.encode() for d in self.devices], "prio": self.priority,
            "elig": self.eligible, "claim": self.claim, "mt": self.max_term,
        }
        if self.preemptible:
            out["pre"] = [p.encode() for p in self.preemptible]
        if self.battery is not None:
            out["bat"] = self.battery.encode()
        if self.runtimes:
            out["rt"] = list(self.runtimes)
        if self.held:
            out["held"] = list(self.held)
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(v: Any, high: int = 2**31 - 1, low: int = 0) -> int:
    """An integer within [low, high]; anything else reads as 0 (none)."""
    return v if _is_int(v) and low <= v <= high else 0


MAX_RUNTIMES = 4  # container runtimes a node lists at most
MAX_RUNTIME_NAME = 16
MAX_TERM = 2**53  # as wire.MAX_COUNTER: a term beyond it is no term
MAX_MIB = 2**32  # of one device
MAX_MILLI = 10**6  # compute of one device, in thousandths
_DEVICE_LIMITS = (MAX_MIB, MAX_MILLI, MAX_MILLI, MAX_MIB, MAX_MILLI, MAX_MIB)  # row[3:9]


_DEVICE_TYPES: tuple[type, ...] = (str, str, str, int, int, int, int, int, int, str, bool)


def _device(row: Any) -> DeviceFact | None:
    if not (isinstance(row, list) and len(row) >= len(_DEVICE_TYPES)):
        return None
    for v, t in zip(row, _DEVICE_TYPES, strict=False):
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            return None
    if row[3] < 0 or row[4] <= 0:  # no capacity claimed: not a device
        return None
    if not all(0 <= v <= high for v, high in zip(row[3:9], _DEVICE_LIMITS, strict=True)):
        return None  # beyond any device: a ghost
    enforcement = row[11] if len(row) > 11 and isinstance(row[11], str) else UNKNOWN_ENFORCEMENT
    return DeviceFact(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8],
                      row[9], row[10], enforcement)


def _preemptible(row: Any) -> PreemptibleFact | None:
    if not (isinstance(row, list) and len(row) >= 5 and isinstance(row[0], str)
            and isinstance(row[1], list) and row[1] and all(isinstance(d, str) for d in row[1])
            and all(_is_int(v) for v in row[2:5]) and 0 < row[2] <= MAX_MILLI
            and 0 <= row[3] <= MAX_MIB and abs(row[4]) < 2**31):
        return None
    return PreemptibleFact(row[0], tuple(row[1]), row[2], row[3], row[4])


def _battery(row: Any) -> BatteryFact | None:
    """A battery row, or None (mains) where it is not one: a level or floor outside
    0..100 or of the wrong type is no reading at all."""
    if not (isinstance(row, list) and len(row) >= 3 and _is_int(row[0])
            and isinstance(row[1], bool) and _is_int(row[2])
            and 0 <= row[0] <= 100 and 0 <= row[2] <= 100):
        return None
    return BatteryFact(row[0], row[1], row[2])


def decode(data: Any) -> NodeFacts:
    """A peer's facts as far as they make sense; never raises. Device rows that have the
    wrong shape, name a device twice, claim no capacity or more than any device has are
    left out, as are malformed preemptible rows; a term out of range reads as none, a
    malformed battery as none (mains)."""
    if not isinstance(data, dict):
        return NodeFacts()
    devices: list[DeviceFact] = []
    seen: set[str] = set()
    rows = data.get("dev")
    for row in rows if isinstance(rows, list) else ():
        dev = _device(row)
        if dev is not None and dev.id not in seen:
            seen.add(dev.id)
            devices.append(dev)
    pre = data.get("pre")
    jobs = [p for p in (_preemptible(r) for r in (pre if isinstance(pre, list) else ()))
            if p is not None]
    return NodeFacts(tuple(devices), _int(data.get("prio"), low=-(2**31)),
                     bool(data.get("elig", True)), _int(data.get("claim"), MAX_TERM),
                     _int(data.get("mt"), MAX_TERM), tuple(jobs),
                     battery=_battery(data.get("bat")),
                     runtimes=_runtimes(data.get("rt")), held=_held(data.get("held")))


def _held(rows: Any) -> tuple[bytes, ...]:
    """Keys of ``HELD_KEY_BYTES`` bytes, each once, the first ``MAX_HELD``; anything
    else is left out."""
    out: list[bytes] = []
    for key in rows if isinstance(rows, list) else ():
        if len(out) >= MAX_HELD:
            break
        if isinstance(key, bytes) and len(key) == HELD_KEY_BYTES and key not in out:
            out.append(key)
    return tuple(out)


def _runtimes(rows: Any) -> tuple[str, ...]:
    """Short names, each once, at most ``MAX_RUNTIMES``; anything else is left out."""
    out: list[str] = []
    for name in rows if isinstance(rows, list) else ():
        if (isinstance(name, str) and 0 < len(name) <= MAX_RUNTIME_NAME and name not in out
                and len(out) < MAX_RUNTIMES):
            out.append(name)
    return tuple(out)


def fit(facts: NodeFacts, name: str, incarnation: int, version: int) -> NodeFacts:
    """The facts trimmed to one datagram: first the keys of what the node holds, least
    recently used first, then preemptible jobs, listed cheapest first, are dropped from
    the end until the ``Facts`` message that carries them fits."""
    trial = replace(facts, preemptible=facts.preemptible[:MAX_PREEMPTIBLE],
                    held=facts.held[:MAX_HELD])
    while trial.held or trial.preemptible:
        size = len(wire.encode_message(wire.Facts(name, incarnation, version, trial.encode())))
        if size + wire.packet_overhead(1) <= wire.UDP_BUDGET:
            return trial
        if trial.held:  # a preference only: it goes before what preemption needs
            trial = replace(trial, held=trial.held[:len(trial.held) - 4])
        else:
            trial = replace(trial, preemptible=trial.preemptible[:-1])
    return trial
