"""What a node asks of the world: effects, collected in one outbox and drained in order.

The node never does I/O. Each input appends effects here; the runtime (or the simulator)
drains them and carries them out in order, journal writes first (see ``runtime.flush``).
A call to another agent is an effect too; what is waiting for its answer is kept as data
(``PendingCall``), so the reply is dispatched by the type of the request, not by a closure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flexmesh.agent.devices.base import Device
from flexmesh.agent.models import JobRecord, RunRecord
from flexmesh.protocol import wire
from flexmesh.protocol.lease import Lease
from flexmesh.protocol.membership import (
    FactsEvent,
    MemberEvent,
    NameConflict,
    SendPacket,
    StartPushPull,
)


@dataclass(frozen=True, slots=True)
class Call:
    """Send ``msg`` to another agent over TCP and report with ``Node.call_result``."""

    call_id: int
    node: str
    addr: str
    msg: wire.Message
    timeout: float


@dataclass(frozen=True, slots=True)
class PersistJob:
    job: JobRecord


@dataclass(frozen=True, slots=True)
class PersistRun:
    """Owner: journal its record of a run."""

    run: RunRecord


@dataclass(frozen=True, slots=True)
class PersistLease:
    lease: Lease


@dataclass(frozen=True, slots=True)
class ForgetJob:
    """An ended job is past its retention: delete it from the journal."""

    job_id: str


@dataclass(frozen=True, slots=True)
class ForgetRun:
    """An ended run is past its retention: delete it from the journal."""

    job_id: str


@dataclass(frozen=True, slots=True)
class ForgetLease:
    """A finished lease is past its retention: delete it from the journal."""

    lease_id: str


@dataclass(frozen=True, slots=True)
class RunJob:
    """Owner: start the job's process on these devices (report ``job_started``/``exited``)."""

    job: RunRecord
    devices: tuple[Device, ...]


@dataclass(frozen=True, slots=True)
class StopJob:
    """Owner: stop the process of ``job_id``'s run under ``lease_id`` (not a later run's)."""

    job_id: str
    reason: str
    state: str  # the terminal state the job gets once stopped
    lease_id: str = ""  # "" : whatever process the job has


@dataclass(frozen=True, slots=True)
class ArchiveOutput:
    """Origin: a job goes back to the queue; keep its output so far apart from the next run."""

    job_id: str


@dataclass(frozen=True, slots=True)
class JobOutput:
    """Origin: output of a job followed on another node, to be written at ``offset`` of its
    ``stream`` ("stdout" or "stderr"). Written again at the same offset, it changes nothing."""

    job_id: str
    stream: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CollectResults:
    """Origin: bring the results ``sha`` (``size`` bytes) of a run of attempt ``attempt``
    of a job from its owner ``node`` (this node: from its own store) to this node's store
    of the job's results; the node hears how it went (``results.collected``)."""

    job_id: str
    attempt: int
    node: str
    sha: str
    size: int


@dataclass(frozen=True, slots=True)
class LogEvent:
    event: str
    fields: dict[str, Any]


Effect = (SendPacket | StartPushPull | MemberEvent | FactsEvent | NameConflict | Call | PersistJob
          | PersistRun | PersistLease | ForgetJob | ForgetRun | ForgetLease | RunJob | StopJob
          | ArchiveOutput | JobOutput | CollectResults | LogEvent)


@dataclass(frozen=True, slots=True)
class PendingCall:
    """A call waiting for its answer: to whom, what was asked, and on whose behalf."""

    node: str
    msg: wire.Message
    job_id: str = ""  # the job the call is about, where the request does not name it
    gang: tuple[str, int] | None = None  # coordinator: the (gang, term) a lease ask is for
    lease_id: str = ""  # origin: the placement a JobSync follows


@dataclass(slots=True)
class Outbox:
    effects: list[Effect] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def emit(self, effect: Effect) -> None:
        self.effects.append(effect)

    def log(self, event: str, **fields: Any) -> None:
        self.effects.append(LogEvent(event, fields))

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def withdraw_run(self, job_id: str, lease_id: str) -> bool:
        """Take back a RunJob not yet drained (its run ended within the same input, so no
        process must start for it); True if there was one."""
        for i, eff in enumerate(self.effects):
            if isinstance(eff, RunJob) and eff.job.id == job_id and eff.job.lease_id == lease_id:
                del self.effects[i]
                return True
        return False

    def drain(self) -> list[Effect]:
        out, self.effects = self.effects, []
        return out
