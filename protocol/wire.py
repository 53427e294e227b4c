"""The wire format: typed messages, msgpack bodies, one error for every malformed input.

Theory of operation
-------------------
A message is a small frozen dataclass with a numeric ``TYPE_ID``. On the wire it is the
msgpack array ``[type_id, [field, field, ...]]``; fields are positional, so a later
version may only *append* fields (older decoders ignore the extra ones) and may only
*append* message types.

A UDP packet is one version byte followed by a msgpack array of messages, so several
messages share one datagram (a compound packet) within ``UDP_BUDGET`` bytes. A TCP frame is
a 4-byte big-endian length followed by one version byte and one message.

Two rules for this file: it does no I/O, and every input that is not a well-formed packet
raises ``DecodeError`` and nothing else.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import msgpack

PROTOCOL_VERSION = 1
UDP_BUDGET = 1400  # bytes: fits a 1500-byte Ethernet MTU with IP/UDP headers and sealing
MAX_FRAME = 8 * 1024 * 1024  # bytes: the largest TCP frame a peer may send
FIRST_FRAME = 64 * 1024  # bytes: the largest first frame on a connection (see above)
FRAME_HEADER = struct.Struct(">I")


class DecodeError(Exception):
    """Raised for any bytes that are not a valid packet or frame of this protocol."""


class Message:
    """Base of every wire message. Subclasses are frozen dataclasses with ``TYPE_ID``."""

    TYPE_ID: ClassVar[int]
    _checks: ClassVar[tuple[Callable[[Any], bool], ...]]
    _required: ClassVar[int]


# --- field checks: a decoded value must have exactly the type the field declares ---------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_bytes(v: Any) -> bool:
    return isinstance(v, bytes)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


def _is_list(v: Any) -> bool:
    return isinstance(v, list)


def _is_opt_int(v: Any) -> bool:
    return v is None or _is_int(v)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_str_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    )


def _is_float_list(v: Any) -> bool:
    """A short list of finite numbers of sane size (a network coordinate)."""
    return isinstance(v, list) and len(v) <= 16 and all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
        and abs(x) <= 1e3 for x in v)


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "list[float]": _is_float_list,
    "int": _is_int,
    "str": _is_str,
    "bool": _is_bool,
    "bytes": _is_bytes,
    "dict[str, Any]": _is_dict,
    "list[Any]": _is_list,
    "int | None": _is_opt_int,
    "list[str]": _is_str_list,
    "dict[str, str]": _is_str_dict,
}

# The range of every integer field, by name: a value outside is a malformed message,
# never a number the receiver must carry (an incarnation or a term near 2**64 would
# overflow the encoder when raised, and could never be superseded). Counters get room
# for any real history; sizes, counts and ranks for any real machine.
MAX_COUNTER = 2**53  # incarnations, versions, terms, tokens, attempts, sequence numbers
MAX_OFFSET = 2**62  # bytes of a job's output
INT_RANGES: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("seq", "orig_seq", "incarnation", "version", "facts_version", "term",
                     "token", "attempt"), (0, MAX_COUNTER)),
    "compute_milli": (0, 1000),
    "memory_mib": (0, 2**32),  # 4 PiB of device memory
    "priority": (-(2**31), 2**31 - 1),
    **dict.fromkeys(("count", "gang_size", "rank"), (0, 4096)),
    **dict.fromkeys(("stdout_offset", "stderr_offset"), (0, MAX_OFFSET)),
    "wait_ms": (0, 3_600_000),
    **dict.fromkeys(("offset", "total", "bundle_size", "through"), (0, MAX_OFFSET)),  # bytes
    "length": (0, MAX_FRAME),
    "exit_code": (-(2**31), 2**31 - 1),
}
INT64 = (-(2**63), 2**63 - 1)  # any other integer field


def _check(name: str, kind: str) -> Callable[[Any], bool]:
    typed = _CHECKS[kind]
    if kind not in ("int", "int | None"):
        return typed
    low, high = INT_RANGES.get(name, INT64)
    return lambda v: typed(v) and (v is None or low <= v <= high)


REGISTRY: dict[int, type[Message]] = {}


M = TypeVar("M", bound=type[Message])


def message(type_id: int) -> Callable[[M], M]:
    """Register a message dataclass under an append-only type id."""

    def wrap(cls: M) -> M:
        if type_id in REGISTRY:
            raise RuntimeError(f"type id {type_id} used twice")
        cls.TYPE_ID = type_id
        declared = fields(cls)  # type: ignore[arg-type]
        cls._checks = tuple(_check(f.name, str(f.type)) for f in declared)
        # Fields appended later carry defaults: a peer one version behind may omit them.
        cls._required = sum(
            1 for f in declared if f.default is MISSING and f.default_factory is MISSING
        )
        REGISTRY[type_id] = cls
        return cls

    return wrap


# ONLY APPEND TO THESE LISTS. The numeric ids and field orders are the protocol itself.

# --- membership, over UDP ----------------------------------------------------------------


@message(1)
@dataclass(frozen=True, slots=True)
class Ping(Message):
    seq: int
    target: str  # the node the sender means to reach; a restarted address may differ
    source: str
    source_addr: str


@message(2)
@dataclass(frozen=True, slots=True)
class IndirectPing(Message):
    seq: int
    target: str
    target_addr: str
    source: str
    source_addr: str
    nack: bool  # the requester wants a Nack if the target does not answer


@message(3)
@dataclass(frozen=True, slots=True)
class Ack(Message):
    seq: int
    source: str
    # The acker's network coordinate (``vivaldi.Coordinate.to_wire``), on a direct answer
    # to a ping; empty on a relayed one, whose round trip is not the acker's.
    coord: list[float] = field(default_factory=list)


@message(4)
@dataclass(frozen=True, slots=True)
class Nack(Message):
    seq: int
    source: str


@message(5)
@dataclass(frozen=True, slots=True)
class Alive(Message):
    node: str
    addr: str
    incarnation: int


@message(6)
@dataclass(frozen=True, slots=True)
class Suspect(Message):
    node: str
    incarnation: int
    source: str


@message(7)
@dataclass(frozen=True, slots=True)
class Dead(Message):
    node: str
    incarnation: int
    source: str  # equal to ``node`` for a graceful leave


@message(8)
@dataclass(frozen=True, slots=True)
class Facts(Message):
    """A node's versioned facts (devices, usage, coordinator claim), merged by version."""

    node: str
    incarnation: int
    version: int
    data: dict[str, Any]


# --- agent-to-agent calls, over TCP ---------------------------------------------------


@message(32)
@dataclass(frozen=True, slots=True)
class PushPull(Message):
    """Full membership state, sent both ways on join and for anti-entropy.

    ``states`` rows: ``[name, addr, incarnation, state, facts_version, facts]``.
    """

    join: bool
    source: str
    states: list[Any]


@message(33)
@dataclass(frozen=True, slots=True)
class Submit(Message):
    """Origin -> coordinator: queue a resource request (the command stays at the origin)."""

    job_id: str
    origin: str
    compute_milli: int
    memory_mib: int
    kind: str
    priority: int
    attempt: int  # rises each time the origin requeues the job (a placement is per attempt)
    count: int = 1  # whole devices wanted on one node (1: one device, or a fraction of one)
    preemptible: bool = False  # a higher-priority request may stop it (it is then requeued)
    # A member of a gang: ``gang_size`` requests with the same ``gang`` id, placed on as
    # many distinct nodes all at once or not at all (``rank`` orders them).
    gang: str = ""
    gang_size: int = 0
    rank: int = 0
    # Never failed for being impossible (no device of the mesh could ever hold it): it
    # waits for capacity to join.
    wait_for_capacity: bool = False
    # Runs in a container image: placed only on a node that gossips a container runtime.
    container: bool = False
    # What the job needs on the node it runs on, for the placement to prefer a node that
    # holds it already: its working directory's bundle (SHA-256, hex) and size, its image.
    bundle: str = ""
    bundle_size: int = 0
    image: str = ""


@message(34)
@dataclass(frozen=True, slots=True)
class Withdraw(Message):
    """Origin -> coordinator: drop a queued request (cancelled at the origin)."""

    job_id: str


@message(35)
@dataclass(frozen=True, slots=True)
class LeaseRequest(Message):
    """Coordinator -> owner: reserve a fraction of a device for a job."""

    job_id: str
    origin: str
    device: str
    compute_milli: int
    memory_mib: int
    term: int
    coordinator: str
    more: list[str] = field(default_factory=list)  # further devices, as much again on each
    priority: int = 0  # the job's, kept on the lease for preemption
    preemptible: bool = False
    # Runs in a container: an NPU fraction is leased as the vNPU template that holds it.
    container: bool = False


@message(36)
@dataclass(frozen=True, slots=True)
class LeaseReply(Message):
    granted: bool
    lease_id: str
    token: int
    facts_version: int
    reason: str
    devices: list[str] = field(default_factory=list)  # what the lease holds, when granted


@message(37)
@dataclass(frozen=True, slots=True)
class Placed(Message):
    """Coordinator -> origin: a lease is reserved for the job on ``node``/``device``."""

    job_id: str
    node: str
    device: str
    lease_id: str
    token: int
    term: int
    more: list[str] = field(default_factory=list)  # the lease's further devices


@message(38)
@dataclass(frozen=True, slots=True)
class StartJob(Message):
    """Origin -> owner: run the job under the reserved lease."""

    job_id: str
    lease_id: str
    token: int
    origin: str
    command: list[str]
    env: dict[str, str]
    compute_milli: int
    memory_mib: int
    # The job's working directory, packed at the origin (see FetchBundle); "": none.
    bundle: str = ""  # its SHA-256, hex
    bundle_size: int = 0  # bytes
    # The OCI image to run the command in ("": as a plain process) and its network
    # ("none", "host" or "bridge"; see agent/containers.py).
    image: str = ""
    image_network: str = ""


@message(39)
@dataclass(frozen=True, slots=True)
class JobSync(Message):
    """Origin -> owner: long-poll a job's state and the output past the given offsets."""

    job_id: str
    stdout_offset: int
    stderr_offset: int
    wait_ms: int
    accept: str = ""  # encodings the caller can inflate ("zlib"; see compress.py)


@message(40)
@dataclass(frozen=True, slots=True)
class JobSyncReply(Message):
    state: str
    reason: str
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    complete: bool  # terminal, and no output beyond what this reply carries
    # The run's results (what it left under $FLEXMESH_OUTPUT), packed once it ended: the
    # archive's SHA-256 (hex; "": none) and size, and what a person should know of them
    # (cut at the owner's limit, entries skipped). The origin fetches them (FetchResults).
    results: str = ""
    results_size: int = 0
    results_note: str = ""
    encoding: str = ""  # "zlib": stdout and stderr are compressed ("": as they are)


@message(41)
@dataclass(frozen=True, slots=True)
class Cancel(Message):
    job_id: str
    reason: str


@message(42)
@dataclass(frozen=True, slots=True)
class Ok(Message):
    detail: str


@message(43)
@dataclass(frozen=True, slots=True)
class Error(Message):
    """A call was understood but refused; ``reason`` is for a person to read."""

    reason: str


@message(44)
@dataclass(frozen=True, slots=True)
class Preempt(Message):
    """Coordinator -> owner: stop these preemptible jobs so a higher-priority one fits."""

    job_ids: list[str]
    reason: str
    term: int
    coordinator: str
    priority: int = 0  # of the request they make room for: only lower ones are stopped


@message(45)
@dataclass(frozen=True, slots=True)
class Release(Message):
    """Coordinator -> owner: give back a lease reserved for a job that will not start there
    (another member of its gang was refused). A lease already started is left alone."""

    job_id: str
    lease_id: str
    token: int


@message(46)
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Caller -> callee, first on a connection whose request is over ``FIRST_FRAME``: once
    it has decoded (and opened, with a key), frames up to ``MAX_FRAME`` are read on that
    connection. Accepted only as a first frame, and never answered."""

    source: str  # the caller's node name, for the callee's logs


# --- payloads: a job's working directory, fetched by the owner from the origin ---------------


@message(47)
@dataclass(frozen=True, slots=True)
class FetchBundle(Message):
    """Owner -> origin: up to ``length`` bytes of bundle ``bundle`` (a SHA-256, hex) from
    ``offset``. Answered with a ``BundleChunk`` or an ``Error``.

    With ``through`` (appended; 0: one chunk), a stream: consecutive ``BundleChunk``s on
    this connection, each at most ``length`` bytes, from ``offset`` up to ``through`` (or
    the end), each but the last with ``more``. A peer one version behind ignores
    ``through`` and answers one chunk without ``more``: the caller then asks chunk by
    chunk."""

    bundle: str
    offset: int
    length: int
    job_id: str = ""  # the job it is for (the origin serves only its jobs' bundles)
    accept: str = ""  # encodings the caller can inflate ("zlib"; see compress.py)
    through: int = 0  # stream up to this byte (exclusive); 0: one chunk


@message(48)
@dataclass(frozen=True, slots=True)
class BundleChunk(Message):
    """Origin -> owner: ``data`` of ``bundle`` from ``offset`` (empty at the end), and the
    bundle's ``total`` size."""

    bundle: str
    offset: int
    data: bytes
    total: int
    encoding: str = ""  # "zlib": ``data`` is compressed ("": as it is)
    more: bool = False  # in a stream: further chunks follow on this connection


# --- results: what a run left under $FLEXMESH_OUTPUT, fetched by the origin ----------------


@message(64)
@dataclass(frozen=True, slots=True)
class FetchResults(Message):
    """Origin -> owner: up to ``length`` bytes from ``offset`` of the results archive
    ``results`` (a SHA-256, hex) of a run of ``job_id``. Answered with a ``BundleChunk``
    (its ``bundle`` the archive's SHA-256) or an ``Error``; a stream with ``through``."""

    job_id: str
    results: str
    offset: int
    length: int
    accept: str = ""  # encodings the caller can inflate ("zlib"; see compress.py)
    through: int = 0  # stream up to this byte, as ``FetchBundle``'s; 0: one chunk


@message(65)
@dataclass(frozen=True, slots=True)
class ResultsTaken(Message):
    """Origin -> owner: the results ``results`` of ``job_id`` are safe at the origin (or
    given up): the owner may delete its copy. Answered with ``Ok``."""

    job_id: str
    results: str


# --- placement that can never be ------------------------------------------------------


@message(60)
@dataclass(frozen=True, slots=True)
class Unplaceable(Message):
    """Coordinator -> origin: no device of the mesh could ever hold this attempt of the
    job, and its grace is over: the origin fails it with ``reason`` (``impossible: ...``).
    Sent as a call, and as the answer to the origin's next ``Submit`` of that attempt."""

    job_id: str
    attempt: int
    reason: str


# --- encoding ---------------------------------------------------------------------------


_packers = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's Packer. ``msgpack.packb`` makes a new one each call, and its 256 KiB
    buffer is mapped and unmapped each time where the agent pins glibc's mmap threshold:
    a reused one saves most of an idle agent's encoding cost."""
    packer: msgpack.Packer | None = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer


def encode_message(msg: Message) -> bytes:
    body = [getattr(msg, f.name) for f in fields(msg)]  # type: ignore[arg-type]
    out: bytes = _packer().pack([msg.TYPE_ID, body])
    return out


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def packet_overhead(count: int) -> int:
    """Bytes a packet of ``count`` messages adds around their encodings."""
    return 1 + len(_array_header(count))


def encode_packet_raw(encoded: Sequence[bytes]) -> bytes:
    """A compound packet from messages already encoded with ``encode_message``."""
    return bytes([PROTOCOL_VERSION]) + _array_header(len(encoded)) + b"".join(encoded)


def encode_packet(msgs: Iterable[Message]) -> bytes:
    return encode_packet_raw([encode_message(m) for m in msgs])


def encode_frame(msg: Message) -> bytes:
    body = bytes([PROTOCOL_VERSION]) + encode_message(msg)
    return FRAME_HEADER.pack(len(body)) + body


# --- decoding ---------------------------------------------------------------------------


def _unpack(data: bytes | memoryview) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except Exception as exc:  # msgpack raises many types for bad input; all mean the same
        raise DecodeError(f"not msgpack: {exc.__class__.__name__}") from None


def _check_version(data: bytes | bytearray | memoryview) -> None:
    if not data:
        raise DecodeError("empty packet")
    if data[0] != PROTOCOL_VERSION:
        raise DecodeError(f"unsupported protocol version {data[0]}")


def decode_message(item: Any) -> Message:
    if not isinstance(item, list) or len(item) != 2:
        raise DecodeError("a message is [type_id, fields]")
    type_id, body = item
    if not _is_int(type_id):
        raise DecodeError("type id is not an integer")
    cls = REGISTRY.get(type_id)
    if cls is None:
        raise DecodeError(f"unknown message type {type_id}")
    if not isinstance(body, list):
        raise DecodeError(f"{cls.__name__}: fields are not a list")
    checks = cls._checks
    if len(body) < cls._required:
        raise DecodeError(f"{cls.__name__}: {len(body)} fields, expected {len(checks)}")
    body = body[: len(checks)]
    for i, value in enumerate(body):
        if not checks[i](value):
            raise DecodeError(f"{cls.__name__}: field {i} has the wrong type or range")
    return cls(*body)


def decode_packet(data: bytes) -> list[Message]:
    """Decode a UDP packet into its messages, or raise DecodeError."""
    _check_version(data)
    items = _unpack(data[1:])
    if not isinstance(items, list) or not items:
        raise DecodeError("a packet is a non-empty list of messages")
    return [decode_message(item) for item in items]


def decode_frame_body(data: bytes | bytearray | memoryview) -> Message:
    """Decode a TCP frame's body (after the length prefix), or raise DecodeError."""
    _check_version(data)
    return decode_message(_unpack(memoryview(data)[1:]))  # a view: no copy of a large body


def frame_length(header: bytes) -> int:
    """The body length announced by a frame header, or DecodeError if out of bounds."""
    if len(header) != FRAME_HEADER.size:
        raise DecodeError("short frame header")
    (n,) = FRAME_HEADER.unpack(header)
    if n == 0 or n > MAX_FRAME:
        raise DecodeError(f"frame length {n} out of bounds")
    return int(n)
