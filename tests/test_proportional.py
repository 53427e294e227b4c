"""Nothing is leased at zero: a request that names only compute gets memory in proportion
to the device it lands on, and one that names only memory gets compute in proportion."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexmesh.agent.api import parse_submit
from flexmesh.agent.config import Settings
from flexmesh.agent.devices.base import Device, DeviceSample
from flexmesh.agent.node import Node, NodeConfig
from flexmesh.agent.runtime.sampling import Sampler
from flexmesh.agent.scheduler import Proposal, Scheduler
from flexmesh.policies import DEFAULT_POLICY, Candidate, Request, get_policy, get_spec
from flexmesh.policies.proportional import Sizes, fill, sized
from flexmesh.protocol import wire
from flexmesh.protocol.lease import Refusal


def gpu(node: str, dev: str, model: str, mib: int, free_mib: int | None = None) -> Candidate:
    free = mib if free_mib is None else free_mib
    return Candidate(node, dev, "gpu", model, 1000, mib, 1000, free)


def test_fill_takes_the_devices_share() -> None:
    assert fill(250, 0, 1000, 16384) == (250, 4096)
    assert fill(1000, 0, 1000, 81559) == (1000, 81559)
    assert fill(0, 20480, 1000, 81920) == (250, 20480)
    assert fill(0, 1, 1000, 81920) == (1, 1)  # never zero compute
    assert fill(0, 90000, 1000, 81920) is None  # more than the device has
    assert fill(300, 2048, 1000, 16384) == (300, 2048)  # both named: as asked


@given(st.integers(1, 1000), st.integers(1, 1 << 20))
def test_a_filled_share_is_never_zero_and_never_below_proportion(c: int, cap: int) -> None:
    compute, memory = fill(c, 0, 1000, cap) or (0, 0)
    assert compute == c and memory * 1000 >= c * cap and memory >= 1
    back = fill(0, memory, 1000, cap)
    assert back is not None and back[0] >= c  # rounding up, never down


def test_sized_tries_each_model_smallest_first() -> None:
    sizes = [("gpu", "A100-80", 1000, 81920), ("gpu", "T4", 1000, 15360),
             ("npu", "910B", 1000, 65536)]
    reqs = sized(Request(500, 0, "gpu"), sizes)
    assert [(r.models, r.memory_mib) for r in reqs] == [(("T4",), 7680),
                                                       (("A100-80",), 40960)]
    assert [r.compute_milli for r in sized(Request(0, 20480, "any"), sizes)] == [313, 250]
    assert sized(Request(500, 2048, "gpu"), sizes) == [Request(500, 2048, "gpu")]


def test_the_coordinator_leases_memory_in_proportion_on_mixed_models() -> None:
    s = Scheduler(get_policy(DEFAULT_POLICY), spec=get_spec(DEFAULT_POLICY))
    # The small GPU has too little memory free for half of it: the big one is used.
    view = [gpu("a", "gpu0", "T4", 16384, free_mib=4096), gpu("b", "gpu0", "A100", 81920)]
    s.enqueue(wire.Submit("j1", "desk", 500, 0, "gpu", 0, 0, 1), 0.0)
    (p,) = [p for p in s.propose(view, 0.0) if isinstance(p, Proposal)]
    assert (p.placement.node, p.request.compute_milli, p.request.memory_mib) == ("b", 500, 40960)
    s.enqueue(wire.Submit("j2", "desk", 0, 2048, "gpu", 0, 0, 1), 0.0)
    (q,) = [p for p in s.propose(view, 1.0) if isinstance(p, Proposal)]
    assert (q.placement.node, q.request.compute_milli, q.request.memory_mib) == ("a", 125, 2048)


def test_the_size_index_follows_the_view() -> None:
    sizes = Sizes()
    sizes.set("a", [gpu("a", "gpu0", "T4", 16384), gpu("a", "gpu1", "T4", 16384)])
    sizes.set("b", [gpu("b", "gpu0", "T4", 16384)])
    assert list(sizes) == [("gpu", "T4", 1000, 16384)]
    sizes.set("a", [])
    assert list(sizes) == [("gpu", "T4", 1000, 16384)]  # b still has one
    sizes.set("b", [])
    assert list(sizes) == []


def _owner(now: float = 0.0) -> Node:
    node = Node(NodeConfig(name="o", addr="127.0.0.1:1"), random.Random(1), now)
    node.set_devices([Device("gpu0", "gpu", "T4", 16384, "sim")],
                     {"gpu0": (1000, 16384)}, now)
    return node


def test_an_owner_fills_a_zero_from_an_older_coordinator() -> None:
    node = _owner()
    lease = node.owner.lease("j", ("gpu0",), 250, 0, 1, "c", "desk", 0, False, 0.0)
    assert not isinstance(lease, Refusal)
    assert (lease.compute_milli, lease.memory_mib) == (250, 4096)
    lease = node.owner.lease("k", ("gpu0",), 0, 8192, 1, "c", "desk", 0, False, 0.0)
    assert not isinstance(lease, Refusal)
    assert (lease.compute_milli, lease.memory_mib) == (500, 8192)


@pytest.mark.parametrize(("body", "compute", "memory"), [
    ({}, 1000, 0),  # a whole device, with all its memory once placed
    ({"memory_mib": 4096}, 0, 4096),  # compute in proportion
    ({"gpu": 0.25}, 250, 0),  # memory in proportion
    ({"gpu": 0.25, "memory_mib": 1024}, 250, 1024),
])
def test_the_api_leaves_the_unnamed_dimension_to_proportion(body: dict[str, object],
                                                            compute: int, memory: int) -> None:
    fields = parse_submit({"command": ["true"], **body})
    assert (fields["compute_milli"], fields["memory_mib"]) == (compute, memory)


class _Recorder:
    def __init__(self) -> None:
        self.lent: list[dict[str, tuple[int, int]]] = []
        self.enforcement = "none"

    def set_devices(self, devices: list[Device], lend: dict[str, tuple[int, int]],
                    now: float) -> None:
        self.lent.append(dict(lend))


class _FlakyBackend:
    """A backend whose first reading fails, then reads 6 GiB used by a foreign process."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    def discover(self) -> list[Device]:
        return [Device("gpu0", "gpu", "T4", 16384, "sim")]

    def sample(self, pids: frozenset[int]) -> list[DeviceSample]:
        self.calls += 1
        if self.calls == 1:
            raise OSError("not ready")
        return [DeviceSample("gpu0", True, foreign_memory_mib=6144)]


def test_a_device_is_offered_only_once_it_was_measured(tmp_path: Path) -> None:
    async def scenario() -> list[dict[str, tuple[int, int]]]:
        node = _Recorder()
        runner = SimpleNamespace(running=lambda: {})
        agent = SimpleNamespace(settings=Settings(state_dir=str(tmp_path)), node=node,
                                loop=asyncio.get_running_loop(),
                                processes=SimpleNamespace(runner=runner))
        sampler = Sampler(agent)  # type: ignore[arg-type]
        backend = _FlakyBackend()
        sampler.backends = [backend]  # type: ignore[list-item]
        sampler.devices = backend.discover()
        sampler.apply(await sampler.sample())  # the first reading failed
        sampler.apply(await sampler.sample())
        return node.lent

    first, second = asyncio.run(scenario())
    assert first == {"gpu0": (0, 0)}  # unmeasured: nothing offered
    assert second["gpu0"][1] <= 16384 - 6144  # the foreign process's memory is not offered
