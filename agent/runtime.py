"""The asyncio adapter: sockets, timers, processes and the journal around a sans-IO Node.

The runtime owns every piece of I/O. It feeds the node what arrives (datagrams, calls,
call results, process exits, time) and carries out the effects the node returns, in
order: journal writes are awaited before anything that depends on them is sent, so a job
is on disk before its submitter hears it was accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import random
import signal
import time
from collections.abc import Awaitable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, assert_never

from flexmesh.agent import rpc
from flexmesh.agent.config import Settings
from flexmesh.agent.devices.base import Backend, Device, DeviceSample
from flexmesh.agent.devices.discovery import discover_backends
from flexmesh.agent.devices.enforcement import (
    detect_enforcement,
    job_env_many,
    job_memory_used,
    visible_env,
    watchdog_verdict,
)
from flexmesh.agent.devices.idle import IdleEstimator, lendable
from flexmesh.agent.jobs import JobRunner, JobStartError
from flexmesh.agent.metrics import decision_times
from flexmesh.agent.models import FAILED, LOST, TERMINAL, JobRecord
from flexmesh.agent.node import (
    ArchiveOutput,
    Call,
    Effect,
    JobOutput,
    LogEvent,
    Node,
    NodeConfig,
    PersistJob,
    PersistLease,
    RunJob,
    StopJob,
)
from flexmesh.agent.store import AsyncJournal
from flexmesh.policies import get_policy, get_spec
from flexmesh.protocol import wire
from flexmesh.protocol.crypto import OVERHEAD, CryptoError, Keyring, KeyringError, Sealer
from flexmesh.protocol.lease import Lease
from flexmesh.protocol.membership import (
    PRESETS,
    FactsEvent,
    MemberEvent,
    SendPacket,
    StartPushPull,
)

log = logging.getLogger("flexmesh.agent")

SAMPLE_INTERVAL = 1.0  # seconds between device readings (the watchdog checks this often)
SYNC_CHUNK = 256 * 1024


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.agent.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.agent.count("udp_errors")


class GroupCommit:
    """Journal writes from many callers, committed together: one transaction and one
    fsync per batch. Writes that arrive while a commit runs go into the next batch; each
    caller returns once its own writes are durable."""

    def __init__(self, journal: AsyncJournal) -> None:
        self.journal = journal
        self._jobs: dict[str, JobRecord] = {}
        self._leases: dict[str, dict[str, Any]] = {}
        self._meta: dict[str, str] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Future[None] | None = None
        self.batches = 0

    async def write(self, jobs: Iterable[JobRecord] = (),
                    leases: Iterable[dict[str, Any]] = (),
                    meta: dict[str, str] | None = None) -> None:
        for job in jobs:
            self._jobs[job.id] = job
        for lease in leases:
            self._leases[lease["id"]] = lease
        self._meta.update(meta or {})
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._commit_loop())
        await done

    async def _commit_loop(self) -> None:
        while self._waiters:
            jobs, leases, meta = self._jobs, self._leases, self._meta
            waiters = self._waiters
            self._jobs, self._leases, self._meta, self._waiters = {}, {}, {}, []
            try:
                await self.journal.write_batch(jobs.values(), leases.values(), meta)
            except Exception as exc:
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            self.batches += 1
            for w in waiters:
                if not w.done():
                    w.set_result(None)


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
        self.runner: JobRunner = None  # type: ignore[assignment]
        self.backends: list[Backend] = []
        self.enforcement = "none"
        self.addr = ""
        self.started_at = time.time()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._job_events: dict[str, asyncio.Event] = {}
        self._estimators: dict[str, IdleEstimator] = {}
        self._device_list: list[Device] = []
        self.last_samples: dict[str, DeviceSample] = {}
        self.ui_url = ""
        self._stopping = False
        self.counters: dict[str, int] = {}
        self.keyring = Keyring()
        self.sealer: Sealer | None = None
        self.codec = rpc.Codec()
        self._faults = random.Random()  # fault injection only (tests on loopback)
        self.last_tick = self.loop.time()
        self._warned_plaintext = False

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    # --- security -----------------------------------------------------------------------

    def _keyring_path(self) -> Path:
        return self.state_dir / "keyring.json"

    def _load_keyring(self) -> None:
        """The keyring kept by ``flexmesh keys`` wins; else the configured key(s)."""
        s = self.settings
        try:
            path = self._keyring_path()
            if path.exists():
                self.keyring = Keyring.from_list(json.loads(path.read_text()))
            else:
                keys = []
                if s.key_file:
                    keys += [line.strip() for line in Path(s.key_file).read_text().splitlines()
                             if line.strip() and not line.lstrip().startswith("#")]
                if s.key:
                    keys.append(s.key)
                self.keyring = Keyring(keys)
        except (OSError, ValueError) as exc:
            raise StartError(f"cannot load the keyring: {exc}") from None
        if not len(self.keyring):
            if not s.is_loopback():
                raise StartError(
                    f"bind {s.bind} is not a loopback address and no key is configured: "
                    "make one with `flexmesh keygen` and set [security] key_file")
            if self.sealer is None and not self._warned_plaintext:
                self._warned_plaintext = True
                log.warning("no cluster key: gossip and calls run in plaintext (allowed on "
                            "loopback only)")
        self._apply_keyring()

    def _apply_keyring(self) -> None:
        if self.sealer is not None and len(self.keyring):
            self.sealer.keyring = self.keyring  # keep its nonce sequence and replay window
        else:
            self.sealer = Sealer(self.keyring) if len(self.keyring) else None
        self.codec = rpc.Codec(self.sealer, self.settings.cluster.encode())

    def reconfigure(self, new: Settings) -> None:
        """Apply a reloaded configuration. What needs a restart (name, bind, socket, state
        dir, devices) is reported and left as it is."""
        old = self.settings
        fixed = [k for k in ("name", "bind", "advertise", "socket", "state_dir", "sim_devices",
                             "npu_smi", "nvml") if getattr(new, k) != getattr(old, k)]
        if fixed:
            log.warning("reload: %s change only with a restart", ", ".join(fixed))
            for k in fixed:
                setattr(new, k, getattr(old, k))
        self.settings = new
        self.node.scheduler.policy = get_policy(new.policy)
        self.node.scheduler.spec = get_spec(new.policy)
        self.node.membership.config = PRESETS[new.profile]
        logging.getLogger().setLevel(getattr(logging, new.log_level.upper()))
        if not self._keyring_path().exists():  # keys changed with `flexmesh keys` stay
            self._load_keyring()
        log.info("reloaded policy=%s profile=%s keys=%d", new.policy, new.profile,
                 len(self.keyring))

    def keys_view(self) -> dict[str, Any]:
        return {"primary": self.keyring.primary, "keys": list(self.keyring.keys),
                "encrypted": self.sealer is not None, "cluster": self.settings.cluster}

    async def keys_change(self, op: str, key: str) -> dict[str, Any]:
        """Add, promote or remove a key on the running agent, and keep the ring on disk."""
        ring = Keyring.from_list(self.keyring.to_list())
        if op == "add":
            ring.add(key)
        elif op == "promote":
            ring.promote(key)
        elif op == "remove":
            ring.remove(key)
        else:
            raise KeyringError(f"unknown key operation {op!r} (add, promote, remove)")
        await asyncio.to_thread(_write_private, self._keyring_path(),
                                json.dumps(ring.to_list()))
        self.keyring = ring
        if self.sealer is None:
            self._apply_keyring()
        else:  # keep the sealer (its nonce sequence and replay window), swap its keys
            self.sealer.keyring = ring
        log.info("keyring %s primary=%s keys=%d", op, self.keyring.primary, len(self.keyring))
        return self.keys_view()

    # --- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        (self.state_dir / "jobs").mkdir(parents=True, exist_ok=True)
        self._load_keyring()
        self.journal = await AsyncJournal.open(self.state_dir / "journal.sqlite3")
        self.commits = GroupCommit(self.journal)
        incarnation = await self.journal.bump_meta("incarnation")
        host, port = s.bind_host_port()
        self._udp, port = await self._bind_udp(host, port)
        self._tcp = await asyncio.start_server(self._serve_tcp, host, port)
        self.addr = s.advertise or f"{host}:{port}"
        leases = [Lease.from_dict(x) for x in await self.journal.list_leases()]
        max_term = max((x.term for x in leases), default=0)
        token = max((x.token for x in leases), default=0)
        token = max(token, int(await self.journal.get_meta("token") or 0))
        config = NodeConfig(
            name=s.name, addr=self.addr, membership=PRESETS[s.profile], priority=s.priority,
            eligible=s.coordinator_eligible, policy=s.policy, lease_ttl=s.lease_ttl,
            owner_away_limit=s.owner_away_limit,
        )
        self.node = Node(config, random.Random(os.urandom(16)), self.loop.time(),
                         incarnation=incarnation, token=token, max_term=max_term)
        self.node.scheduler.timer = time.perf_counter
        self.node.scheduler.on_decision = decision_times(self.node.scheduler).observe
        self.runner = JobRunner(self.state_dir, self._on_exit)
        await self._init_devices()
        await self._recover(leases)
        self.node.join(list(s.join), self.loop.time())
        self._spawn(self._timer_loop())
        self._spawn(self._sample_loop())
        await self.flush()
        log.info("agent started name=%s addr=%s incarnation=%d devices=%d enforcement=%s",
                 s.name, self.addr, incarnation, len(self._device_list), self.enforcement)

    async def _bind_udp(self, host: str, port: int) -> tuple[asyncio.DatagramTransport, int]:
        """Bind UDP; with port 0, pick one that TCP can have too (same port for both)."""
        for _ in range(20):
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(host, port))
            chosen = transport.get_extra_info("sockname")[1]
            if port:
                return transport, chosen
            try:
                probe = await asyncio.start_server(lambda r, w: None, host, chosen)
            except OSError:
                transport.close()
                continue
            probe.close()
            await probe.wait_closed()
            return transport, chosen
        raise OSError(f"no port on {host} free for both UDP and TCP")

    async def stop(self, leave: bool = True, kill_jobs: bool = False) -> None:
        if self._stopping:
            return
        self._stopping = True
        if leave and self.node is not None:
            self.node.membership.leave(self.loop.time())
            await self.flush()
            # Give the leave a moment to get out before the socket closes.
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.runner is not None:
            await self.runner.shutdown(kill=kill_jobs, grace_s=self.settings.stop_grace)
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2.0)
        if self._udp is not None:
            self._udp.close()
        for backend in self.backends:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(backend.close)
        if self.journal is not None:
            await self.journal.close()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background task failed: %r", exc, exc_info=exc)

    # --- devices ------------------------------------------------------------------------

    async def _init_devices(self) -> None:
        s = self.settings
        self.backends = await asyncio.to_thread(
            discover_backends, s.sim_devices or None,
            Path(s.sim_load_file) if s.sim_load_file else None, s.npu_smi or None, s.nvml)
        devices: list[Device] = []
        for backend in self.backends:
            try:
                devices.extend(await asyncio.to_thread(backend.discover))
            except Exception as exc:  # a broken backend must not stop the agent
                log.warning("device backend %s failed: %s", backend.name, exc)
        self._device_list = devices
        has_nvml = any(b.name == "nvml" for b in self.backends)
        try:
            self.enforcement = detect_enforcement(
                s.enforcement, s.hami_lib or None, nvml_available=has_nvml)
        except ValueError as exc:
            log.warning("enforcement: %s; falling back to none", exc)
            self.enforcement = "none"
        self.node.enforcement = self.enforcement
        self._apply_devices({})

    def _apply_devices(self, samples: dict[str, DeviceSample]) -> None:
        s = self.settings
        now = self.loop.time()
        lend: dict[str, tuple[int, int]] = {}
        devices = []
        gone = [d.id for d in self._device_list if (sm := samples.get(d.id)) and sm.lost]
        if gone:
            log.warning("devices gone (fell off the bus?): %s; their jobs end", ", ".join(gone))
            self._device_list = [d for d in self._device_list if d.id not in gone]
        for d in self._device_list:
            sample = samples.get(d.id)
            est = self._estimators.setdefault(d.id, IdleEstimator())
            fc, fm = (sample.foreign_compute_milli, sample.foreign_memory_mib) if sample else (0, 0)
            foreign = est.observe(now, fc, fm)
            lend[d.id] = (
                lendable(d.compute_milli, 0, foreign.compute_milli, s.reserve_compute_milli),
                lendable(d.memory_mib, 0, foreign.memory_mib, s.reserve_memory_mib),
            )
            healthy = d.healthy and (sample.healthy if sample else True)
            devices.append(d if healthy == d.healthy else replace(d, healthy=healthy))
        self.node.set_devices(devices, lend, now)

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            pids = frozenset(self.runner.running().values())
            samples: dict[str, DeviceSample] = {}
            for backend in self.backends:
                try:
                    for sm in await asyncio.to_thread(backend.sample, pids):
                        samples[sm.id] = sm
                except Exception as exc:
                    log.warning("sampling %s failed: %s", backend.name, exc)
            self.last_samples = samples
            self._apply_devices(samples)
            if self.enforcement == "watchdog":
                self._watchdog(list(samples.values()))
            await self.flush()

    def _watchdog(self, samples: list[DeviceSample]) -> None:
        """No interception: stop a job whose measured device memory exceeds its lease."""
        running = self.runner.running()
        for job in list(self.node.owner.runs.values()):
            pid = running.get(job.id)
            if pid is None or job.terminal:
                continue
            for device in job.devices:  # the lease's memory is per device
                used = job_memory_used(samples, device, [pid])
                verdict = watchdog_verdict(used, job.memory_mib)
                if verdict:
                    log.info("watchdog job=%s device=%s used_mib=%d lease_mib=%d", job.id,
                             device, used, job.memory_mib)
                    self.node.stop_job(job.id, verdict, FAILED, self.loop.time())
                    break

    # --- recovery after a restart -------------------------------------------------------

    async def _recover(self, leases: list[Lease]) -> None:
        def adopt(job: JobRecord) -> bool:
            return (job.pid is not None and job.pid_start is not None
                    and self.runner.adopt(job.id, job.pid, job.pid_start))

        def output(job_id: str) -> tuple[int, int]:
            out = self.state_dir / "jobs" / job_id
            return _size(out / "stdout"), _size(out / "stderr")

        self.node.recover(await self.journal.list_jobs(), leases, adopt, self.loop.time(),
                          output)

    # --- the effect pump ----------------------------------------------------------------

    async def flush(self) -> None:
        """Carry out every pending effect of the node.

        Flushes may overlap: each drains its own effects at once (draining is synchronous)
        and hands their journal writes to the group commit in drain order, so a later state
        of a job never lands before an earlier one. A batch's other effects run only once
        its writes are durable: a message never promises what is not on disk yet.
        """
        while True:
            effects = self.node.drain()
            if not effects:
                break
            await self._persist([e for e in effects if isinstance(e, (PersistJob, PersistLease))])
            for eff in effects:
                if not isinstance(eff, (PersistJob, PersistLease)):
                    await self._effect(eff)
        self._wake.set()

    async def _persist(self, effects: list[PersistJob | PersistLease]) -> None:
        if not effects:
            return
        jobs: dict[str, JobRecord] = {}
        leases: dict[str, dict[str, Any]] = {}
        now = time.time()
        for eff in effects:
            if isinstance(eff, PersistJob):
                job = eff.job
                # The node keeps its own (monotonic or virtual) time; records carry wall time.
                job.updated_at = now
                if job.created_at < 1e9:
                    job.created_at = now
                for live in (self.node.origin.jobs.get(job.id), self.node.owner.runs.get(job.id)):
                    if live is not None:
                        live.updated_at, live.created_at = job.updated_at, job.created_at
                jobs[job.id] = job
            else:
                leases[eff.lease.id] = eff.lease.to_dict()
        meta = {"token": str(self.node.leases.token)} if leases else None
        await self.commits.write(list(jobs.values()), list(leases.values()), meta)
        for job_id in jobs:
            ev = self._job_events.get(job_id)
            if ev is not None:
                ev.set()

    def kick(self) -> None:
        self._spawn(self.flush())

    async def _effect(self, eff: Effect) -> None:
        match eff:
            case SendPacket():
                self._send_packet(eff)
            case Call():
                self._spawn(self._do_call(eff))
            case StartPushPull():
                self._spawn(self._do_pushpull(eff))
            case RunJob():
                self._spawn(self._run_job(eff))
            case StopJob():
                self._spawn(self.runner.stop(eff.job_id, self.settings.stop_grace, eff.reason))
            case ArchiveOutput():
                await asyncio.to_thread(_archive_output, self.state_dir / "jobs" / eff.job_id)
            case JobOutput():
                # Written before anything after it runs: the job's end is journaled only
                # once its output is here (see follow.py).
                path = self.state_dir / "jobs" / eff.job_id
                await asyncio.to_thread(_write_at, path, eff.stream, eff.offset, eff.data)
            case LogEvent():
                log.info("%s %s", eff.event,
                         " ".join(f"{k}={v}" for k, v in eff.fields.items()))
            case MemberEvent():
                log.info("member name=%s state=%s prev=%s addr=%s", eff.name, eff.state,
                         eff.prev, eff.addr)
            case FactsEvent() | PersistJob() | PersistLease():
                pass  # facts are read from the membership; journal writes came first
            case _:
                assert_never(eff)

    def healthy(self) -> bool:
        """The loop turns and the node ticks: what the systemd watchdog vouches for."""
        return not self._stopping and self.loop.time() - self.last_tick < 10.0

    async def _timer_loop(self) -> None:
        while True:
            self.last_tick = self.loop.time()
            delay = max(0.0, self.node.next_deadline() - self.loop.time())
            self._wake.clear()
            wait = min(delay, 1.0)
            started = self.loop.time()
            woken = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
                woken = True
            now = self.loop.time()
            if not woken:  # slept past its timer: by how much says how slow the loop is
                self.node.membership.timer_overshoot(now - started - wait)
            if now >= self.node.next_deadline():
                self.node.tick(now)
                await self.flush()

    # --- UDP ----------------------------------------------------------------------------

    def on_datagram(self, data: bytes, addr: tuple[Any, int]) -> None:
        if len(data) > wire.UDP_BUDGET + OVERHEAD:
            self.count("packets_dropped_oversized")
            return
        if self.sealer is not None:
            try:
                data = self.sealer.open(data, self.codec.cluster, time.time())
            except CryptoError as exc:
                self.count(f"packets_dropped_{exc.reason}")
                return
        elif data[:1] == b"\x81":
            self.count("packets_dropped_sealed_without_key")
            return
        self.node.step_packet(f"{addr[0]}:{addr[1]}", data, self.loop.time())
        self.kick()

    def _send_packet(self, eff: SendPacket) -> None:
        if self._udp is None or (self._stopping and not self.node.membership._left):
            return
        data = eff.data
        if self.sealer is not None:
            data = self.sealer.seal(data, self.codec.cluster, time.time())
        s = self.settings
        if s.fault_drop and self._faults.random() < s.fault_drop:
            self.count("fault_dropped")
            return
        copies = 2 if s.fault_duplicate and self._faults.random() < s.fault_duplicate else 1
        for _ in range(copies):
            if s.fault_delay_ms:
                self.loop.call_later(s.fault_delay_ms / 1000, self._sendto, eff.addr, data)
            else:
                self._sendto(eff.addr, data)

    def _sendto(self, addr: str, data: bytes) -> None:
        if self._udp is None or self._udp.is_closing():
            return
        try:
            host, port = addr.rsplit(":", 1)
            self._udp.sendto(data, (host.strip("[]"), int(port)))
        except (OSError, ValueError) as exc:
            self.count("udp_send_errors")
            log.debug("udp send to %s failed: %s", addr, exc)

    # --- TCP: calls out -----------------------------------------------------------------

    async def _do_call(self, eff: Call) -> None:
        try:
            reply = await rpc.call(eff.addr, eff.msg, eff.timeout, self.codec)
            error = ""
        except rpc.CallError as exc:
            reply, error = None, str(exc)
        self.node.call_result(eff.call_id, reply, error, self.loop.time())
        await self.flush()

    async def _do_pushpull(self, eff: StartPushPull) -> None:
        try:
            reply = await rpc.call(eff.addr, self.node.pushpull_request(eff.join), 10.0,
                                   self.codec)
        except rpc.CallError as exc:
            log.debug("push-pull with %s failed: %s", eff.addr, exc)
            if eff.join:
                log.warning("could not join through %s: %s", eff.addr, exc)
            return
        self.node.pushpull_reply(reply, self.loop.time())
        await self.flush()

    # --- TCP: calls in ------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await rpc.serve_connection(reader, writer, self._handle_call, self.codec)
        except rpc.RemoteError as exc:
            self.count("peers_disconnected_garbage")
            self.count(f"frames_dropped_{exc.reason}")
            log.info("dropped a peer connection: %s", exc)

    async def _handle_call(self, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.JobSync):
            return await self._job_sync(msg)
        if self._stopping and isinstance(msg, (wire.Submit, wire.StartJob, wire.LeaseRequest)):
            return wire.Error("agent is shutting down")
        reply = self.node.handle_request(msg, self.loop.time())
        await self.flush()  # what the reply promises is journaled before it is sent
        return reply

    async def _job_sync(self, msg: wire.JobSync) -> wire.Message:
        job = self.node.owner.runs.get(msg.job_id)
        if job is None:
            return wire.Error(f"no job {msg.job_id} runs here")
        deadline = self.loop.time() + min(max(msg.wait_ms, 0), 10_000) / 1000
        while True:
            state = job.state
            out = await asyncio.to_thread(self.runner.read_log, job.id, "stdout",
                                          msg.stdout_offset, SYNC_CHUNK)
            err = await asyncio.to_thread(self.runner.read_log, job.id, "stderr",
                                          msg.stderr_offset, SYNC_CHUNK)
            if out or err or state in TERMINAL or self.loop.time() >= deadline:
                return self.node.sync_reply(msg, out, err, SYNC_CHUNK)
            ev = self._job_events.setdefault(job.id, asyncio.Event())
            ev.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), min(0.2, deadline - self.loop.time()))

    # --- jobs ---------------------------------------------------------------------------

    async def _run_job(self, eff: RunJob) -> None:
        job, devices = eff.job, eff.devices
        env = {
            "FLEXMESH_JOB_ID": job.id, "FLEXMESH_DEVICE": ",".join(d.id for d in devices),
            "FLEXMESH_COMPUTE_MILLI": str(job.compute_milli),
            "FLEXMESH_MEMORY_MIB": str(job.memory_mib), "FLEXMESH_ORIGIN": job.origin,
        }
        try:
            env.update(job_env_many(devices, job.compute_milli, job.memory_mib,
                                    self.enforcement, self.settings.hami_lib or None))
        except ValueError as exc:
            log.warning("job %s: no limits applied: %s", job.id, exc)
            env.update(visible_env(devices))
        # The submitter's own variables; of flexmesh's names only the gang's, which the
        # origin sets (and never takes from the user): the rest are this owner's to set.
        env.update({k: v for k, v in job.env.items()
                    if not k.startswith("FLEXMESH_") or k.startswith("FLEXMESH_GANG")})
        if job.id not in self.node.origin.jobs:
            # A new attempt here after an earlier one (preempted): keep that output apart.
            await asyncio.to_thread(_archive_output, self.state_dir / "jobs" / job.id)
        user = await asyncio.to_thread(self.job_user, job)  # NSS lookups may block
        try:
            pid, pid_start = await self.runner.start(job.id, job.command, env, user=user)
        except (JobStartError, ValueError, OSError) as exc:
            self.node.job_exited(job.id, None, f"could not start: {exc}", self.loop.time(),
                                 state=FAILED)
        else:
            self.node.job_started(job.id, pid, pid_start, self.loop.time(),
                                  lease_id=job.lease_id)
        await self.flush()

    def job_user(self, job: JobRecord) -> tuple[int, int] | None:
        """(uid, gid) a job runs as; None: as the agent (which then is not root).

        A job submitted here runs as its submitter; root's only if ``allow_root``. Jobs
        borrowed from other nodes, or whose submitter is unknown, run as ``borrowed_user``.
        """
        if os.geteuid() != 0:
            return None  # an unprivileged agent cannot switch users: jobs run as it does
        s = self.settings
        uid = job.uid if job.origin == self.node.name else None
        if uid is None or (uid == 0 and not s.allow_root):
            return _lookup_user(s.borrowed_user)
        try:
            return uid, pwd.getpwuid(uid).pw_gid
        except KeyError:
            return uid, uid  # no passwd entry: a group of the same number

    def _on_exit(self, job_id: str, exit_code: int | None, reason: str) -> None:
        state = LOST if exit_code is None else None
        self.node.job_exited(job_id, exit_code, reason, self.loop.time(), state=state)
        self.kick()

    # --- API helpers --------------------------------------------------------------------

    async def submit(self, job: JobRecord) -> JobRecord:
        await self.submit_many([job])
        return job

    async def submit_many(self, jobs: list[JobRecord]) -> None:
        """Accept jobs together (a gang's members): journaled in one commit, all or none."""
        stamp = time.time()
        for job in jobs:
            job.created_at = job.updated_at = stamp
        await self.commits.write(jobs)  # on disk before the submitter hears "accepted"
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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _lookup_user(name: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        if name.isdigit():
            return int(name), int(name)
        log.warning("user %r does not exist; running borrowed jobs as 65534 (nobody)", name)
        return 65534, 65534


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _archive_output(job_dir: Path) -> None:
    """Move a finished attempt's output to ``stdout.1``, ``stderr.1``, ... beside it."""
    if not (job_dir / "stdout").exists() and not (job_dir / "stderr").exists():
        return
    n = 1
    while (job_dir / f"stdout.{n}").exists() or (job_dir / f"stderr.{n}").exists():
        n += 1
    for stream in ("stdout", "stderr"):
        if (job_dir / stream).exists():
            (job_dir / stream).rename(job_dir / f"{stream}.{n}")


def _write_at(job_dir: Path, stream: str, offset: int, data: bytes) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / stream
    mode = "r+b" if path.exists() else "wb"
    with open(path, mode) as f:
        f.seek(offset)
        f.write(data)


def install_signal_handlers(stop: asyncio.Event, force: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            force.set()  # a second Ctrl-C: exit now
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
