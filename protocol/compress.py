"""Compression of the bulk bytes some replies carry: bundle and results chunks, job output.

Theory of operation
-------------------
A caller that can inflate says so in its request (``accept = "zlib"``); the answerer
compresses the reply's bulk fields only for such a caller, and only where that saves (the
compressed bytes at most ``KEEP`` of the raw ones: an archive of random or already
compressed data goes as it is), and says so in the reply (``encoding = "zlib"``). Both
fields were appended to their messages, so an absent one reads "": a peer one version
behind neither asks for nor sends compressed bytes, and mixed versions keep working,
uncompressed. Whatever is checked on the bytes (a bundle's SHA-256, output offsets) is
checked after inflating, on the bytes as they were.

Inflating never goes past the limit the caller sets (the chunk it asked for): a stream
that would is a bomb, and like a corrupt one it raises ``InflateError`` before more than
``limit + 1`` bytes were made.

Two rules for this file: it does no I/O, and every reply it cannot inflate raises
``InflateError`` and nothing else.
"""

from __future__ import annotations

import dataclasses
import zlib

from flexmesh.protocol import wire

ZLIB = "zlib"
AES = "aes-gcm"  # not an encoding: the caller opens frames sealed with AES-256-GCM (crypto.py)
LEVEL = 1  # zlib's fastest: most of the gain on text, a fraction of the CPU of level 6
KEEP = 0.9  # compressed bytes are sent only if at most this share of the raw ones
MIN_SIZE = 512  # bytes: below this a reply goes as it is (no gain worth the CPU)
SAMPLE = 16 * 1024  # bytes of a large field tried first (see ``_may_save``)

# Replies with bulk bytes, and the fields that hold them (each has an ``encoding`` field).
BULK: dict[type[wire.Message], tuple[str, ...]] = {
    wire.BundleChunk: ("data",),
    wire.JobSyncReply: ("stdout", "stderr"),
}
# Requests whose caller may say what it accepts (each has an ``accept`` field).
ASKS: tuple[type[wire.Message], ...] = (wire.FetchBundle, wire.FetchResults, wire.JobSync)


class InflateError(Exception):
    """A reply's compressed bytes cannot be taken; ``reason`` ("bomb", "corrupt",
    "encoding") is for counters."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def offer(request: wire.Message, what: str = ZLIB) -> wire.Message:
    """``request``, saying that this caller takes ``what`` (zlib: it can inflate; ``AES``:
    it opens bulk frames sealed with AES-256-GCM) where its type may say so."""
    if not isinstance(request, ASKS) or accepts(request, what):
        return request
    said = str(getattr(request, "accept", ""))
    return dataclasses.replace(request,  # type: ignore[type-var]
                               accept=f"{said},{what}" if said else what)


def accepts(request: wire.Message, what: str = ZLIB) -> bool:
    return what in str(getattr(request, "accept", "")).split(",")


def is_bulk(msg: wire.Message) -> bool:
    return type(msg) in BULK


def raw_size(reply: wire.Message) -> int:
    """Bytes of bulk data ``reply`` carries (as they are, or as compressed)."""
    return sum(len(getattr(reply, f)) for f in BULK.get(type(reply), ()))


def deflate_reply(reply: wire.Message, level: int = LEVEL, keep: float = KEEP) -> wire.Message:
    """``reply`` with its bulk fields compressed, if it has any and that saves; else
    ``reply`` itself. The caller checked that the request ``accepts``."""
    names = BULK.get(type(reply))
    encoded: str = getattr(reply, "encoding", "")
    if names is None or encoded or raw_size(reply) < MIN_SIZE:
        return reply
    if not any(_may_save(getattr(reply, f), level, keep) for f in names):
        return reply  # (random or already compressed bytes: not worth the whole)
    packed = {f: zlib.compress(getattr(reply, f), level) if getattr(reply, f) else b""
              for f in names}
    if sum(len(v) for v in packed.values()) > keep * raw_size(reply):
        return reply
    return dataclasses.replace(reply, encoding=ZLIB, **packed)  # type: ignore[type-var]


def _may_save(data: bytes, level: int, keep: float) -> bool:
    """Whether compressing ``data`` may save: for a large field, judged on a sample from
    its middle first, so an incompressible chunk (most of a workdir of data) costs a
    sample's deflate, not a whole megabyte's."""
    if len(data) <= 4 * SAMPLE:
        return bool(data)
    middle = len(data) // 2
    sample = data[middle - SAMPLE // 2:middle + SAMPLE // 2]
    return len(zlib.compress(sample, level)) <= keep * len(sample)


def inflate(data: bytes, limit: int) -> bytes:
    """One zlib stream, at most ``limit`` bytes once inflated; InflateError otherwise."""
    if not data:
        return b""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise InflateError(f"compressed bytes that do not inflate: {exc}", "corrupt") from None
    if len(out) > limit:
        raise InflateError(f"{len(data)} compressed bytes inflate past the {limit} asked "
                           "for", "bomb")
    if not d.eof or d.unused_data:
        raise InflateError("a compressed stream cut short or with bytes after its end",
                           "corrupt")
    return out


def inflate_reply(reply: wire.Message, limit: int) -> wire.Message:
    """``reply`` with its bulk fields as they were before compression (each at most
    ``limit`` bytes); ``reply`` itself if they were not compressed."""
    encoding = getattr(reply, "encoding", "") if is_bulk(reply) else ""
    if not encoding:
        return reply
    if encoding != ZLIB:
        raise InflateError(f"unknown encoding {encoding[:40]!r}", "encoding")
    plain = {f: inflate(getattr(reply, f), limit) for f in BULK[type(reply)]}
    return dataclasses.replace(reply, encoding="", **plain)  # type: ignore[type-var]
