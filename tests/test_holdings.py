"""Placement prefers a node that holds what a job needs (its working directory's bundle, its
image), as its gossiped digest says, but never at the cost of fragmentation beyond the
bounded bonus."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

import pytest

from flexmesh.agent.node.holdings import (
    IMAGE_BYTES,
    HeldIndex,
    Holdings,
    bundle_key,
    image_key,
    image_refs,
    normalize_image,
)
from flexmesh.agent.scheduler import Proposal, Scheduler
from flexmesh.policies import DEFAULT_POLICY, Candidate, get_policy, get_spec
from flexmesh.policies.spec import CACHE_BONUS
from flexmesh.protocol import facts, wire
from flexmesh.protocol.membership import ALIVE, DEAD, Member

SHA = "ab" * 32
MIB = 2**20


@pytest.mark.parametrize(("ref", "full"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("me/app", "docker.io/me/app:latest"),
    ("quay.io/me/app:v2", "quay.io/me/app:v2"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/app", "localhost:5000/app:latest"),
    ("reg.example:5000/a/b:t", "reg.example:5000/a/b:t"),
    ("busybox@sha256:" + "0" * 64, "docker.io/library/busybox@sha256:" + "0" * 64),
    (" busybox ", "docker.io/library/busybox:latest"),
])
def test_image_references_are_normalised_as_podman_and_docker_list_them(ref: str,
                                                                         full: str) -> None:
    assert normalize_image(ref) == full
    assert image_key(ref) == image_key(full)
    assert len(image_key(ref)) == facts.HELD_KEY_BYTES


def test_keys_tell_images_and_bundles_apart() -> None:
    assert image_key("busybox:1") != image_key("busybox:2")
    assert bundle_key(SHA) == bytes.fromhex(SHA[:16])
    assert bundle_key("not hex at all") == b""
    listing = "docker.io/library/busybox:latest\n<none>:<none>\n\nquay.io/x:1\nquay.io/x:1\n"
    assert image_refs(listing) == ["docker.io/library/busybox:latest", "quay.io/x:1"]


def test_the_digest_alternates_bundles_and_images_bounded_and_says_what_is_news() -> None:
    h = Holdings()
    shas = [hashlib.sha256(bytes([i])).hexdigest() for i in range(40)]
    assert h.set_bundles(shas) is True
    assert h.set_bundles(shas) is False  # the same: no news to gossip
    assert h.set_images(["busybox", "alpine"]) is True
    d = h.digest()
    assert len(d) == facts.MAX_HELD
    assert d[:4] == (bundle_key(shas[0]), image_key("busybox"), bundle_key(shas[1]),
                     image_key("alpine"))
    assert h.set_bundles(shas[1:]) is True  # another order is news (the oldest go first)


# --- the coordinator's index of who holds what -------------------------------------------


def _node(members: dict[str, Member]) -> Any:
    decoded = {name: facts.decode(m.facts) for name, m in members.items()}
    return SimpleNamespace(membership=SimpleNamespace(members=members),
                           facts_of=lambda m: decoded[m.name])


def _member(name: str, held: list[bytes], state: str = ALIVE,
            confirmed: bool = True) -> Member:
    data = facts.NodeFacts(held=tuple(held)).encode()
    return Member(name, "addr", state=state, facts=data, confirmed=confirmed)


def test_the_index_gives_the_bytes_each_live_holder_saves() -> None:
    members = {
        "a": _member("a", [bundle_key(SHA)]),
        "b": _member("b", [bundle_key(SHA), image_key("busybox")]),
        "c": _member("c", [image_key("docker.io/library/busybox:latest")]),
        "dead": _member("dead", [bundle_key(SHA)], state=DEAD),
        "new": _member("new", [bundle_key(SHA)], confirmed=False),
    }
    index = HeldIndex(_node(members))
    plain = wire.Submit("j", "desk", 500, 0, "gpu", 0, 0)
    assert index(plain) is None  # needs nothing: the index is not even built
    job = wire.Submit("j", "desk", 500, 0, "gpu", 0, 0, bundle=SHA, bundle_size=100 * MIB,
                      image="busybox")
    assert index(job) == {"a": 100 * MIB, "b": 100 * MIB + IMAGE_BYTES, "c": IMAGE_BYTES}


def test_submit_carries_what_the_job_needs_and_old_peers_still_decode() -> None:
    job = wire.Submit("j", "desk", 500, 0, "gpu", 0, 0, bundle=SHA, bundle_size=7,
                      image="busybox")
    assert wire.decode_packet(wire.encode_packet([job])) == [job]
    old = wire.Submit("j", "desk", 500, 0, "gpu", 0, 0)
    assert wire.decode_packet(wire.encode_packet([old]))[0].bundle == ""  # type: ignore[attr-defined]


# --- the scheduler with a holder in view ---------------------------------------------------


def _gpu(node: str, free: int = 1000) -> Candidate:
    return Candidate(node, "gpu0", "gpu", "sim-gpu", 1000, 16384, free, 16384)


def _place(view: list[Candidate], saved: dict[str, int] | None,
           weights: dict[str, float] | None = None, compute: int = 500) -> str:
    spec = get_spec(DEFAULT_POLICY, weights)
    s = Scheduler(get_policy(DEFAULT_POLICY), spec=spec)
    if saved is not None:
        s.saved_for = lambda submit: saved if submit.bundle else None
    s.enqueue(wire.Submit("j", "desk", compute, 1024, "gpu", 0, 0, bundle=SHA,
                          bundle_size=100 * MIB), 0.0)
    (prop,) = [p for p in s.propose(view, 0.0) if isinstance(p, Proposal)]
    return prop.placement.node


def test_among_equally_good_nodes_the_holder_is_chosen() -> None:
    view = [_gpu(n) for n in "abcdefgh"]
    alone = _place(view, None)
    holder = "h" if alone != "h" else "a"
    assert _place(view, {holder: 100 * MIB}) == holder
    assert _place(view, {holder: 100 * MIB}, {"cache": 0.0}) == alone  # the bonus did it


def test_a_holder_is_not_chosen_where_it_would_fragment_more_than_the_bonus_is_worth() -> None:
    # 700 milli fit "a"'s GPU exactly; on the holder they would leave 300 that no request
    # of the mix (700 each) can use: 0.3 GPUs of fragmentation, far beyond the bonus.
    view = [_gpu("a", free=700), _gpu("holder")]
    assert _place(view, None, compute=700) == "a"
    assert _place(view, {"holder": 2**40}, compute=700) == "a"  # a terabyte is not worth it
    assert CACHE_BONUS < 0.3
    # with a bonus beyond the bound the holder would have been taken: the bound decides
    assert _place(view, {"holder": 2**40}, {"cache": 1.0}, compute=700) == "holder"


def test_between_nodes_that_fragment_alike_the_holder_wins_over_packing() -> None:
    # 500 milli leave 500 on the holder, which the mix (500 each) can still use: no more
    # fragmentation there, only idle compute (the packing tie-breaker, 0.005 here).
    view = [_gpu("a", free=500), _gpu("holder")]
    assert _place(view, None) == "a"
    assert _place(view, {"holder": 2**30}) == "holder"
