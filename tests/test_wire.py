"""The wire format: round trips, compound packets, size limits, and hostile input.

The contract under test (DESIGN.md, principle 5): message ids are append-only, every packet
carries a version, packets fit the UDP budget, and anything that does not decode raises
``wire.DecodeError`` and nothing else.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexmesh.protocol import wire

# --- strategies built from each message's declared field types --------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
TEXT = st.text(max_size=40)

# Any msgpack value that survives a round trip unchanged (lists, not tuples; no NaN).
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | TEXT | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=20,
)

FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "int": INT64,
    "str": TEXT,
    "bool": st.booleans(),
    "bytes": st.binary(max_size=200),
    "dict[str, Any]": st.dictionaries(TEXT, ANY_VALUE, max_size=6),
    "list[Any]": st.lists(ANY_VALUE, max_size=6),
    "int | None": st.none() | INT64,
    "list[str]": st.lists(TEXT, max_size=6),
    "dict[str, str]": st.dictionaries(TEXT, TEXT, max_size=6),
    "list[float]": st.lists(st.floats(-1e3, 1e3, allow_nan=False), max_size=10),
}

# An independent statement of "a decoded field has exactly its declared type".
FIELD_TYPE_OK: dict[str, Any] = {
    "int": lambda v: type(v) is int,
    "str": lambda v: type(v) is str,
    "bool": lambda v: type(v) is bool,
    "bytes": lambda v: type(v) is bytes,
    "dict[str, Any]": lambda v: type(v) is dict and all(type(k) is str for k in v),
    "list[Any]": lambda v: type(v) is list,
    "int | None": lambda v: v is None or type(v) is int,
    "list[str]": lambda v: type(v) is list and all(type(x) is str for x in v),
    "dict[str, str]": lambda v: (
        type(v) is dict and all(type(k) is str and type(x) is str for k, x in v.items())
    ),
    "list[float]": lambda v: type(v) is list and all(type(x) in (int, float) for x in v),
}

MESSAGE_TYPES = [wire.REGISTRY[i] for i in sorted(wire.REGISTRY)]


def field_types(cls: type[wire.Message]) -> list[str]:
    return [str(f.type) for f in dataclasses.fields(cls)]  # type: ignore[arg-type]


def _field_strategy(f: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    kind = str(f.type)
    if kind in ("int", "int | None"):  # within the range the field's name allows
        low, high = wire.INT_RANGES.get(f.name, wire.INT64)
        ints = st.integers(min_value=low, max_value=high)
        return ints if kind == "int" else st.none() | ints
    return FIELD_STRATEGIES[kind]


def message_strategy(cls: type[wire.Message]) -> st.SearchStrategy[wire.Message]:
    return st.builds(cls, *[_field_strategy(f)
                            for f in dataclasses.fields(cls)])  # type: ignore[arg-type]


RANGED = [(cls, i, f.name) for cls in MESSAGE_TYPES
          for i, f in enumerate(dataclasses.fields(cls))  # type: ignore[arg-type]
          if str(f.type) in ("int", "int | None")]


@pytest.mark.parametrize(("cls", "index", "name"), RANGED,
                         ids=[f"{c.__name__}.{n}" for c, _, n in RANGED])
def test_an_integer_out_of_its_range_is_a_malformed_message(
        cls: type[wire.Message], index: int, name: str) -> None:
    """A term, incarnation, version, size or offset near 2**64 is never taken in."""
    low, high = wire.INT_RANGES.get(name, wire.INT64)
    plain = {"str": "", "bool": False, "bytes": b"", "dict[str, Any]": {}, "list[Any]": [],
             "list[str]": [], "dict[str, str]": {}, "list[float]": []}
    row = [cls.TYPE_ID, [wire.INT_RANGES.get(f.name, (0, 0))[0] if "int" in str(f.type)
                         else plain[str(f.type)]
                         for f in dataclasses.fields(cls)]]  # type: ignore[arg-type]
    assert isinstance(wire.decode_message(row), cls)
    for bad in (high + 1, low - 1, 2**64 - 1, -(2**63)):
        if low <= bad <= high or not -(2**63) <= bad <= 2**64 - 1:
            continue  # in range, or more than msgpack can carry at all
        row[1][index] = bad
        with pytest.raises(wire.DecodeError, match="range"):
            wire.decode_message(row)


ANY_MESSAGE = st.one_of([message_strategy(cls) for cls in MESSAGE_TYPES])


def assert_well_typed(msg: wire.Message) -> None:
    assert type(msg) in MESSAGE_TYPES
    for f in dataclasses.fields(msg):  # type: ignore[arg-type]
        value = getattr(msg, f.name)
        assert FIELD_TYPE_OK[str(f.type)](value), (type(msg).__name__, f.name, value)


def body(msg: wire.Message) -> list[Any]:
    return [getattr(msg, f.name) for f in dataclasses.fields(msg)]  # type: ignore[arg-type]


def raw_packet(items: Any, version: int = wire.PROTOCOL_VERSION) -> bytes:
    """A packet whose msgpack body is whatever ``items`` is, valid or not."""
    return bytes([version]) + msgpack.packb(items, use_bin_type=True)


def raw_frame_body(item: Any, version: int = wire.PROTOCOL_VERSION) -> bytes:
    return bytes([version]) + msgpack.packb(item, use_bin_type=True)


# --- the registry ------------------------------------------------------------------------


def test_every_field_type_has_a_strategy_and_a_check() -> None:
    """A new field type in wire.py must be taught to these tests (and to the decoder)."""
    for cls in MESSAGE_TYPES:
        for t in field_types(cls):
            assert t in FIELD_STRATEGIES, (cls.__name__, t)
            assert t in wire._CHECKS, (cls.__name__, t)


def test_registry_ids_match_the_classes() -> None:
    for type_id, cls in wire.REGISTRY.items():
        assert type_id == cls.TYPE_ID
        assert dataclasses.is_dataclass(cls)
        assert len(cls._checks) == len(dataclasses.fields(cls))


def test_registered_type_ids_are_the_published_protocol() -> None:
    """Ids are part of the protocol: existing ones never move (append only)."""
    published = {
        1: "Ping",
        2: "IndirectPing",
        3: "Ack",
        4: "Nack",
        5: "Alive",
        6: "Suspect",
        7: "Dead",
        8: "Facts",
        32: "PushPull",
        33: "Submit",
        34: "Withdraw",
        35: "LeaseRequest",
        36: "LeaseReply",
        37: "Placed",
        38: "StartJob",
        39: "JobSync",
        40: "JobSyncReply",
        41: "Cancel",
        42: "Ok",
        43: "Error",
        44: "Preempt",
        45: "Release",
        46: "Hello",
        47: "FetchBundle",
        48: "BundleChunk",
        64: "FetchResults",
        65: "ResultsTaken",
    }
    for type_id, name in published.items():
        assert wire.REGISTRY[type_id].__name__ == name


def test_a_type_id_cannot_be_registered_twice() -> None:
    with pytest.raises(RuntimeError, match="used twice"):

        @wire.message(1)
        @dataclasses.dataclass(frozen=True, slots=True)
        class Clash(wire.Message):
            seq: int

    assert wire.REGISTRY[1] is wire.Ping


def test_messages_are_frozen() -> None:
    ping = wire.Ping(1, "b", "a", "a:1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ping.seq = 2  # type: ignore[misc]


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_message_type_round_trips(cls: type[wire.Message], data: st.DataObject) -> None:
    msg = data.draw(message_strategy(cls))
    packet = wire.encode_packet([msg])
    assert wire.decode_packet(packet) == [msg]
    frame = wire.encode_frame(msg)
    assert wire.frame_length(frame[:4]) == len(frame) - 4
    decoded = wire.decode_frame_body(frame[4:])
    assert decoded == msg
    assert type(decoded) is cls
    assert_well_typed(decoded)
    assert wire.decode_message(msgpack.unpackb(wire.encode_message(msg), raw=False)) == msg


@settings(max_examples=100, deadline=None)
@given(st.lists(ANY_MESSAGE, min_size=1, max_size=20))
def test_compound_packets_round_trip_in_order(msgs: list[wire.Message]) -> None:
    packet = wire.encode_packet(msgs)
    assert wire.decode_packet(packet) == msgs
    encoded = [wire.encode_message(m) for m in msgs]
    assert wire.encode_packet_raw(encoded) == packet
    assert len(packet) == wire.packet_overhead(len(msgs)) + sum(len(e) for e in encoded)


@pytest.mark.parametrize("count", [1, 2, 15, 16, 17, 255, 65535, 65536])
def test_packet_overhead_is_exact_at_array_header_boundaries(count: int) -> None:
    one = wire.encode_message(wire.Ack(7, "n"))
    packet = wire.encode_packet_raw([one] * count)
    assert len(packet) == wire.packet_overhead(count) + count * len(one)
    decoded = wire.decode_packet(packet)
    assert len(decoded) == count
    assert decoded[0] == decoded[-1] == wire.Ack(7, "n")


def test_packet_overhead_grows_only_at_header_boundaries() -> None:
    assert wire.packet_overhead(1) == wire.packet_overhead(15) == 2
    assert wire.packet_overhead(16) == wire.packet_overhead(65535) == 4
    assert wire.packet_overhead(65536) == 6


# --- version and budget ------------------------------------------------------------------


def test_every_packet_and_frame_starts_with_the_version() -> None:
    msg = wire.Alive("n1", "10.0.0.1:7946", 3)
    assert wire.encode_packet([msg])[0] == wire.PROTOCOL_VERSION
    frame = wire.encode_frame(msg)
    assert frame[4] == wire.PROTOCOL_VERSION
    assert wire.PROTOCOL_VERSION == 1


@pytest.mark.parametrize("version", [v for v in range(256) if v != wire.PROTOCOL_VERSION])
def test_any_other_version_is_refused(version: int) -> None:
    msg = wire.Ack(1, "a")
    packet = bytes([version]) + wire.encode_packet([msg])[1:]
    with pytest.raises(wire.DecodeError, match="version"):
        wire.decode_packet(packet)
    frame_body = bytes([version]) + wire.encode_frame(msg)[5:]
    with pytest.raises(wire.DecodeError, match="version"):
        wire.decode_frame_body(frame_body)


def test_udp_budget_fits_an_ethernet_mtu() -> None:
    assert wire.UDP_BUDGET == 1400
    assert wire.UDP_BUDGET <= 1500 - 20 - 8  # IPv4 + UDP headers


def test_a_full_membership_packet_fits_the_budget() -> None:
    """A probe carrying a realistic load of piggybacked updates stays within budget."""
    ping = wire.encode_message(
        wire.Ping(2**32, "node-" + "x" * 58, "node-" + "y" * 58, "[2001:db8::1]:7946")
    )
    updates = [
        wire.encode_message(wire.Suspect(f"node-{i:04d}", 2**31, "node-0001")) for i in range(200)
    ]
    chosen, used = [ping], len(ping) + wire.packet_overhead(64)
    for u in updates:  # greedy fill, as membership does
        if used + len(u) <= wire.UDP_BUDGET:
            chosen.append(u)
            used += len(u)
    packet = wire.encode_packet_raw(chosen)
    assert len(packet) <= wire.UDP_BUDGET
    assert len(chosen) > 20  # many updates share one datagram
    assert len(wire.decode_packet(packet)) == len(chosen)


# --- frames ------------------------------------------------------------------------------


def test_frame_header_is_big_endian_length_of_the_body() -> None:
    msg = wire.Error("no such job")
    frame = wire.encode_frame(msg)
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    assert wire.frame_length(frame[:4]) == n


@pytest.mark.parametrize("n", [1, 2, 1000, wire.MAX_FRAME - 1, wire.MAX_FRAME])
def test_frame_length_in_bounds(n: int) -> None:
    assert wire.frame_length(struct.pack(">I", n)) == n


@pytest.mark.parametrize("n", [0, wire.MAX_FRAME + 1, 2**31, 2**32 - 1])
def test_frame_length_out_of_bounds(n: int) -> None:
    with pytest.raises(wire.DecodeError, match="out of bounds"):
        wire.frame_length(struct.pack(">I", n))


@pytest.mark.parametrize("header", [b"", b"\x00", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"])
def test_frame_header_of_the_wrong_size(header: bytes) -> None:
    with pytest.raises(wire.DecodeError, match="short frame header"):
        wire.frame_length(header)


def test_a_frame_body_holds_exactly_one_message() -> None:
    packet = wire.encode_packet([wire.Ok("x")])
    with pytest.raises(wire.DecodeError):
        wire.decode_frame_body(packet)  # a packet is a list of messages, not a message


def test_a_large_pushpull_frame_round_trips() -> None:
    rows = [
        [f"n{i}", f"10.0.{i // 256}.{i % 256}:7946", i, "alive", i, i, {"gpu": [1] * 20}]
        for i in range(2000)
    ]
    msg = wire.PushPull(True, "n0", rows)
    frame = wire.encode_frame(msg)
    assert len(frame) > wire.UDP_BUDGET  # only frames may be this large
    n = wire.frame_length(frame[:4])
    assert wire.decode_frame_body(frame[4 : 4 + n]) == msg


# --- malformed input, one case at a time -------------------------------------------------


def test_empty_input() -> None:
    with pytest.raises(wire.DecodeError):
        wire.decode_packet(b"")
    with pytest.raises(wire.DecodeError):
        wire.decode_frame_body(b"")


def test_version_byte_alone() -> None:
    with pytest.raises(wire.DecodeError):
        wire.decode_packet(bytes([wire.PROTOCOL_VERSION]))
    with pytest.raises(wire.DecodeError):
        wire.decode_frame_body(bytes([wire.PROTOCOL_VERSION]))


@pytest.mark.parametrize(
    "items",
    [
        [],  # a packet must carry at least one message
        {"type": 1},
        "ping",
        7,
        None,
        [[3, [1, "a"]], "junk"],  # one bad message spoils the packet
    ],
    ids=repr,
)
def test_packet_that_is_not_a_list_of_messages(items: Any) -> None:
    with pytest.raises(wire.DecodeError):
        wire.decode_packet(raw_packet(items))


@pytest.mark.parametrize("type_id", [0, 9, 31, 59, 127, 1000, -1, 2**40])
def test_unknown_type_id(type_id: int) -> None:
    assert type_id not in wire.REGISTRY
    with pytest.raises(wire.DecodeError, match="unknown message type"):
        wire.decode_packet(raw_packet([[type_id, [1, "a"]]]))
    with pytest.raises(wire.DecodeError, match="unknown message type"):
        wire.decode_frame_body(raw_frame_body([type_id, []]))


@pytest.mark.parametrize(
    "item",
    [
        [3],  # no fields
        [3, [1, "a"], []],  # three parts
        [True, [1, "a"]],  # a bool is not a type id, though True == 1 == Ping
        [3.0, [1, "a"]],
        ["3", [1, "a"]],
        [None, [1, "a"]],
        [3, {"seq": 1, "source": "a"}],  # fields by name are not the format
        [3, "1a"],
        {"3": [1, "a"]},
    ],
    ids=repr,
)
def test_malformed_message_envelope(item: Any) -> None:
    with pytest.raises(wire.DecodeError):
        wire.decode_packet(raw_packet([item]))
    with pytest.raises(wire.DecodeError):
        wire.decode_frame_body(raw_frame_body(item))


@pytest.mark.parametrize(
    "item",
    [
        [1, [True, "b", "a", "a:1"]],  # bool where an int belongs
        [1, [1.0, "b", "a", "a:1"]],  # float where an int belongs
        [1, [None, "b", "a", "a:1"]],
        [1, ["1", "b", "a", "a:1"]],
        [1, [1, b"b", "a", "a:1"]],  # bytes where a str belongs
        [1, [1, "b", "a", 7]],
        [2, [1, "t", "t:1", "s", "s:1", 1]],  # int where a bool belongs
        [5, ["n", "n:1", -0.5]],
        [8, ["n", 0, 0, ["not", "a", "dict"]]],
        [32, [False, "n", {"not": "a list"}]],
        [38, ["j", "l", 1, "o", ["ok", 3], {}, 1, 1]],  # a non-str in list[str]
        [38, ["j", "l", 1, "o", ["ok"], {"K": 1}, 1, 1]],  # a non-str value in dict[str, str]
        [38, ["j", "l", 1, "o", "ls -l", {}, 1, 1]],  # a str is not a list of str
        [40, ["running", "", "0", b"", b"", False]],  # int | None
        [40, ["running", "", 0, "out", b"", False]],  # str where bytes belong
    ],
    ids=repr,
)
def test_wrong_field_type(item: Any) -> None:
    with pytest.raises(wire.DecodeError, match="wrong type"):
        wire.decode_packet(raw_packet([item]))
    with pytest.raises(wire.DecodeError, match="wrong type"):
        wire.decode_frame_body(raw_frame_body(item))


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_too_few_fields(cls: type[wire.Message]) -> None:
    example = _example(cls)
    fields = body(example)
    for n in range(cls._required):
        with pytest.raises(wire.DecodeError, match="fields, expected"):
            wire.decode_frame_body(raw_frame_body([cls.TYPE_ID, fields[:n]]))


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_fields_appended_later_may_be_left_out(cls: type[wire.Message]) -> None:
    """Backward compatibility: a peer one version behind sends none of the fields appended
    since (they all have defaults), and they decode to those defaults."""
    declared = dataclasses.fields(cls)
    assert all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in declared[cls._required:]), "a field without a default after one with"
    fields = body(_example(cls))[: cls._required]
    old = wire.decode_frame_body(raw_frame_body([cls.TYPE_ID, fields]))
    assert isinstance(old, cls)
    for f in declared[cls._required:]:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert getattr(old, f.name) == default


def test_the_fields_appended_for_several_devices() -> None:
    assert wire.Submit._required == 7 and wire.Submit("j", "o", 1000, 0, "gpu", 0, 0).count == 1
    assert wire.LeaseRequest("j", "o", "gpu0", 1000, 0, 1, "c").more == []
    placed = wire.Placed("j", "n", "gpu0", "n/1", 1, 1, ["gpu1", "gpu2"])
    assert wire.decode_frame_body(wire.encode_frame(placed)[wire.FRAME_HEADER.size:]) == placed


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_extra_appended_fields_are_ignored(cls: type[wire.Message]) -> None:
    """Forward compatibility: a newer peer may append fields an older one does not know."""
    example = _example(cls)
    extended = [*body(example), "from the future", {"x": [1, 2]}, None, 3.5]
    assert wire.decode_frame_body(raw_frame_body([cls.TYPE_ID, extended])) == example
    assert wire.decode_packet(raw_packet([[cls.TYPE_ID, extended]] * 2)) == [example] * 2


@pytest.mark.parametrize(
    "suffix", [b"\x00", b"\xc0", b"\x91\x03", b"\xff" * 10], ids=lambda s: s.hex()
)
def test_trailing_bytes_after_the_body(suffix: bytes) -> None:
    with pytest.raises(wire.DecodeError):
        wire.decode_packet(wire.encode_packet([wire.Ack(1, "a")]) + suffix)
    with pytest.raises(wire.DecodeError):
        wire.decode_frame_body(wire.encode_frame(wire.Ack(1, "a"))[4:] + suffix)


def test_invalid_utf8_in_a_str_field() -> None:
    bad_str = b"\xa2\xff\xfe"  # fixstr of two bytes that are not UTF-8
    data = bytes([wire.PROTOCOL_VERSION]) + b"\x91\x92\x03\x92\x01" + bad_str
    with pytest.raises(wire.DecodeError):
        wire.decode_packet(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x91" * 5000 + b"\x90",  # nested deeper than any decoder stack
        b"\xdd\xff\xff\xff\xff",  # an array that claims four billion items
        b"\xdb\xff\xff\xff\xff",  # a string that claims four gigabytes
        b"\xc1",  # the one byte msgpack never uses
        b"\x81\x90\x01",  # a map keyed by a list
        b"\x81\x01\x01",  # a map keyed by an int (strict map keys)
        b"\xd4\x00\x00",  # an ext type
    ],
    ids=lambda d: d[:6].hex(),
)
def test_hostile_msgpack(data: bytes) -> None:
    with pytest.raises(wire.DecodeError):
        wire.decode_packet(bytes([wire.PROTOCOL_VERSION]) + data)
    with pytest.raises(wire.DecodeError):
        wire.decode_frame_body(bytes([wire.PROTOCOL_VERSION]) + data)


def test_dict_str_any_field_with_bytes_keys_is_refused() -> None:
    item = [8, ["n1", 0, 1, {b"devices": 1}]]
    with pytest.raises(wire.DecodeError):
        wire.decode_frame_body(raw_frame_body(item))


# --- fuzzing: anything either decodes to well-typed messages or raises DecodeError --------


def _example(cls: type[wire.Message]) -> wire.Message:
    defaults = {
        "int": 5,
        "str": "s",
        "bool": True,
        "bytes": b"b",
        "dict[str, Any]": {"k": [1]},
        "list[Any]": [["n", "a", 1, "alive", 0, 0, {}]],
        "int | None": None,
        "list[str]": ["run", "-x"],
        "dict[str, str]": {"A": "b"},
        "list[float]": [0.5, -2, 1e-05],
    }
    return cls(*[defaults[t] for t in field_types(cls)])


def decode_packet_or_error(data: bytes) -> list[wire.Message] | None:
    try:
        msgs = wire.decode_packet(data)
    except wire.DecodeError:
        return None
    assert msgs
    for m in msgs:
        _assert_well_typed_except_dict_keys(m)
    return msgs


def decode_frame_or_error(data: bytes) -> wire.Message | None:
    try:
        msg = wire.decode_frame_body(data)
    except wire.DecodeError:
        return None
    _assert_well_typed_except_dict_keys(msg)
    return msg


def frame_length_or_error(header: bytes) -> int | None:
    try:
        n = wire.frame_length(header)
    except wire.DecodeError:
        return None
    assert 0 < n <= wire.MAX_FRAME
    return n


def _assert_well_typed_except_dict_keys(msg: wire.Message) -> None:
    # Keys of dict[str, Any] are checked at the top level only (values are Any);
    # everything else must have exactly its declared type.
    assert type(msg) in MESSAGE_TYPES
    for f in dataclasses.fields(msg):  # type: ignore[arg-type]
        value = getattr(msg, f.name)
        kind = str(f.type)
        if kind == "dict[str, Any]":
            assert type(value) is dict
        else:
            assert FIELD_TYPE_OK[kind](value), (type(msg).__name__, f.name, value)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    decode_packet_or_error(data)
    decode_frame_or_error(data)
    frame_length_or_error(data[:4])
    # the same bytes behind a valid version byte reach the msgpack layer
    decode_packet_or_error(bytes([wire.PROTOCOL_VERSION]) + data)
    decode_frame_or_error(bytes([wire.PROTOCOL_VERSION]) + data)


SMALL_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 2**33)
    | st.floats(allow_nan=False)
    | TEXT
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=4,
)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(wire.REGISTRY)) | st.integers(min_value=-5, max_value=50),
    st.lists(SMALL_VALUE, max_size=9),
)
def test_arbitrary_msgpack_values_as_fields(type_id: int, fields: list[Any]) -> None:
    """Well-formed msgpack with the wrong shape gets past the msgpack layer: still only
    DecodeError, and what does decode is well typed."""
    decode_frame_or_error(raw_frame_body([type_id, fields]))
    decode_packet_or_error(raw_packet([[type_id, fields]]))


_MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(0, 7)),
        st.tuples(st.just("set"), st.integers(min_value=0), st.integers(0, 255)),
        st.tuples(st.just("insert"), st.integers(min_value=0), st.binary(min_size=1, max_size=9)),
        st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(1, 9)),
        st.tuples(st.just("truncate"), st.integers(min_value=0), st.just(0)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, ops: list[tuple[str, int, Any]]) -> bytes:
    buf = bytearray(data)
    for op, pos, arg in ops:
        at = pos % (len(buf) + 1)
        if op == "flip" and buf:
            buf[at % len(buf)] ^= 1 << arg
        elif op == "set" and buf:
            buf[at % len(buf)] = arg
        elif op == "insert":
            buf[at:at] = arg
        elif op == "delete":
            del buf[at : at + arg]
        elif op == "truncate":
            del buf[at:]
    return bytes(buf)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ANY_MESSAGE, min_size=1, max_size=3), _MUTATIONS)
def test_mutated_packets_decode_or_raise_decode_error(
    msgs: list[wire.Message], ops: list[tuple[str, int, Any]]
) -> None:
    decode_packet_or_error(mutate(wire.encode_packet(msgs), ops))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_MESSAGE, _MUTATIONS)
def test_mutated_frames_decode_or_raise_decode_error(
    msg: wire.Message, ops: list[tuple[str, int, Any]]
) -> None:
    frame = mutate(wire.encode_frame(msg), ops)
    n = frame_length_or_error(frame[:4])
    decode_frame_or_error(frame[4:])
    if n is not None:
        decode_frame_or_error(frame[4 : 4 + n])


@settings(max_examples=100, deadline=None)
@given(ANY_MESSAGE, st.integers(min_value=0, max_value=10_000))
def test_every_strict_prefix_of_a_frame_body_is_refused(msg: wire.Message, cut: int) -> None:
    body_bytes = wire.encode_frame(msg)[4:]
    prefix = body_bytes[: cut % len(body_bytes)]
    with pytest.raises(wire.DecodeError):
        wire.decode_frame_body(prefix)


@settings(max_examples=100, deadline=None)
@given(st.lists(ANY_MESSAGE, min_size=1, max_size=3), st.integers(min_value=0))
def test_every_strict_prefix_of_a_packet_is_refused(msgs: list[wire.Message], cut: int) -> None:
    packet = wire.encode_packet(msgs)
    with pytest.raises(wire.DecodeError):
        wire.decode_packet(packet[: cut % len(packet)])
