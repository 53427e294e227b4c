"""Authenticated encryption of every packet and frame: keyring, sealing, replay window.

Theory of operation
-------------------
A cluster shares a ``Keyring``: the first (primary) key seals, every key opens. To rotate
a key on a running mesh, add the new key on every node, then promote it on every node,
then remove the old one; no packet is lost at any step, because every node can open what
any other node seals.

The AEAD is ChaCha20-Poly1305 (RFC 8439) with 32-byte keys. It was chosen over AES-GCM
because flexmesh also runs on drones' companion computers, ARM boards that often lack AES
instructions (the Raspberry Pi 4, for one): there ChaCha20 is several times faster than
AES and constant-time in software, and on x86 servers it is fast enough. One key length
also means one thing for ``flexmesh keygen`` to print and for an operator to check.

A sealed packet (all integers big-endian)::

    offset  size  field
    0       1     SEAL_VERSION (0x81): the high bit set, so a sealed packet is never
                  mistaken for a plaintext wire packet, whose first byte is a small version
    1       4     key id: the first 4 bytes of SHA-256(key), the key's fingerprint
    5       12    nonce: 6-byte sender timestamp (Unix ms), 2-byte counter, 4-byte salt
    17      n     ciphertext (n = len(plaintext))
    17+n    16    Poly1305 tag

``OVERHEAD`` is those 33 bytes. The AEAD authenticates the 17-byte header followed by the
caller's associated data (the cluster name), so a packet from another cluster, or one with
its version, key id or timestamp changed, does not open.

Bulk frames (the chunks of a streamed bundle or results archive, ``wire.FetchBundle``)
may instead be sealed with AES-256-GCM under a subkey derived from the key (HKDF-SHA256,
info ``BULK_INFO``), first byte ``SEAL_BULK`` (0x82), the same layout otherwise (GCM's tag
is 16 bytes too). The answerer does so only where the caller said it opens that, which it
says only on a CPU with AES instructions, and only on one of its own: there AES-GCM costs
about a third of ChaCha20-Poly1305 per byte (0.11 against 0.30 ms per MiB on the
development VM's Xeon), and a large transfer spends most of its CPU on copies and these.
The sealer's one nonce sequence serves both, so no nonce repeats under either key. A
receiver opens the bulk cipher only in a stream's replies (``open(bulk=True)``): were a
nonce ever repeated, GCM would give away its hash key, and nothing but bulk data should
then be forgeable.

Nonces never repeat under a key: each ``Sealer`` picks a random 4-byte salt once, and its
8-byte (timestamp << 16 | counter) sequence strictly increases, even if the wall clock
steps back. Two senders collide only if their salts match *and* they seal the same
sequence number.

The receiver runs a ``ReplayWindow`` over the authenticated nonces: a nonce seen before is
"replayed"; a timestamp more than ``max_age_s`` old is "stale" and more than
``max_future_s`` ahead is "future". Nodes therefore need wall clocks synchronised (NTP or
similar) to well within ``max_age_s`` (60 s by default, configurable), and ``now`` passed
here must be wall-clock seconds since the Unix epoch (``time.time()``), not a monotonic
loop clock.

Two rules for this file: it does no I/O and reads no clock (``now`` comes in), and any
bytes handed to ``Sealer.open`` either open or raise ``CryptoError`` with a ``reason``
from ``REASONS``, nothing else. The one source of randomness is an injected
``random_bytes(n)`` callable, ``os.urandom`` by default: keys and salts must come from the
operating system's CSPRNG, never from a seeded ``random.Random``; tests inject their own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flexmesh.protocol.replay import ReplayWindow as ReplayWindow
from flexmesh.protocol.replay import wall_ms
from flexmesh.protocol.wire import MAX_FRAME

RandomBytes = Callable[[int], bytes]

KEY_SIZE = 32
SEAL_VERSION = 0x81
SEAL_BULK = 0x82  # the same layout, sealed with the key's AES-256-GCM subkey
BULK_INFO = b"flexmesh bulk AES-256-GCM v1"  # HKDF info of that subkey
KEY_ID_SIZE = 4
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = 1 + KEY_ID_SIZE + NONCE_SIZE
OVERHEAD = HEADER_SIZE + TAG_SIZE  # 33 bytes added to every sealed packet
_SALT_SIZE = 4

# Every reason a packet can be dropped for; the runtime counts drops by these codes.
REASONS = (
    "truncated",  # shorter than OVERHEAD
    "oversized",  # longer than the limit (on seal: the plaintext would not fit)
    "version",  # first byte is not SEAL_VERSION (a plaintext or future-format packet)
    "unknown_key",  # sealed under a key not in this keyring (wrong or removed key)
    "tampered",  # authentication failed: changed bytes, wrong cluster name, cut short
    "stale",  # timestamp older than max_age_s, or below the window's eviction floor
    "future",  # timestamp more than max_future_s ahead of our clock
    "replayed",  # this nonce was opened before
)


class CryptoError(Exception):
    """A packet that cannot be sealed or opened; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class KeyringError(ValueError):
    """A key or keyring operation an operator asked for that cannot be done."""


# --- keys ---------------------------------------------------------------------------------


def generate_key(random_bytes: RandomBytes = os.urandom) -> str:
    """A new random 32-byte key as base64 text: what ``flexmesh keygen`` prints."""
    key = random_bytes(KEY_SIZE)
    if len(key) != KEY_SIZE:
        raise ValueError(f"random_bytes({KEY_SIZE}) returned {len(key)} bytes")
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str) -> bytes:
    """The 32 key bytes in base64 ``text``; ``KeyringError`` (a ValueError) if it is not one."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError("key is not valid base64; make one with `flexmesh keygen`") from None
    if len(key) != KEY_SIZE:
        raise KeyringError(
            f"key must be {KEY_SIZE} bytes (ChaCha20-Poly1305), got {len(key)}; "
            "make one with `flexmesh keygen`"
        )
    return key


def fingerprint(key: bytes) -> str:
    """8 hex digits naming a key without revealing it; also its key id on the wire."""
    return _key_id(key).hex()


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:KEY_ID_SIZE]


def _as_key(key: bytes | str) -> bytes:
    if isinstance(key, str):
        return decode_key(key)
    if len(key) != KEY_SIZE:
        raise KeyringError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
    return bytes(key)


@dataclass
class _Entry:
    key_id: bytes
    key: bytes
    aead: ChaCha20Poly1305
    _bulk: AESGCM | None = None

    def bulk(self) -> AESGCM:
        """The AES-256-GCM subkey's AEAD, derived at first use."""
        if self._bulk is None:
            self._bulk = AESGCM(HKDF(hashes.SHA256(), KEY_SIZE, None, BULK_INFO).derive(self.key))
        return self._bulk


class Keyring:
    """The cluster's keys, primary first: the primary seals, every key opens.

    Keys are named by key material (bytes, or base64 text) or, in ``promote`` and
    ``remove``, by fingerprint, so an operator never has to paste a secret to retire it.
    ``repr`` and ``keys`` show fingerprints only; ``to_list`` is the one way key material
    leaves, for a file only the agent can read.
    """

    def __init__(self, keys: Iterable[bytes | str] = ()) -> None:
        self._entries: list[_Entry] = []
        for key in keys:
            self.add(key)

    @classmethod
    def from_list(cls, texts: Iterable[str]) -> Keyring:
        """The keyring persisted by ``to_list``: base64 keys, primary first."""
        return cls(texts)

    def to_list(self) -> list[str]:
        """Base64 keys, primary first. This is key material: store it 0600."""
        return [base64.b64encode(e.key).decode("ascii") for e in self._entries]

    @property
    def keys(self) -> tuple[str, ...]:
        """Fingerprints of the keys, primary first."""
        return tuple(e.key_id.hex() for e in self._entries)

    @property
    def primary(self) -> str | None:
        """Fingerprint of the key that seals, or None for an empty keyring."""
        return self._entries[0].key_id.hex() if self._entries else None

    def add(self, key: bytes | str) -> bool:
        """Add a key that opens (the primary too if the ring was empty). False if present."""
        raw = _as_key(key)
        key_id = _key_id(raw)
        for e in self._entries:
            if e.key == raw:
                return False
            if e.key_id == key_id:
                raise KeyringError(f"key fingerprint {key_id.hex()} collides with another key")
        self._entries.append(_Entry(key_id, raw, ChaCha20Poly1305(raw)))
        return True

    def promote(self, key: bytes | str) -> None:
        """Make a key already in the ring the primary, the one that seals."""
        entry = self._find(key)
        self._entries.remove(entry)
        self._entries.insert(0, entry)

    def remove(self, key: bytes | str) -> None:
        """Remove a key; packets sealed with it stop opening. The primary cannot go."""
        entry = self._find(key)
        if entry is self._entries[0]:
            raise KeyringError(
                f"key {entry.key_id.hex()} is the primary; promote another key first"
            )
        self._entries.remove(entry)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes | str):
            return False
        try:
            self._find(key)
        except KeyringError:
            return False
        return True

    def __repr__(self) -> str:
        return f"Keyring({list(self.keys)!r})"

    def _find(self, key: bytes | str) -> _Entry:
        if isinstance(key, str) and len(key) == 2 * KEY_ID_SIZE:
            name = key.lower()
            for e in self._entries:
                if e.key_id.hex() == name:
                    return e
            raise KeyringError(f"no key with fingerprint {name} in the keyring")
        raw = _as_key(key)
        for e in self._entries:
            if e.key == raw:
                return e
        raise KeyringError(f"key {fingerprint(raw)} is not in the keyring")

    def _primary(self) -> _Entry | None:
        return self._entries[0] if self._entries else None

    def _lookup(self, key_id: bytes) -> _Entry | None:
        for e in self._entries:
            if e.key_id == key_id:
                return e
        return None


# --- replay window ------------------------------------------------------------------------


# --- sealing ------------------------------------------------------------------------------


class Sealer:
    """Seals outgoing packets under the keyring's primary and opens incoming ones.

    One per agent, shared by UDP and TCP, so the nonce sequence and the replay window
    cover both. The keyring is held by reference: keys added, promoted or removed take
    effect on the next packet. ``max_packet`` bounds a sealed packet (TCP frames); pass
    ``limit`` per call for a tighter bound (a UDP datagram).
    """

    def __init__(
        self,
        keyring: Keyring,
        *,
        window: ReplayWindow | None = None,
        random_bytes: RandomBytes = os.urandom,
        max_packet: int = MAX_FRAME,
    ) -> None:
        if not len(keyring):
            raise KeyringError("the keyring is empty; add a key (`flexmesh keygen`)")
        salt = random_bytes(_SALT_SIZE)
        if len(salt) != _SALT_SIZE:
            raise ValueError(f"random_bytes({_SALT_SIZE}) returned {len(salt)} bytes")
        self.keyring = keyring
        self.window = ReplayWindow() if window is None else window
        self.max_packet = max_packet
        self._salt = salt
        self._seq = -1  # (timestamp_ms << 16 | counter) of the last packet sealed

    def seal(self, plaintext: bytes, aad: bytes, now: float, *, limit: int | None = None) -> bytes:
        """``plaintext`` sealed under the primary key, binding ``aad`` (the cluster name)."""
        aead, nonce, header = self._next(len(plaintext), now, limit)
        return header + aead.encrypt(nonce, plaintext, header + aad)

    def seal_after(self, reserve: int, plaintext: bytes, aad: bytes, now: float, *,
                   limit: int | None = None, bulk: bool = False) -> bytearray:
        """As ``seal``, into one new buffer that starts with ``reserve`` bytes left for the
        caller (a frame's length): a large frame is sealed without copies of it. ``bulk``:
        under the key's AES-256-GCM subkey (``SEAL_BULK``), for a receiver that said it
        opens that (see the top)."""
        aead, nonce, header = self._next(len(plaintext), now, limit, bulk)
        into = getattr(aead, "encrypt_into", None)  # (cryptography 47 and later)
        if into is None:
            return bytearray(reserve) + header + aead.encrypt(nonce, plaintext, header + aad)
        out = bytearray(reserve + HEADER_SIZE + len(plaintext) + TAG_SIZE)
        out[reserve:reserve + HEADER_SIZE] = header
        into(nonce, plaintext, header + aad, memoryview(out)[reserve + HEADER_SIZE:])
        return out

    def _next(self, size: int, now: float, limit: int | None,
              bulk: bool = False) -> tuple[ChaCha20Poly1305 | AESGCM, bytes, bytes]:
        """(the primary key's AEAD, the next nonce, the sealed header) for ``size`` bytes."""
        if size + OVERHEAD > (self.max_packet if limit is None else limit):
            raise CryptoError("oversized", f"{size} bytes + {OVERHEAD} overhead")
        entry = self.keyring._primary()
        if entry is None:
            raise KeyringError("the keyring is empty; add a key (`flexmesh keygen`)")
        self._seq = max(wall_ms(now) << 16, self._seq + 1)
        nonce = self._seq.to_bytes(8, "big") + self._salt
        if bulk:
            return entry.bulk(), nonce, bytes([SEAL_BULK]) + entry.key_id + nonce
        return entry.aead, nonce, bytes([SEAL_VERSION]) + entry.key_id + nonce

    def open(self, packet: bytes | bytearray | memoryview, aad: bytes, now: float, *,
             limit: int | None = None, bulk: bool = False) -> bytes:
        """The plaintext of a sealed ``packet``, or ``CryptoError`` saying why it was dropped.

        A large frame may come in a ``bytearray``; its ciphertext is read in place. Only
        with ``bulk`` (a stream's reply) may it be sealed with the bulk cipher: the AES
        subkey opens nothing else, a request or a datagram least of all."""
        if len(packet) > (self.max_packet if limit is None else limit):
            raise CryptoError("oversized", f"{len(packet)} bytes")
        if len(packet) < OVERHEAD:
            raise CryptoError("truncated", f"{len(packet)} bytes")
        if packet[0] != SEAL_VERSION and not (bulk and packet[0] == SEAL_BULK):
            raise CryptoError("version", f"first byte {packet[0]:#04x}")
        header = bytes(packet[:HEADER_SIZE])
        entry = self.keyring._lookup(header[1:5])
        if entry is None:
            raise CryptoError("unknown_key", header[1:5].hex())
        nonce = header[5:]
        aead = entry.aead if header[0] == SEAL_VERSION else entry.bulk()
        try:
            plaintext = aead.decrypt(nonce, memoryview(packet)[HEADER_SIZE:], header + aad)
        except InvalidTag:
            raise CryptoError("tampered") from None
        reason = self.window.admit(nonce, int.from_bytes(nonce[:6], "big"), now)
        if reason is not None:
            raise CryptoError(reason)
        return plaintext
