"""What a node holds that a job may need (working-directory bundles, container images),
as the bounded digest its facts carry, and what the coordinator reads back from everyone's.

The runtime keeps a ``Holdings`` (``set_bundles`` from the bundle store, ``set_images``
from the container runtime's image list, each most recently used first) and, when one
says its digest changed, sets it as the node's ``held`` and has the node publish its facts.
The digest keys are hash prefixes (``facts.HELD_KEY_BYTES`` bytes): a bundle's SHA-256
itself, an image's reference hashed once normalised (``busybox`` and
``docker.io/library/busybox:latest`` are one image). The digest alternates bundles and
images so that trimming it (``facts.fit``) keeps some of each.

The coordinator builds a ``HeldIndex`` per scheduling round from the members' facts (only
when a request in the round carries a bundle or an image): per request, the bytes each
holder would not fetch. A bundle counts its size; an image, whose size the coordinator does
not know, ``IMAGE_BYTES``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flexmesh.protocol import facts, wire
from flexmesh.protocol.membership import ALIVE

if TYPE_CHECKING:
    from flexmesh.agent.node.core import Node

IMAGE_BYTES = 2**30  # what an image held is taken to save (its size is not gossiped)
_DEFAULT_REGISTRY = "docker.io"


def bundle_key(sha: str) -> bytes:
    """A bundle's key: the first bytes of its SHA-256 (b"" if ``sha`` is not hex)."""
    try:
        return bytes.fromhex(sha[:2 * facts.HELD_KEY_BYTES])
    except ValueError:
        return b""


def normalize_image(ref: str) -> str:
    """An image reference in full: registry, path and tag (``:latest`` when it names
    none), as podman and docker list it."""
    ref = ref.strip()
    name, at, digest = ref.partition("@")
    first, slash, rest = name.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        rest = name if "/" in name else f"library/{name}"
        first = _DEFAULT_REGISTRY
    if not at and ":" not in rest.rsplit("/", 1)[-1]:
        rest += ":latest"
    return f"{first}/{rest}{at}{digest}"


def image_refs(listing: str) -> list[str]:
    """The references in ``podman images --format '{{.Repository}}:{{.Tag}}'`` output (or
    docker's), in its order; untagged images (``<none>``) are left out."""
    out = []
    for line in listing.splitlines():
        ref = line.strip()
        if ref and "<none>" not in ref and len(ref) <= 512 and ref not in out:
            out.append(ref)
    return out


def image_key(ref: str) -> bytes:
    digest = hashlib.sha256(b"image\0" + normalize_image(ref).encode()).digest()
    return digest[:facts.HELD_KEY_BYTES]


class Holdings:
    """This node's side: what it holds, as the digest its facts carry."""

    def __init__(self) -> None:
        self._bundles: tuple[bytes, ...] = ()
        self._images: tuple[bytes, ...] = ()

    def digest(self) -> tuple[bytes, ...]:
        out: list[bytes] = []
        for pair in itertools.zip_longest(self._bundles, self._images):
            out.extend(k for k in pair if k and k not in out)
        return tuple(out[:facts.MAX_HELD])

    def set_bundles(self, shas: Sequence[str]) -> bool:
        """The bundles in the store, most recently used first; whether that is news."""
        keys = tuple(k for k in (bundle_key(s) for s in shas[:facts.MAX_HELD]) if k)
        changed, self._bundles = keys != self._bundles, keys
        return changed

    def set_images(self, refs: Sequence[str]) -> bool:
        """The images the container runtime holds, most recently used first; whether
        that is news."""
        keys = tuple(image_key(r) for r in refs[:facts.MAX_HELD] if r.strip())
        changed, self._images = keys != self._images, keys
        return changed


class HeldIndex:
    """The coordinator's side, for one scheduling round: key -> nodes that hold it."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._index: dict[bytes, list[str]] | None = None

    def __call__(self, submit: wire.Submit) -> dict[str, int] | None:
        """Node -> bytes it would not fetch for ``submit``; None if it needs nothing."""
        if not submit.bundle and not submit.image:
            return None
        index = self._build() if self._index is None else self._index
        saved: dict[str, int] = {}
        if submit.bundle:
            for name in index.get(bundle_key(submit.bundle), ()):
                saved[name] = max(submit.bundle_size, 1)
        if submit.image:
            for name in index.get(image_key(submit.image), ()):
                saved[name] = saved.get(name, 0) + IMAGE_BYTES
        return saved

    def _build(self) -> dict[bytes, list[str]]:
        index: dict[bytes, list[str]] = {}
        for m in self.node.membership.members.values():
            if m.state == ALIVE and m.confirmed:
                for key in self.node.facts_of(m).held:
                    index.setdefault(key, []).append(m.name)
        self._index = index
        return index
