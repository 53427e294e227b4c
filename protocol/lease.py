"""The owner's lease table: the only authority over how much of a device is lent.

Theory of operation
-------------------
A coordinator *asks*; the owner's table decides on its own books. A lease moves

    RESERVED --start--> LENT --release--> RELEASED
    RESERVED --ttl----> EXPIRED            (the job never started: capacity comes back)

A request is granted only if the device's leases, counted in integer milli and MiB, stay
within what the owner lends (capacity minus local use minus reserve). Every grant carries
a fencing token that rises on every grant on this node, and the coordinator term that
asked; a request from a term below the highest this owner has seen is refused, so a stale
coordinator on the far side of a healed partition cannot place work.

Rules of this file: no I/O and no clock reads (``now`` is passed in).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

RESERVED = "reserved"
LENT = "lent"
RELEASED = "released"
EXPIRED = "expired"
ACTIVE = frozenset({RESERVED, LENT})

# Transitions as data: (state, event) -> next state.
TRANSITIONS: dict[tuple[str, str], str] = {
    (RESERVED, "start"): LENT,
    (RESERVED, "release"): RELEASED,
    (RESERVED, "expire"): EXPIRED,
    (LENT, "release"): RELEASED,
}


@dataclass(slots=True)
class Lease:
    id: str
    job_id: str
    device: str
    compute_milli: int
    memory_mib: int
    token: int
    term: int
    coordinator: str
    origin: str
    state: str
    created: float
    expires: float
    # Further devices of the same node held by this one lease (a job that asked for several
    # whole devices); each carries ``compute_milli``/``memory_mib`` like ``device`` does.
    more: tuple[str, ...] = ()
    priority: int = 0  # the job's priority, for choosing preemption victims
    preemptible: bool = False  # whether a higher-priority request may take it back

    @property
    def devices(self) -> tuple[str, ...]:
        return (self.device, *self.more)

    def holds(self, device: str) -> bool:
        return self.device == device or device in self.more

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["more"] = list(self.more)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lease:
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        values["more"] = tuple(values.get("more", ()))  # fields added later have defaults
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    max_term: int = 0


@dataclass(slots=True)
class _Books:
    capacity_compute: int
    capacity_memory: int
    lend_compute: int  # what the owner is willing to lend now
    lend_memory: int


class LeaseTable:
    def __init__(self, node: str, token: int = 0, max_term: int = 0) -> None:
        self.node = node
        self.token = token  # last fencing token handed out; persisted by the runtime
        self.max_term = max_term
        self.leases: dict[str, Lease] = {}
        self._books: dict[str, _Books] = {}

    # --- devices --------------------------------------------------------------------------

    def set_device(self, device: str, compute: int, memory: int,
                   lend_compute: int | None = None, lend_memory: int | None = None) -> None:
        """Declare a device, and how much of it may be lent at most (defaults to all)."""
        self._books[device] = _Books(
            compute, memory,
            compute if lend_compute is None else min(lend_compute, compute),
            memory if lend_memory is None else min(lend_memory, memory),
        )

    def remove_device(self, device: str) -> list[Lease]:
        """Forget a device (it fell off the bus) and return its active leases, for their
        jobs to be stopped. They are released, except a started lease that also holds other
        devices: its job still runs there until it stops, so those stay taken until the
        lease is released."""
        self._books.pop(device, None)
        gone = [x for x in self.leases.values() if x.holds(device) and x.state in ACTIVE]
        for lease in gone:
            if not (lease.more and lease.state == LENT):
                lease.state = RELEASED
        return gone

    def devices(self) -> list[str]:
        return list(self._books)

    def used(self, device: str, excluding: frozenset[str] | set[str] = frozenset()
             ) -> tuple[int, int]:
        """Compute and memory held by active leases on ``device`` (minus some jobs')."""
        c = m = 0
        for lease in self.leases.values():
            if lease.state in ACTIVE and lease.holds(device) and lease.job_id not in excluding:
                c += lease.compute_milli
                m += lease.memory_mib
        return c, m

    def free(self, device: str) -> tuple[int, int]:
        """What can still be granted on ``device`` (never negative)."""
        books = self._books.get(device)
        if books is None:
            return 0, 0
        c, m = self.used(device)
        return max(books.lend_compute - c, 0), max(books.lend_memory - m, 0)

    def lendable(self, device: str) -> tuple[int, int]:
        """The most the owner lends on ``device`` now, leases included."""
        books = self._books.get(device)
        return (0, 0) if books is None else (books.lend_compute, books.lend_memory)

    def capacity(self, device: str) -> tuple[int, int]:
        books = self._books[device]
        return books.capacity_compute, books.capacity_memory

    # --- lease life cycle -------------------------------------------------------------------

    def request(
        self, *, job_id: str, device: str, compute_milli: int, memory_mib: int, term: int,
        coordinator: str, origin: str, now: float, ttl: float, more: tuple[str, ...] = (),
        priority: int = 0, preemptible: bool = False,
    ) -> Lease | Refusal:
        """Reserve ``compute_milli``/``memory_mib`` on ``device`` (and as much again on each
        of ``more``, all or nothing) for ``job_id``, or say why not."""
        if term < self.max_term:
            return Refusal(f"stale coordinator term {term} (this owner has seen {self.max_term})",
                           self.max_term)
        self.max_term = term
        for lease in self.leases.values():
            if lease.job_id == job_id and lease.state in ACTIVE:
                if lease.devices == (device, *more):
                    return lease  # the same request again: answer as before
                return Refusal(f"job {job_id} already holds lease {lease.id} on "
                               f"{','.join(lease.devices)}")
        if compute_milli <= 0 or memory_mib < 0:
            return Refusal("a lease needs positive compute and non-negative memory")
        wanted = (device, *more)
        if len(set(wanted)) != len(wanted):
            return Refusal(f"a device is named twice in {','.join(wanted)}")
        for dev in wanted:
            why = self._cannot_grant(dev, compute_milli, memory_mib)
            if why:
                return Refusal(why)
        self.token += 1
        lease = Lease(
            id=f"{self.node}/{self.token}", job_id=job_id, device=device,
            compute_milli=compute_milli, memory_mib=memory_mib, token=self.token, term=term,
            coordinator=coordinator, origin=origin, state=RESERVED, created=now,
            expires=now + ttl, more=tuple(more), priority=priority, preemptible=preemptible,
        )
        self.leases[lease.id] = lease
        return lease

    def _cannot_grant(self, device: str, compute_milli: int, memory_mib: int) -> str:
        books = self._books.get(device)
        if books is None:
            return f"no device {device!r} on node {self.node}"
        used_c, used_m = self.used(device)
        if used_c > books.lend_compute or used_m > books.lend_memory:
            # The owner lends less than it has lent (its own work grew): nothing new goes on
            # this device until the reclaim brings it back within the limit.
            return (f"{device} is being reclaimed: {used_c} milli and {used_m} MiB lent, "
                    f"{books.lend_compute} milli and {books.lend_memory} MiB lendable")
        free_c, free_m = books.lend_compute - used_c, books.lend_memory - used_m
        if compute_milli > free_c or memory_mib > free_m:
            return (f"{device} has {free_c} milli and {free_m} MiB free, "
                    f"asked {compute_milli} milli and {memory_mib} MiB")
        return ""

    def start(self, lease_id: str, job_id: str, token: int) -> Lease | Refusal:
        lease = self.leases.get(lease_id)
        if lease is None or lease.job_id != job_id or lease.token != token:
            return Refusal(f"no lease {lease_id} with token {token} for job {job_id}")
        if lease.state == LENT:
            return lease
        return self._move(lease, "start")

    def release(self, lease_id: str) -> Lease | None:
        lease = self.leases.get(lease_id)
        if lease is None or lease.state not in ACTIVE:
            return None
        self._move(lease, "release")
        return lease

    def expire(self, now: float) -> list[Lease]:
        gone = [x for x in self.leases.values() if x.state == RESERVED and now >= x.expires]
        for lease in gone:
            self._move(lease, "expire")
        return gone

    def forget_finished(self) -> None:
        for lid in [i for i, x in self.leases.items() if x.state not in ACTIVE]:
            del self.leases[lid]

    def restore(self, lease: Lease) -> None:
        """Put back a lease read from the journal after a restart."""
        self.leases[lease.id] = lease
        self.token = max(self.token, lease.token)
        self.max_term = max(self.max_term, lease.term)

    def active(self) -> list[Lease]:
        return [x for x in self.leases.values() if x.state in ACTIVE]

    def _move(self, lease: Lease, event: str) -> Lease | Refusal:
        nxt = TRANSITIONS.get((lease.state, event))
        if nxt is None:
            return Refusal(f"lease {lease.id} is {lease.state}; cannot {event}")
        lease.state = nxt
        return lease

    def next_deadline(self) -> float | None:
        times = [x.expires for x in self.leases.values() if x.state == RESERVED]
        return min(times) if times else None
