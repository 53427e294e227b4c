"""Frames on the wire between agents: sealed for their receiver under the cluster keyring
(or plain, without one), and the error for bytes that are not a frame of this protocol."""

from __future__ import annotations

import time
from collections.abc import Callable

from flexmesh.protocol import wire
from flexmesh.protocol.crypto import CryptoError, Sealer


class RemoteError(Exception):
    """The peer sent bytes that are not a valid frame; ``reason`` is for counters."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


# Requests that may be sealed for no node: a push-pull to a seed, whose name is not known.
UNBOUND_OK = (wire.PushPull, wire.Hello)


class Codec:
    """Frames on the wire, sealed under the cluster keyring when there is one. A request
    is sealed for the node it goes to (its name bound with the cluster's), so one captured
    on its way to a node does not open at another; ``me`` is this node's name. Push-pulls
    (``UNBOUND_OK``) and replies are sealed for no node."""

    def __init__(self, sealer: Sealer | None = None, cluster: bytes = b"",
                 now: Callable[[], float] = time.time, me: str = "",
                 aes: bool = False) -> None:
        self.sealer = sealer
        self.cluster = cluster
        self.now = now
        self.me = me
        self.aes = aes and sealer is not None  # bulk frames may go under AES-256-GCM

    def _aad(self, node: str) -> bytes:
        return self.cluster + b"\0" + node.encode() if node else self.cluster

    def encode(self, msg: wire.Message, to: str = "", bulk: bool = False) -> bytes | bytearray:
        """A frame of ``msg``; ``bulk``: for a caller that said it opens the bulk cipher
        (sealed with it where this node has AES instructions: ``aes``)."""
        body = bytes([wire.PROTOCOL_VERSION]) + wire.encode_message(msg)  # (one copy, not 3)
        if self.sealer is None:
            return wire.FRAME_HEADER.pack(len(body)) + body
        n = wire.FRAME_HEADER.size  # sealed after the frame's length: no copy of the frame
        frame = self.sealer.seal_after(n, body, self._aad(to), self.now(),
                                       bulk=bulk and self.aes)
        wire.FRAME_HEADER.pack_into(frame, 0, len(frame) - n)
        return frame

    def decode(self, body: bytes | bytearray | memoryview, request: bool = True,
               bulk: bool = False) -> wire.Message:
        """A frame's message; a request must be sealed for this node (or be one of
        ``UNBOUND_OK``), a reply is sealed for none; ``bulk``: a stream's reply, which
        may be sealed with the bulk cipher."""
        unbound = not (request and self.me)
        if self.sealer is not None:
            try:
                body, unbound = self._open(body, unbound, bulk)
            except CryptoError as exc:
                raise RemoteError(f"frame dropped: {exc.reason}", exc.reason) from None
        elif body[:1] != bytes([wire.PROTOCOL_VERSION]):
            raise RemoteError("a sealed frame, and this agent has no key", "no_key")
        try:
            msg = wire.decode_frame_body(body)
        except wire.DecodeError as exc:
            raise RemoteError(str(exc), "malformed") from None
        if request and self.sealer is not None and self.me and unbound \
                and not isinstance(msg, UNBOUND_OK):
            raise RemoteError(f"a {type(msg).__name__} sealed for another node (replayed "
                              "or misdirected)", "misdirected")
        return msg

    def _open(self, body: bytes | bytearray | memoryview, unbound: bool,
              bulk: bool) -> tuple[bytes, bool]:
        """(the plaintext, whether it was sealed for no node in particular)."""
        assert self.sealer is not None
        if not unbound:
            try:
                return self.sealer.open(body, self._aad(self.me), self.now(),
                                        bulk=bulk), False
            except CryptoError as exc:
                if exc.reason != "tampered":
                    raise
                # Sealed for no node, or for another one (then this fails "tampered" too).
        return self.sealer.open(body, self._aad(""), self.now(), bulk=bulk), True


PLAIN = Codec()
