"""Prometheus metrics of one agent, read from its state at scrape time.

Nothing here updates in the background: ``AgentCollector.collect()`` walks the agent's
node (membership, election, scheduler, leases, jobs) and counters when Prometheus asks,
on the event loop, so it never reads state another thread is changing. Each scrape builds
a registry of its own; the process-wide ``prometheus_client.REGISTRY`` is never touched,
so several agents in one process (tests, the simulator) do not mix their figures.

Device series cover this node's own devices only: the owner is the authority over them,
and a mesh scraped node by node would otherwise count every device once per agent.

The scheduler's decision time is the one figure that must be recorded as it happens:
``observe_decision(owner, seconds)`` puts it in a histogram attached to ``owner`` (the
node's ``Scheduler``), never in a global one.

    GET /metrics        on the agent's Unix socket (``metrics``), and optionally on TCP
                        (``start_tcp_metrics``, 127.0.0.1 by default)
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from flexmesh.agent.models import STATES as JOB_STATES
from flexmesh.protocol.membership import STATES as MEMBER_STATES

if TYPE_CHECKING:  # no agent module at import time: the scheduler or runtime may import this
    from flexmesh.agent.node import Node, NodeStatus

MIB = 1 << 20
PREFIX = "flexmesh"
# Placement decisions take microseconds on a small mesh and should stay well under a
# second on a large one; the buckets span both.
DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5)
_ATTR = "_flexmesh_decision_times"
_DROPPED = (("packets_dropped_", "packets"), ("frames_dropped_", "frames"))
# Counters with families of their own; every other counter goes to flexmesh_events_total.
_NAMED = frozenset({"probes", "probe_failed", "suspicions", "refutations", "placements",
                    "refusals", "leases_refused", "reclaims", "preempted", "preemptions"})


class AgentLike(Protocol):
    """What the collector reads: ``flexmesh.agent.runtime.Agent`` or a test stand-in."""

    node: Node
    counters: dict[str, int]
    addr: str


# --- decision time ------------------------------------------------------------------------


class DecisionTimes:
    """A histogram of placement decision times in seconds, kept by one scheduler."""

    def __init__(self, buckets: Iterable[float] = DECISION_BUCKETS) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs, +Inf last, as Prometheus buckets are written."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((_le(bound), float(running)))
        return out


def decision_times(owner: object) -> DecisionTimes:
    """The histogram attached to ``owner`` (a scheduler), created on first use."""
    found = getattr(owner, _ATTR, None)
    if isinstance(found, DecisionTimes):
        return found
    times = DecisionTimes()
    setattr(owner, _ATTR, times)
    return times


def observe_decision(owner: object, seconds: float) -> None:
    """Record one placement decision that took ``seconds``, for ``owner``'s scrape."""
    decision_times(owner).observe(seconds)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


# --- the collector --------------------------------------------------------------------------


class AgentCollector:
    """Reads one agent when collected; see the module docstring."""

    def __init__(self, agent: AgentLike) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        node = self.agent.node
        st = node.views.status()
        yield from self._identity(st)
        yield from self._membership(st)
        yield from self._election(st)
        yield from self._scheduling(st, decision_times(node.scheduler))
        yield from self._devices(st)
        yield from self._jobs(st)

    def _identity(self, node: NodeStatus) -> Iterator[Metric]:
        info = GaugeMetricFamily(f"{PREFIX}_agent_info", "This agent: node name and address.",
                                 labels=["node", "address", "enforcement"])
        info.add_metric([node.name, self.agent.addr,
                         str(getattr(self.agent, "enforcement", "none"))], 1)
        yield info
        started = getattr(self.agent, "started_at", None)
        if isinstance(started, float | int):
            yield GaugeMetricFamily(f"{PREFIX}_agent_start_time_seconds",
                                    "When this agent started, in Unix time.", value=started)

    def _membership(self, node: NodeStatus) -> Iterator[Metric]:
        members = GaugeMetricFamily(f"{PREFIX}_members", "Members this node knows, by state.",
                                    labels=["state"])
        by_state = dict.fromkeys(MEMBER_STATES, 0)
        for state, n in node.members.items():
            by_state[state] = by_state.get(state, 0) + n
        for state, n in by_state.items():
            members.add_metric([state], n)
        yield members
        mc = node.counters
        yield _counter("membership_probes", "Probes this node started.", mc.get("probes", 0))
        yield _counter("membership_probes_failed", "Probes that got no ack in time.",
                       mc.get("probe_failed", 0))
        yield _counter("membership_suspicions", "Members this node began to suspect.",
                       mc.get("suspicions", 0))
        yield _counter("membership_refutations",
                       "Suspicions of this node that it refuted.", mc.get("refutations", 0))
        yield GaugeMetricFamily(f"{PREFIX}_membership_awareness_score",
                                "Lifeguard local health; 0 is healthy, higher slows timeouts.",
                                value=node.awareness)
        counters = self._all_counters(node)
        for prefix, what in _DROPPED:
            fam = CounterMetricFamily(f"{PREFIX}_{what}_dropped",
                                      f"{what.capitalize()} dropped, by reason.",
                                      labels=["reason"])
            for key, n in sorted(counters.items()):
                if key.startswith(prefix):
                    fam.add_metric([key.removeprefix(prefix)], n)
            yield fam
        events = CounterMetricFamily(f"{PREFIX}_events",
                                     "Other things the agent counts, by name.", labels=["event"])
        for key, n in sorted(counters.items()):
            if key not in _NAMED and not key.startswith(tuple(p for p, _ in _DROPPED)):
                events.add_metric([key], n)
        yield events

    def _all_counters(self, node: NodeStatus) -> dict[str, int]:
        merged = dict(node.counters)
        for source in (self.agent.counters,):
            for key, n in source.items():
                merged[key] = merged.get(key, 0) + n
        return merged

    def _election(self, node: NodeStatus) -> Iterator[Metric]:
        yield GaugeMetricFamily(f"{PREFIX}_election_term",
                                "Term of the coordinator this node follows.",
                                value=node.term)
        yield GaugeMetricFamily(f"{PREFIX}_election_max_term",
                                "Highest coordinator term this node has seen.",
                                value=node.max_term)
        yield GaugeMetricFamily(f"{PREFIX}_is_coordinator",
                                "1 when this node is the coordinator.",
                                value=int(node.is_coordinator))
        coord = GaugeMetricFamily(f"{PREFIX}_coordinator_info",
                                  "The coordinator this node follows (absent: none).",
                                  labels=["coordinator"])
        if node.coordinator is not None:
            coord.add_metric([node.coordinator], 1)
        yield coord

    def _scheduling(self, node: NodeStatus, times: DecisionTimes) -> Iterator[Metric]:
        yield GaugeMetricFamily(f"{PREFIX}_scheduler_queue_length",
                                "Requests waiting in this coordinator's queue.",
                                value=node.queue)
        yield _counter("scheduler_placements", "Placements an owner granted.",
                       node.counters.get("placements", 0))
        yield _counter("scheduler_refusals", "Placements an owner refused.",
                       node.counters.get("refusals", 0))
        yield _counter("leases_refused", "Lease requests this node refused as an owner.",
                       node.counters.get("leases_refused", 0))
        pre = CounterMetricFamily(f"{PREFIX}_preemptions",
                                  "Lent fractions taken back from jobs, by cause.",
                                  labels=["cause"])
        pre.add_metric(["reclaim"], node.counters.get("reclaims", 0))
        pre.add_metric(["priority"], node.counters.get("preempted", 0))
        yield pre
        yield _counter("scheduler_preemptions_ordered",
                       "Jobs this coordinator told owners to stop for higher-priority ones.",
                       node.counters.get("preemptions", 0))
        yield HistogramMetricFamily(f"{PREFIX}_scheduler_decision_seconds",
                                    "Time to decide one placement.",
                                    buckets=times.cumulative(), sum_value=times.total)

    def _devices(self, node: NodeStatus) -> Iterator[Metric]:
        labels = ["node", "device"]
        info = GaugeMetricFamily(f"{PREFIX}_device_info", "This node's devices.",
                                 labels=[*labels, "kind", "model", "backend"])
        healthy = _gauge("device_healthy", "1 when the device is healthy.", labels)
        fams = {
            "capacity_compute": _gauge("device_capacity_compute_milli",
                                       "Compute of the device (1000 = one device).", labels),
            "leased_compute": _gauge("device_leased_compute_milli",
                                     "Compute held by leases.", labels),
            "lendable_compute": _gauge("device_lendable_compute_milli",
                                       "Compute the owner can still lend.", labels),
            "capacity_memory": _gauge("device_capacity_memory_bytes",
                                      "Memory of the device.", labels),
            "leased_memory": _gauge("device_leased_memory_bytes",
                                    "Memory held by leases.", labels),
            "lendable_memory": _gauge("device_lendable_memory_bytes",
                                      "Memory the owner can still lend.", labels),
        }
        util = _gauge("device_utilization_ratio",
                      "Utilisation last measured, 0 to 1 (where the backend reports it).", labels)
        samples = _samples(self.agent)
        for d in node.devices:
            key = [node.name, d.id]
            used_c, used_m = d.leased_compute_milli, d.leased_memory_mib
            free_c, free_m = d.lendable_compute_milli, d.lendable_memory_mib
            info.add_metric([*key, d.kind, d.model, d.backend], 1)
            healthy.add_metric(key, int(d.healthy))
            for name, value in (("capacity_compute", d.compute_milli),
                                ("leased_compute", used_c), ("lendable_compute", free_c),
                                ("capacity_memory", d.memory_mib * MIB),
                                ("leased_memory", used_m * MIB),
                                ("lendable_memory", free_m * MIB)):
                fams[name].add_metric(key, value)
            sample = samples.get(d.id)
            pct = getattr(sample, "utilization_pct", None)
            if isinstance(pct, int | float) and not isinstance(pct, bool):
                util.add_metric(key, min(max(pct, 0), 100) / 100)
        yield info
        yield healthy
        yield from fams.values()
        yield util

    def _jobs(self, node: NodeStatus) -> Iterator[Metric]:
        fam = GaugeMetricFamily(
            f"{PREFIX}_jobs", "Jobs this node knows, by state and role (origin: submitted "
            "here; owner: runs here for another node; both).", labels=["state", "role"])
        counts = {(s, r): 0 for s in JOB_STATES for r in ("origin", "owner", "both")}
        for by, n in node.jobs.items():
            counts[by] = counts.get(by, 0) + n
        for (state, role), n in counts.items():
            fam.add_metric([state, role], n)
        yield fam
        yield from self._job_use()

    def _job_use(self) -> Iterator[Metric]:
        """What each job running here was measured holding, beside its lease; at most
        ``MAX_JOB_SERIES`` jobs (the oldest), so a busy node cannot flood the scrape."""
        use = getattr(getattr(self.agent, "sampler", None), "job_use", None) or {}
        node = self.agent.node
        memory = _gauge("job_device_memory_mib", "Device memory held by a job running here "
                        "(its process tree), as measured.", ["job", "origin"])
        util = _gauge("job_device_utilization_percent", "Compute utilization of a job "
                      "running here, as measured per process.", ["job", "origin"])
        leased = _gauge("job_lease_memory_mib", "Device memory a job running here leased.",
                        ["job", "origin"])
        runs = sorted((j for j in node.owner.runs.values() if j.id in use and not j.terminal),
                      key=lambda j: j.created_at)[:MAX_JOB_SERIES]
        for job in runs:
            labels = [job.id, job.origin]
            measured = use[job.id]
            if measured.memory_mib is not None:
                memory.add_metric(labels, measured.memory_mib)
            if measured.utilization_pct is not None:
                util.add_metric(labels, measured.utilization_pct)
            lease = node.leases.leases.get(job.lease_id)
            if lease is not None:
                leased.add_metric(labels, lease.memory_mib * len(lease.devices))
        yield from (memory, util, leased)


MAX_JOB_SERIES = 64  # jobs with per-job gauges at most


def _counter(name: str, doc: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


def _samples(agent: object) -> Mapping[str, Any]:
    """The last device readings, where the runtime keeps them (``last_samples``)."""
    found = getattr(agent, "last_samples", None)
    return found if isinstance(found, Mapping) else {}


# --- exposition -----------------------------------------------------------------------------


def registry_for(agent: AgentLike, process: bool = True) -> CollectorRegistry:
    """A fresh registry holding this agent's collector (and the process's, by default)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    if process:
        ProcessCollector(namespace=PREFIX, registry=registry)
    return registry


def render(agent: AgentLike, accept: str = "", process: bool = True) -> tuple[bytes, str]:
    """The scrape body and its content type, in the format ``accept`` asks for."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry_for(agent, process)), content_type


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``."""
    from flexmesh.agent.api import AGENT_KEY

    body, content_type = render(request.app[AGENT_KEY], request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def start_tcp_metrics(agent: AgentLike, host: str = "127.0.0.1",
                            port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve ``/metrics`` on TCP; returns the runner (``cleanup()`` it) and the URL."""
    from flexmesh.agent.api import AGENT_KEY

    app = web.Application()
    app[AGENT_KEY] = agent  # type: ignore[misc]  # a stand-in in tests
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, f"{_base_url(runner)}/metrics"


def _base_url(runner: web.AppRunner) -> str:
    addr = runner.addresses[0]
    host, port = str(addr[0]), int(addr[1])
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
