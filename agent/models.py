"""Records the agent keeps about jobs and leases, shared by the node, journal and API."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# queued -> placed -> running -> succeeded | failed | cancelled | preempted | lost
QUEUED = "queued"
PLACED = "placed"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
PREEMPTED = "preempted"
LOST = "lost"

# Where a job's results stand at its origin: being fetched from the owner, here (to be
# copied out with ``flexmesh results``), or not to be had (``results_note`` says why).
RESULTS_FETCHING = "fetching"
RESULTS_HERE = "here"
RESULTS_FAILED = "failed"

STATES = (QUEUED, PLACED, RUNNING, SUCCEEDED, FAILED, CANCELLED, PREEMPTED, LOST)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, PREEMPTED, LOST})

# The states a job may go to from each state, as its journal records them. A terminal
# state is final; a run started again under the same id (a new attempt on an owner, its
# ``attempts`` higher) is a new life and may begin anywhere.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({QUEUED, PLACED, CANCELLED, FAILED, LOST}),
    PLACED: frozenset({PLACED, RUNNING, QUEUED, *TERMINAL}),
    RUNNING: frozenset({RUNNING, QUEUED, *TERMINAL}),
    **{state: frozenset({state}) for state in TERMINAL},
}


def may_become(before: str, attempts_before: int, after: str, attempts_after: int) -> bool:
    """Whether a job journaled in ``before`` may next be journaled in ``after``."""
    return attempts_after > attempts_before or after in TRANSITIONS.get(before, frozenset())

MAX_GANG = 64  # members of one gang, each on a node of its own
MAX_DEVICES = 16  # whole devices one job may ask for on one node
MAX_MEMORY_MIB = 1 << 24  # 16 TiB per device: anything above is a typo, not a device


def job_id_problem(job_id: object) -> str | None:
    """Why a job id cannot name a job, or None. It names a directory in the state dir and
    appears in logs: one path component of at most 200 bytes, printable characters only."""
    if (not isinstance(job_id, str) or not job_id or job_id in (".", "..") or "/" in job_id
            or not job_id.isprintable() or len(job_id.encode("utf-8", "replace")) > 200):
        return f"invalid job id {str(job_id)[:80]!r}"
    return None


def member_id(gang: str, rank: int) -> str:
    """The job id of a gang's member of this rank."""
    return f"{gang}.{rank}"


def request_problem(compute_milli: int, memory_mib: int, count: int, gang_size: int,
                    preemptible: bool) -> str | None:
    """What is wrong with the shape of a request, as a sentence, or None if nothing is.

    ``count`` is the devices wanted on one node, ``gang_size`` the nodes (1: not a gang).
    The sentences name the fields of the API's submit body.
    """
    if not 0 <= compute_milli <= 1000 or compute_milli == memory_mib == 0:
        return (f"compute_milli {compute_milli} must be 1..1000 (1000 = one device), or 0 "
                "with memory_mib (compute in proportion to memory)")
    if memory_mib < 0:
        return f"memory_mib {memory_mib} is negative"
    if memory_mib > MAX_MEMORY_MIB:
        return (f"memory_mib {memory_mib} is larger than any device could be (at most "
                f"{MAX_MEMORY_MIB} MiB, 16 TiB, per device)")
    if not 1 <= count <= MAX_DEVICES:
        return f"devices must be an integer from 1 to {MAX_DEVICES}"
    if count > 1 and compute_milli != 1000:
        return (f"{count} devices are whole devices: a fraction of each "
                f"({compute_milli} milli) cannot be asked for")
    if not 1 <= gang_size <= MAX_GANG:
        return f"gang must be an integer from 1 to {MAX_GANG} (nodes, one member each)"
    if gang_size > 1 and preemptible:
        return "a gang cannot be preemptible: stopping one member stops them all"
    return None


def _devices(data: dict[str, Any]) -> None:
    """A record journaled before devices were one tuple: ``device`` plus ``more_devices``."""
    if "devices" not in data and "device" in data:
        first = data.get("device") or ""
        more = data.get("more_devices") or []
        data["devices"] = [first, *more] if first else []
    if isinstance(data.get("devices"), list):
        data["devices"] = tuple(data["devices"])


@dataclass(slots=True)
class JobRecord:
    """A job as its origin, the agent it was submitted to, keeps it: the user's view.

    Where it runs, the owner of the leased devices keeps a ``RunRecord`` of each run; a
    job run on the node where it was submitted has both, as any other job has.
    """

    id: str
    origin: str
    command: list[str]
    compute_milli: int
    memory_mib: int
    kind: str = "any"
    priority: int = 0
    requeue: bool = True
    env: dict[str, str] = field(default_factory=dict)
    state: str = QUEUED
    reason: str = ""
    node: str = ""  # owner of the leased devices, once placed
    devices: tuple[str, ...] = ()  # the leased devices, once placed
    lease_id: str = ""
    token: int = 0  # fencing token of the lease
    term: int = 0  # coordinator term that placed it
    exit_code: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    uid: int | None = None  # submitting user, when known
    attempts: int = 0  # rises on every requeue; a placement is per attempt
    count: int = 1  # whole devices wanted on one node (1: one device or a fraction of one)
    preemptible: bool = False  # a higher-priority job may stop it (then requeued if allowed)
    cancel_requested: bool = False  # the user cancelled it; told to the owner until done
    # A member of a gang (``gang`` is the gang's id, ``gang_size`` its members, ``rank``
    # this one's place): all are placed on distinct nodes at once, and they end together.
    gang: str = ""
    gang_size: int = 0
    rank: int = 0
    # The working directory the job carries: packed at the origin from ``workdir`` (a path
    # there) into the bundle of this SHA-256 and size, unpacked where it runs ("": none).
    workdir: str = ""
    bundle: str = ""
    bundle_size: int = 0
    # The OCI image the command runs in ("": a plain process), and the container's network
    # ("none" unless the submitter asked for "host" or "bridge").
    image: str = ""
    image_network: str = ""
    # Wait, however long, where no device of the mesh could ever hold it (else it fails
    # after the coordinator's ``impossible_grace``).
    wait_for_capacity: bool = False
    # What the run of attempt ``results_attempt`` left under $FLEXMESH_OUTPUT, as its
    # owner packed it (SHA-256 and size; "": none), where it stands here (RESULTS_*), and
    # what a person should know of it (cut at a limit; why there are none).
    results: str = ""
    results_size: int = 0
    results_state: str = ""
    results_note: str = ""
    results_attempt: int = 0
    results_node: str = ""  # the owner they are fetched from ("": ``node``, as before)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        data = dict(data)
        _devices(data)
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(slots=True)
class RunRecord:
    """One run of a job on this node's devices, as their owner keeps it: the process, the
    lease it runs under, and how it ended. Its origin (maybe this node) keeps the job."""

    id: str  # the job's id
    origin: str
    command: list[str]
    compute_milli: int  # per device, as leased (a request in proportion made concrete)
    memory_mib: int
    env: dict[str, str] = field(default_factory=dict)
    state: str = PLACED
    reason: str = ""
    devices: tuple[str, ...] = ()
    lease_id: str = ""
    token: int = 0
    term: int = 0
    exit_code: int | None = None
    pid: int | None = None
    pid_start: int | None = None  # /proc start time, to tell a reused pid from ours
    created_at: float = 0.0
    updated_at: float = 0.0
    uid: int | None = None  # the submitting user: known only for a job submitted here
    attempts: int = 0  # runs of this job started here
    bundle: str = ""  # the working directory's bundle (SHA-256) and size ("": none)
    bundle_size: int = 0
    image: str = ""  # the OCI image it runs in ("": a plain process)
    image_network: str = ""  # the container's network ("": none)
    # Its results, packed here when it ended (SHA-256 and size, "": none; see JobRecord),
    # and whether the origin has them (then this node's copy is deleted).
    results: str = ""
    results_size: int = 0
    results_note: str = ""
    results_taken: bool = False
    # Archives of earlier runs of the job here (preempted, placed here again) that their
    # origin has not taken yet: still served and kept (SHA-256s, at most MAX_CARRIED).
    earlier_results: list[str] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        data = dict(data)
        _devices(data)
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


def gang_members(gang: str, size: int, **fields: Any) -> list[JobRecord]:
    """The member jobs of a new gang of ``size``: one per rank, alike but for id and rank."""
    return [JobRecord(id=member_id(gang, rank), gang=gang, gang_size=size, rank=rank,
                      **fields) for rank in range(size)]
