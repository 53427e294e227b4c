"""The asyncio adapter around a sans-IO ``Node``: its life cycle and the effect pump.

The runtime owns every piece of I/O. It feeds the node what arrives (datagrams, calls,
call results, process exits, device readings, time) and carries out the effects the node
returns, in order: journal writes are awaited before anything that depends on them is
sent, so a job is on disk before its submitter hears it was accepted. The pieces live
beside this file: ``transport`` (UDP and TCP, sealed), ``keys``, ``sampling`` (devices,
watchdog), ``processes`` (a job's environment, user, process and output), ``commit``
(grouped journal writes, retried) and ``statedir`` (its lock, the journal's marker).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, assert_never

from flexmesh.agent.config import Settings
from flexmesh.agent.devices.base import DeviceSample
from flexmesh.agent.metrics import decision_times
from flexmesh.agent.models import JobRecord
from flexmesh.agent.node import (
    ArchiveOutput,
    Call,
    CollectResults,
    Effect,
    ForgetJob,
    ForgetLease,
    ForgetRun,
    JobOutput,
    LogEvent,
    Node,
    NodeConfig,
    PersistJob,
    PersistLease,
    PersistRun,
    RunJob,
    StopJob,
)
from flexmesh.agent.node.config import DEAD_GRACE
from flexmesh.agent.rpc import Replies
from flexmesh.agent.runtime import statedir
from flexmesh.agent.runtime.commit import GroupCommit, Persist, describe, journal
from flexmesh.agent.runtime.eventlog import log_event
from flexmesh.agent.runtime.keys import Keys, KeysError
from flexmesh.agent.runtime.payload import Payload
from flexmesh.agent.runtime.processes import Processes
from flexmesh.agent.runtime.results import Results
from flexmesh.agent.runtime.sampling import Sampler
from flexmesh.agent.runtime.ticker import Ticker
from flexmesh.agent.runtime.transport import Transport
from flexmesh.agent.store import AsyncJournal
from flexmesh.policies import get_policy, get_spec
from flexmesh.protocol import wire
from flexmesh.protocol.lease import Lease
from flexmesh.protocol.membership import (
    PRESETS,
    FactsEvent,
    MemberEvent,
    NameConflict,
    SendPacket,
    StartPushPull,
)

log = logging.getLogger("flexmesh.agent")



class StartError(Exception):
    """The agent cannot start as configured; the message says why, in one line."""


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.loop = asyncio.get_running_loop()
        self.node: Node = None  # type: ignore[assignment]  # set in start()
        self.journal: AsyncJournal = None  # type: ignore[assignment]
        self.commits: GroupCommit = None  # type: ignore[assignment]
        self.keys = Keys(settings, self.state_dir)
        self.transport = Transport(self)
        self.sampler = Sampler(self)
        self.processes = Processes(self)
        self.payload = Payload(self)
        self.results = Results(self)
        self.addr = ""
        self.started_at = time.time()
        self.ui_url = ""
        self.stopping = False
        self.counters: dict[str, int] = {}
        self.ticker = Ticker(self)
        self._kicked = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._job_events: dict[str, asyncio.Event] = {}
        self._lock: int | None = None  # the state dir's lock, held while running

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    @property
    def enforcement(self) -> str:
        return self.sampler.enforcement

    @property
    def last_samples(self) -> dict[str, DeviceSample]:
        return self.sampler.last_samples

    # --- configuration and keys ---------------------------------------------------------

    def reconfigure(self, new: Settings) -> None:
        """Apply a reloaded configuration. What needs a restart (name, bind, socket, state
        dir, devices) is reported and left as it is."""
        old = self.settings
        fixed = [k for k in ("name", "bind", "advertise", "socket", "state_dir", "sim_devices",
                             "npu_smi", "npu_dev_dir", "nvml", "payload_work_dir")
                 if getattr(new, k) != getattr(old, k)]
        if fixed:
            log.warning("reload: %s change only with a restart", ", ".join(fixed))
            for k in fixed:
                setattr(new, k, getattr(old, k))
        self.keys.reload(new)  # first: a key file it refuses leaves everything as it was
        self.settings = self.transport.faults.settings = new
        self.node.scheduler.policy = get_policy(new.policy)
        self.node.scheduler.spec = get_spec(new.policy)
        self.node.scheduler.never_fit.grace = new.impossible_grace
        self.node.membership.config = PRESETS[new.profile]
        logging.getLogger().setLevel(getattr(logging, new.log_level.upper()))
        log.info("reloaded policy=%s profile=%s keys=%d", new.policy, new.profile,
                 len(self.keys.keyring))

    # --- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        (self.state_dir / "jobs").mkdir(parents=True, exist_ok=True)
        try:
            self._lock = statedir.lock(self.state_dir)
            self.keys.load()
            self.journal = await statedir.open_journal(self.state_dir / "journal.sqlite3")
        except (KeysError, statedir.StateDirError) as exc:
            raise StartError(str(exc)) from None
        self.commits = GroupCommit(self.journal)
        try:
            incarnation = await self.journal.bump_meta("incarnation")
        except sqlite3.Error as exc:  # a full disk, most likely: say so, no traceback
            raise StartError(f"cannot write the journal: {describe(exc)}") from None
        host, port = s.bind_host_port()
        port = await self.transport.bind(host, port, self._handle_call)
        self.addr = s.advertise or f"{host}:{port}"
        leases = [Lease.from_dict(x) for x in await self.journal.list_leases()]
        token = max([x.token for x in leases] + [int(await self.journal.get_meta("token") or 0)])
        term = max([x.term for x in leases] + [int(await self.journal.get_meta("max_term") or 0)])
        self.node = Node(self._node_config(), random.Random(os.urandom(16)), self.loop.time(),
                         incarnation=incarnation, token=token, max_term=term)
        self.node.scheduler.timer = time.perf_counter
        self.node.scheduler.on_decision = decision_times(self.node.scheduler).observe
        await self.sampler.discover()
        await self._recover(leases)
        await asyncio.gather(self.payload.start(), self.processes.start(), self.results.start())
        self.node.join(list(s.join), self.loop.time())
        self.spawn(self.ticker.run())
        self.spawn(self.sampler.loop())
        await self.flush()
        log.info("agent started name=%s addr=%s incarnation=%d devices=%d enforcement=%s",
                 s.name, self.addr, incarnation, len(self.sampler.devices), self.enforcement)

    def _node_config(self) -> NodeConfig:
        s = self.settings
        return NodeConfig(
            name=s.name, addr=self.addr, membership=PRESETS[s.profile], priority=s.priority,
            eligible=s.coordinator_eligible, policy=s.policy, lease_ttl=s.lease_ttl,
            impossible_grace=s.impossible_grace,
            owner_away_limit=s.owner_away_limit, keep_finished=s.keep_finished,
            keep_finished_for=s.keep_finished_for,
            owner_dead_grace=s.owner_dead_grace or DEAD_GRACE[s.profile][0],
            orphan_limit=s.orphan_limit or DEAD_GRACE[s.profile][1],
        )

    async def _recover(self, leases: list[Lease]) -> None:
        self.node.recover(await self.journal.list_jobs(), await self.journal.list_runs(),
                          leases, self.processes.adopt, self.loop.time(),
                          self.processes.output_size)

    async def stop(self, leave: bool = True, kill_jobs: bool = False) -> None:
        if self.stopping:
            return
        self.stopping = True
        if leave and self.node is not None:
            self.node.membership.leave(self.loop.time())
            await self.flush()
            # Give the leave a moment to get out before the socket closes.
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.processes.shutdown(kill_jobs, self.settings.stop_grace)
        await self.transport.close()
        await self.sampler.close()
        if self.journal is not None:
            await self.journal.close()
        if self._lock is not None:
            statedir.unlock(self._lock)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background (cancelled when the agent stops)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background task failed: %r", exc, exc_info=exc)

    def healthy(self) -> bool:
        """The loop turns and the node ticks: what the systemd watchdog vouches for."""
        return not self.stopping and self.loop.time() - self.ticker.last_tick < 10.0

    # --- the effect pump ----------------------------------------------------------------

    async def flush(self, effects: list[Effect] | None = None) -> None:
        """Carry out every pending effect of the node.

        Flushes may overlap: each drains its own effects at once (draining is synchronous)
        and hands their journal writes to the group commit in drain order, so a later state
        of a job never lands before an earlier one. A batch's other effects run only once
        its writes are durable: a message never promises what is not on disk yet.
        """
        while True:
            effects = self.node.drain() if effects is None else effects
            if not effects:
                break
            written = await journal(self.commits, self.node, [e for e in effects
                                                              if isinstance(e, Persist)])
            self.payload.runs_changed(written)  # (a run stopped while its bundle comes)
            for job_id in written:
                ev = self._job_events.get(job_id)
                if ev is not None:
                    ev.set()
            for eff in effects:
                try:
                    await self._effect(eff)
                except (OSError, ValueError) as exc:  # a full disk, a vanished directory
                    self._effect_failed(eff, exc)
            effects = None
        self.ticker.retime()

    def kick(self, at_once: bool = False) -> None:
        """Flush soon: once for all the input that arrives in one turn of the loop; or
        ``at_once`` (a datagram, a tick: an idle agent's input), with no turn of its own."""
        if self._kicked:
            return
        if at_once:
            self._kick_now()
            return
        self._kicked = True
        self.loop.call_soon(self._kick_now)

    def _kick_now(self) -> None:
        self._kicked = False
        effects = self.node.drain()
        inline = [e for e in effects
                  if isinstance(e, SendPacket | LogEvent | MemberEvent | FactsEvent | NameConflict)]
        if len(inline) == len(effects):
            # Most input (a probe, an ack) asks only for datagrams: sent now, with no task.
            for eff in inline:
                if isinstance(eff, SendPacket):
                    self.transport.send_packet(eff, leaving=self.node.membership.left)
                elif not isinstance(eff, FactsEvent):
                    log_event(eff)
                    if isinstance(eff, MemberEvent):
                        self.transport.members_changed()
            self.ticker.retime()
            return
        self.spawn(self.flush(effects))

    async def _effect(self, eff: Effect) -> None:
        match eff:
            case SendPacket():
                self.transport.send_packet(eff, leaving=self.node.membership.left)
            case Call():
                self.spawn(self._call(eff))
            case StartPushPull():
                self.spawn(self._pushpull(eff))
            case RunJob():
                self.spawn(self.processes.run(eff))
            case StopJob():
                self.spawn(self.processes.stop(eff))
            case ArchiveOutput():
                await self.processes.archive(eff.job_id)
            case JobOutput():
                # Written before anything after it runs: the job's end is journaled only
                # once its output is here (see node/follow.py).
                await self.processes.write_output(eff)
            case CollectResults():
                self.spawn(self.results.collect(eff))
            case MemberEvent():
                log_event(eff)
                self.transport.members_changed()
            case LogEvent() | NameConflict():
                log_event(eff)
            case ForgetJob() | ForgetRun():
                # Its journal row is gone: its output goes too, unless the job's run here
                # (or the run's job, submitted here) still needs it.
                if (eff.job_id not in self.node.owner.runs
                        and eff.job_id not in self.node.origin.jobs):
                    await self.processes.forget(eff.job_id)
                await self.results.sweep()  # (a run's results go with it)
            case FactsEvent() | PersistJob() | PersistRun() | PersistLease() | ForgetLease():
                pass  # facts are read from the membership; journal writes came first
            case _:
                assert_never(eff)

    def _effect_failed(self, eff: Effect, exc: Exception) -> None:
        """One effect failed: the others of its batch still run, and the node hears of
        what it must do again."""
        log.error("%s failed: %s", type(eff).__name__, exc)
        if isinstance(eff, JobOutput):
            self.node.output_failed(eff.job_id, eff.stream, eff.offset, self.loop.time())

    async def _call(self, eff: Call) -> None:
        reply, error = await self.transport.call(eff.addr, eff.msg, eff.timeout, eff.node)
        self.node.call_result(eff.call_id, reply, error, self.loop.time())
        await self.flush()

    async def _pushpull(self, eff: StartPushPull) -> None:
        request = self.node.pushpull_request(eff.join)
        reply, error = await self.transport.call(eff.addr, request, 10.0)
        if reply is None:
            log.debug("push-pull with %s failed: %s", eff.addr, error)
            if eff.join:
                log.warning("could not join through %s: %s", eff.addr, error)
            return
        self.node.pushpull_reply(reply, self.loop.time())
        await self.flush()

    async def _handle_call(self, msg: wire.Message) -> wire.Message | Replies:
        if isinstance(msg, wire.JobSync):
            return await self.processes.job_sync(msg)
        if isinstance(msg, wire.FetchBundle):
            return await self.payload.serve(msg)
        if isinstance(msg, wire.FetchResults):
            return await self.results.serve(msg)
        if self.stopping and isinstance(msg, (wire.Submit, wire.StartJob, wire.LeaseRequest)):
            return wire.Error("agent is shutting down")
        reply = self.node.handle_request(msg, self.loop.time())
        await self.flush()  # what the reply promises is journaled before it is sent
        if isinstance(msg, wire.ResultsTaken):
            await self.results.sweep()
        return reply

    # --- API helpers --------------------------------------------------------------------

    async def submit(self, job: JobRecord) -> JobRecord:
        await self.submit_many([job])
        return job

    async def submit_many(self, jobs: list[JobRecord]) -> None:
        """Accept jobs together (a gang's members): journaled in one commit, all or none."""
        stamp = time.time()
        for job in jobs:
            job.created_at = job.updated_at = stamp
        # On disk before "accepted"; if it cannot be, the submitter hears why at once.
        await self.commits.write(jobs, retry=False)  # (JournalWriteError)
        now = self.loop.time()
        for job in jobs:
            self.node.submit(job, now)
        self.kick()  # placement goes on after the answer

    async def cancel(self, job_id: str) -> str:
        result = self.node.cancel(job_id, self.loop.time())
        await self.flush()
        return result

    def job_event(self, job_id: str) -> asyncio.Event:
        return self._job_events.setdefault(job_id, asyncio.Event())

