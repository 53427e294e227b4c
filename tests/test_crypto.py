"""Sealing, the keyring and the replay window: round trips, rotation, and hostile input.

The contract under test (issue 3, item 4): every packet is sealed under the keyring's
primary key and opens under any key in the ring, the cluster name is bound, and anything
that is not a fresh packet of this cluster raises ``crypto.CryptoError`` with a reason
code and nothing else.
"""

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmesh.protocol import crypto
from flexmesh.protocol.crypto import CryptoError, Keyring, ReplayWindow, Sealer

CLUSTER = b"flexmesh-test"
T0 = 1_700_000_000.0  # wall-clock seconds; any recent time will do


def _key(n: int) -> bytes:
    return bytes([n]) * crypto.KEY_SIZE


def _rng_bytes(seed: int) -> crypto.RandomBytes:
    rng = random.Random(seed)
    return rng.randbytes


def _pair(*keys: bytes) -> tuple[Sealer, Sealer]:
    """A sender and a receiver, each with its own copy of the same keyring."""
    return Sealer(Keyring(keys)), Sealer(Keyring(keys))


def _reason(sealer: Sealer, packet: bytes, now: float = T0, aad: bytes = CLUSTER) -> str:
    with pytest.raises(CryptoError) as info:
        sealer.open(packet, aad, now)
    assert info.value.reason in crypto.REASONS
    return info.value.reason


# --- keys ---------------------------------------------------------------------------------


def test_generate_key_is_32_random_bytes_in_base64() -> None:
    text = crypto.generate_key()
    assert len(crypto.decode_key(text)) == 32
    assert crypto.generate_key() != text
    fixed = crypto.generate_key(lambda n: b"\x07" * n)
    assert crypto.decode_key(fixed) == b"\x07" * 32


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "32 bytes"),
        ("!!!not base64!!!", "base64"),
        ("héllo", "base64"),
        (base64.b64encode(b"x" * 16).decode(), "got 16"),
        (base64.b64encode(b"x" * 33).decode(), "got 33"),
        (base64.b64encode(b"x" * 32).decode()[:-2], "base64"),
    ],
)
def test_decode_key_errors_are_clear_value_errors(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as info:
        crypto.decode_key(text)
    assert "keygen" in str(info.value)


def test_decode_key_accepts_surrounding_whitespace() -> None:
    assert crypto.decode_key(" " + base64.b64encode(_key(1)).decode() + "\n") == _key(1)


# --- keyring ------------------------------------------------------------------------------


def test_keyring_lists_fingerprints_primary_first_and_never_key_material() -> None:
    ring = Keyring([_key(1), base64.b64encode(_key(2)).decode()])
    assert ring.keys == (crypto.fingerprint(_key(1)), crypto.fingerprint(_key(2)))
    assert all(len(f) == 8 and int(f, 16) >= 0 for f in ring.keys)
    assert ring.primary == ring.keys[0]
    shown = repr(ring) + str(ring.keys)
    for key in (_key(1), _key(2)):
        assert base64.b64encode(key).decode() not in shown
        assert key.hex() not in shown


def test_keyring_persists_in_order() -> None:
    ring = Keyring([_key(1), _key(2), _key(3)])
    ring.promote(_key(3))
    again = Keyring.from_list(ring.to_list())
    assert again.keys == ring.keys
    assert again.to_list() == ring.to_list()
    assert Keyring.from_list([]).keys == ()


def test_keyring_add_promote_remove() -> None:
    ring = Keyring()
    assert ring.primary is None
    assert ring.add(_key(1)) is True
    assert ring.add(_key(1)) is False  # idempotent
    ring.add(_key(2))
    assert ring.primary == crypto.fingerprint(_key(1))
    ring.promote(crypto.fingerprint(_key(2)))  # by fingerprint
    assert ring.primary == crypto.fingerprint(_key(2))
    ring.remove(base64.b64encode(_key(1)).decode())  # by base64
    assert ring.keys == (crypto.fingerprint(_key(2)),)
    assert _key(2) in ring and _key(1) not in ring and 5 not in ring


def test_keyring_errors_are_clear() -> None:
    ring = Keyring([_key(1), _key(2)])
    with pytest.raises(crypto.KeyringError, match="primary"):
        ring.remove(_key(1))
    with pytest.raises(crypto.KeyringError, match="not in the keyring"):
        ring.remove(_key(3))
    with pytest.raises(crypto.KeyringError, match="not in the keyring"):
        ring.promote(_key(3))
    with pytest.raises(crypto.KeyringError, match="no key with fingerprint"):
        ring.remove("deadbeef")
    with pytest.raises(ValueError, match="32 bytes"):
        ring.add(b"short")
    with pytest.raises(ValueError, match="base64"):
        Keyring.from_list(["not a key"])
    with pytest.raises(crypto.KeyringError, match="empty"):
        Sealer(Keyring())


# --- sealing ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100, 1400 - crypto.OVERHEAD])
def test_round_trip_adds_fixed_overhead(size: int) -> None:
    a, b = _pair(_key(1))
    plaintext = random.Random(size).randbytes(size)
    packet = a.seal(plaintext, CLUSTER, T0)
    assert len(packet) == size + crypto.OVERHEAD == size + 33
    assert packet[0] == crypto.SEAL_VERSION
    assert packet[1:5].hex() == crypto.fingerprint(_key(1))
    assert plaintext not in packet or size < 4
    assert b.open(packet, CLUSTER, T0 + 0.5) == plaintext


def test_nonces_never_repeat_even_when_the_clock_steps_back() -> None:
    a = Sealer(Keyring([_key(1)]))
    nonces = [a.seal(b"x", CLUSTER, now)[5:17] for now in [T0] * 70_000 + [T0 - 5.0] * 10]
    assert len(set(nonces)) == len(nonces)
    b = Sealer(Keyring([_key(1)]))
    assert a.seal(b"x", CLUSTER, T0)[13:17] != b.seal(b"x", CLUSTER, T0)[13:17]  # salts


def test_injected_randomness_makes_sealing_deterministic() -> None:
    ring = Keyring([_key(1)])
    one = Sealer(ring, random_bytes=_rng_bytes(7)).seal(b"hello", CLUSTER, T0)
    two = Sealer(ring, random_bytes=_rng_bytes(7)).seal(b"hello", CLUSTER, T0)
    assert one == two


def test_first_key_seals_every_key_opens() -> None:
    ring = Keyring([_key(1), _key(2), _key(3)])
    receiver = Sealer(ring)
    for n in (1, 2, 3):
        sender = Sealer(Keyring([_key(n)]))
        packet = sender.seal(b"hi", CLUSTER, T0)
        assert receiver.open(packet, CLUSTER, T0) == b"hi"
    assert Sealer(ring).seal(b"hi", CLUSTER, T0)[1:5].hex() == crypto.fingerprint(_key(1))


def test_rotation_on_a_running_pair_loses_no_packet() -> None:
    a, b = _pair(_key(1))
    now = T0
    sent = 0

    def exchange() -> None:
        nonlocal now, sent
        for src, dst in ((a, b), (b, a)):
            for _ in range(3):
                now += 0.01
                sent += 1
                msg = sent.to_bytes(4, "big")
                in_flight = src.seal(msg, CLUSTER, now)
                assert dst.open(in_flight, CLUSTER, now + 0.2) == msg

    exchange()
    b.keyring.add(_key(2))  # receivers first ...
    exchange()
    a.keyring.add(_key(2))
    exchange()
    late = a.seal(b"sealed under the old key", CLUSTER, now)
    a.keyring.promote(_key(2))  # ... then the senders switch ...
    exchange()
    b.keyring.promote(_key(2))
    exchange()
    assert b.open(late, CLUSTER, now) == b"sealed under the old key"
    assert b.seal(b"new", CLUSTER, now)[1:5].hex() == crypto.fingerprint(_key(2))
    stale_key = Sealer(Keyring([_key(1)])).seal(b"x", CLUSTER, now)
    a.keyring.remove(_key(1))  # ... then the old key goes
    b.keyring.remove(_key(1))
    exchange()
    assert _reason(b, stale_key, now) == "unknown_key"


def test_wrong_key_wrong_cluster_and_plaintext_are_refused() -> None:
    a, b = _pair(_key(1))
    packet = a.seal(b"secret", CLUSTER, T0)
    assert _reason(Sealer(Keyring([_key(9)])), packet) == "unknown_key"
    assert _reason(b, packet, aad=b"other-cluster") == "tampered"
    assert _reason(b, b"\x01" + bytes(40)) == "version"  # a plaintext wire packet
    assert b.open(packet, CLUSTER, T0) == b"secret"  # the failures did not burn the nonce


def test_every_tampered_byte_is_refused_with_the_right_reason() -> None:
    a, b = _pair(_key(1))
    packet = a.seal(b"tamper with me, if you can", CLUSTER, T0)
    for i in range(len(packet)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(packet)
            bad[i] ^= flip
            expected = "version" if i == 0 else "unknown_key" if i < 5 else "tampered"
            assert _reason(b, bytes(bad)) == expected, (i, flip)
    assert b.open(packet, CLUSTER, T0) == b"tamper with me, if you can"


def test_truncated_and_extended_packets_are_refused() -> None:
    a, b = _pair(_key(1))
    packet = a.seal(b"0123456789", CLUSTER, T0)
    for n in range(len(packet)):
        expected = "truncated" if n < crypto.OVERHEAD else "tampered"
        assert _reason(b, packet[:n]) == expected, n
    assert _reason(b, packet + b"\x00") == "tampered"


def test_oversized_packets_are_refused_on_both_sides() -> None:
    a = Sealer(Keyring([_key(1)]), max_packet=200)
    with pytest.raises(CryptoError) as info:
        a.seal(bytes(200 - crypto.OVERHEAD + 1), CLUSTER, T0)
    assert info.value.reason == "oversized"
    fits = a.seal(bytes(200 - crypto.OVERHEAD), CLUSTER, T0)
    assert len(fits) == 200
    assert _reason(a, fits + b"x") == "oversized"
    with pytest.raises(CryptoError, match="oversized"):
        a.seal(bytes(100), CLUSTER, T0, limit=100)
    assert _reason_limit(a, fits, 199) == "oversized"


def _reason_limit(sealer: Sealer, packet: bytes, limit: int) -> str:
    with pytest.raises(CryptoError) as info:
        sealer.open(packet, CLUSTER, T0, limit=limit)
    return info.value.reason


def test_replayed_stale_and_future_packets_are_refused() -> None:
    a = Sealer(Keyring([_key(1)]))
    b = Sealer(Keyring([_key(1)]), window=ReplayWindow(max_age_s=30.0, max_future_s=5.0))
    packet = a.seal(b"once", CLUSTER, T0)
    assert b.open(packet, CLUSTER, T0 + 1.0) == b"once"
    assert _reason(b, packet, T0 + 1.0) == "replayed"
    assert _reason(b, packet, T0 + 29.0) == "replayed"
    assert _reason(b, packet, T0 + 31.0) == "stale"
    assert _reason(b, a.seal(b"old", CLUSTER, T0), T0 + 30.5) == "stale"
    assert _reason(b, a.seal(b"ahead", CLUSTER, T0 + 10.0), T0 + 2.0) == "future"
    assert b.open(a.seal(b"skewed", CLUSTER, T0 + 34.0), CLUSTER, T0 + 30.0) == b"skewed"


# --- hostile input ------------------------------------------------------------------------

_RING = Keyring([_key(1), _key(2)])
_KNOWN_PREFIX = bytes([crypto.SEAL_VERSION]) + bytes.fromhex(crypto.fingerprint(_key(1)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500), st.binary(max_size=40))
def test_any_bytes_raise_only_crypto_error(data: bytes, aad: bytes) -> None:
    receiver = Sealer(_RING, max_packet=1400)
    for packet in (data, bytes([crypto.SEAL_VERSION]) + data, _KNOWN_PREFIX + data):
        with pytest.raises(CryptoError) as info:
            receiver.open(packet, aad, T0)
        assert info.value.reason in crypto.REASONS


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
    st.integers(-40, 40),
    st.floats(-100.0, 100.0),
)
def test_mutated_packets_open_only_when_unchanged(
    plaintext: bytes, edits: list[tuple[int, int]], cut: int, skew: float
) -> None:
    sender, receiver = Sealer(_RING, random_bytes=_rng_bytes(1)), Sealer(_RING)
    packet = bytearray(sender.seal(plaintext, CLUSTER, T0))
    for pos, value in edits:
        if pos < len(packet):
            packet[pos] = value
    if cut < 0:
        del packet[cut:]
    else:
        packet += bytes(cut)
    mutated = bytes(packet)
    try:
        opened = receiver.open(mutated, CLUSTER, T0 + skew)
    except CryptoError as e:
        assert e.reason in crypto.REASONS
    else:
        assert opened == plaintext and abs(skew) <= 60.0


# --- replay window ------------------------------------------------------------------------


def test_window_rejects_repeats_old_and_future() -> None:
    w = ReplayWindow(max_age_s=10.0, max_future_s=2.0)
    now_ms = int(T0 * 1000)
    assert w.check_and_remember(b"a", now_ms, T0)
    assert not w.check_and_remember(b"a", now_ms, T0 + 1)
    assert w.admit(b"a", now_ms, T0 + 1) == "replayed"
    assert w.admit(b"b", now_ms - 10_001, T0) == "stale"
    assert w.admit(b"c", now_ms + 2_001, T0) == "future"
    assert w.admit(b"d", now_ms + 2_000, T0) is None
    assert w.admit(b"a", now_ms, T0 + 11) == "stale"  # aged out, refused by age


def test_window_memory_is_bounded_by_age() -> None:
    w = ReplayWindow(max_age_s=1.0)
    peak = 0
    for i in range(100_000):  # 1,000 packets a second for 100 seconds
        now = T0 + i / 1000
        assert w.check_and_remember(i.to_bytes(8, "big"), int(now * 1000), now)
        peak = max(peak, len(w))
    assert peak <= 1_002


@pytest.mark.parametrize("shuffled", [False, True])
def test_window_memory_is_capped_and_evicted_nonces_stay_refused(shuffled: bool) -> None:
    w = ReplayWindow(max_age_s=60.0, max_entries=1_000)
    now_ms = int(T0 * 1000)
    order = list(range(100_000))
    if shuffled:
        random.Random(3).shuffle(order)
    refused: set[int] = set()
    for i in order:  # 100,000 packets in one burst, all within max_age
        reason = w.admit(i.to_bytes(8, "big"), now_ms - 50_000 + i // 2, T0)
        assert len(w) <= 1_000
        if reason is not None:
            assert reason == "stale"  # the cap raised the floor past a late packet
            refused.add(i)
    assert len(w) == 1_000
    assert bool(refused) == shuffled  # in order, every packet gets in
    for i in order:  # nothing accepted can be replayed, evicted or not
        assert w.admit(i.to_bytes(8, "big"), now_ms - 50_000 + i // 2, T0) in (
            "stale",
            "replayed",
        )


def test_window_survives_a_clock_that_steps_back() -> None:
    w = ReplayWindow(max_age_s=1.0)
    ts = int(T0 * 1000)
    assert w.check_and_remember(b"n", ts, T0)
    assert w.check_and_remember(b"m", ts + 5_000, T0 + 5)  # evicts "n" by age
    assert not w.check_and_remember(b"n", ts, T0 + 0.5)  # clock went back: still refused


def test_window_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(max_age_s=0)
    with pytest.raises(ValueError):
        ReplayWindow(max_entries=0)
    with pytest.raises(ValueError, match="wall-clock"):
        ReplayWindow().admit(b"x", 0, float("nan"))
