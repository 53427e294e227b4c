"""review38: repros for the commits e0155bd..main (restart requeue, member wait, partials).

1. A run whose process was spawned but whose supervisor record was not yet written (the
   agent killed between the supervisor's fork of the command and ``record_pid``) is found
   by nothing at restart; it is journaled PLACED with no pid, so it is now handed back
   ``preempted`` and placed again while the first process still runs.
2. A MemberEvent that comes in a turn whose effects are all "inline" (a datagram) is logged
   by ``Agent._kick_now`` without ``members_changed``: a fetch waiting for its origin in
   ``member_addr`` is not woken and waits out all of MEMBER_WAIT.
3. A fetch resuming a partial unwritten for over an hour: an eviction elsewhere (another
   bundle's fetch ending) drops the partial the fetch has open; the fetch then fails at
   its rename, having downloaded the whole bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flexmesh.agent import jobspawn, supervise
from flexmesh.agent.bundle import sha256_file
from flexmesh.agent.bundlecache import PARTIAL_MAX_AGE, BundleCache
from flexmesh.agent.bundlefetch import Want, fetch, read_chunk
from flexmesh.agent.devices.base import Device
from flexmesh.agent.models import PREEMPTED, RunRecord
from flexmesh.agent.node import Node, NodeConfig
from flexmesh.agent.runtime.agent import Agent
from flexmesh.agent.runtime.processes import Processes
from flexmesh.agent.runtime.transport import Transport
from flexmesh.protocol import wire
from flexmesh.protocol.membership import MemberEvent


class _Killed(BaseException):
    """The agent dies here (SIGKILL): nothing after this point of spawn runs."""


def test_a_run_spawned_but_not_recorded_is_not_placed_again(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    job_dir = tmp_path / "j1"
    job_dir.mkdir()
    lease = "lease-1"

    def killed(*_a: Any, **_k: Any) -> None:
        raise _Killed

    monkeypatch.setattr(supervise, "record_pid", killed)
    marker = tmp_path / "ran"
    with pytest.raises(_Killed):
        jobspawn.spawn("j1", job_dir, ["sh", "-c", f"echo x >> {marker}; sleep 30"], {},
                       None, run=lease)
    try:
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists()  # the job's command runs
        # What adopt consults after a restart (the journal: PLACED, pid None).
        run = RunRecord("j1", "origin", ["sh"], 100, 1024, lease_id=lease)
        fake = SimpleNamespace(runner=SimpleNamespace(job_dir=lambda _id: job_dir))
        adopted = Processes.adopt(fake, run)  # type: ignore[arg-type]
        node = Node(NodeConfig("owner", "127.0.0.1:7946"), random.Random(1), 0.0)
        node.set_devices([Device("gpu0", "gpu", "sim", 16384, "sim")], {}, 0.0)
        node.owner.recover_run(run, adopted, 1.0)
        # A live process of this run exists: it must not be handed back to run again.
        assert run.state != PREEMPTED, (adopted, run.state, run.reason)
    finally:
        _kill_group_of(job_dir)


def _kill_group_of(job_dir: Path) -> None:
    """End the spawned supervisor's session (it leads its process group)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(job_dir.parent).encode() in cmd and b"sleep 30" in cmd:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(int(pid)), signal.SIGKILL)


def test_a_member_event_in_an_inline_turn_wakes_a_fetch_waiting_for_it() -> None:
    async def main() -> None:
        members: dict[str, Any] = {}
        event = MemberEvent("origin", "alive", None, "127.0.0.1:1")
        node = SimpleNamespace(membership=SimpleNamespace(members=members, left=False),
                               drain=lambda: [event])
        agent = SimpleNamespace(node=node, _kicked=False,
                                ticker=SimpleNamespace(retime=lambda: None),
                                spawn=lambda coro: asyncio.ensure_future(coro))
        transport = Transport.__new__(Transport)
        transport.agent, transport.loop = agent, asyncio.get_running_loop()  # type: ignore[assignment]
        transport._members_changed = asyncio.Event()
        agent.transport = transport
        waiter = asyncio.ensure_future(transport.member_addr("origin", 30.0))
        await asyncio.sleep(0)  # (it waits on the event now)
        members["origin"] = SimpleNamespace(addr="127.0.0.1:1")  # a gossip datagram
        Agent._kick_now(agent)  # type: ignore[arg-type]
        # Woken by the event at once, not after the 30 s wait.
        assert await asyncio.wait_for(waiter, 2.0) == "127.0.0.1:1"

    asyncio.run(main())


def test_an_eviction_does_not_drop_the_partial_a_fetch_resumes(tmp_path: Path) -> None:
    src = tmp_path / "origin.tar"
    src.write_bytes(os.urandom(64_000))
    sha = sha256_file(src)
    cache = BundleCache(tmp_path / "store", 1 << 30)
    cache.load()
    partial = cache.partial(sha)
    partial.write_bytes(src.read_bytes()[:20_000])  # a fetch given up long ago
    old = time.time() - PARTIAL_MAX_AGE - 60
    os.utime(partial, (old, old))
    dropped: list[str] = []

    async def call(msg: wire.Message) -> tuple[wire.Message | None, str]:
        assert isinstance(msg, wire.FetchBundle)
        if not dropped:  # another bundle's fetch ends meanwhile: Payload._evict
            dropped.extend(cache.drop_stale_partials() or ["(none)"])
        data, total = read_chunk(src, msg.offset, msg.length)
        return wire.BundleChunk(msg.bundle, msg.offset, data, total), ""

    got = asyncio.run(fetch(call, Want(sha, 64_000, "j1"), partial, cache.path(sha),
                            chunk=4000, pause=0))
    assert got.resumed_at == 20_000
    assert sha256_file(cache.path(sha)) == sha, dropped
