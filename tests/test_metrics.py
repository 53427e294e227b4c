"""Prometheus metrics of one agent: a real Node with sim devices behind a small stand-in for
the runtime, scraped through the collector, the socket's /metrics and the TCP listener."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from flexmesh.agent import api, metrics
from flexmesh.agent.devices.base import DeviceSample
from flexmesh.agent.devices.sim import parse_sim_devices
from flexmesh.agent.models import JobRecord
from flexmesh.agent.node import Call, Node, NodeConfig
from flexmesh.protocol.membership import DEAD, Member

MIB = 1 << 20


@dataclass
class StandIn:
    """What the collector reads of ``runtime.Agent``."""

    node: Node
    counters: dict[str, int] = field(default_factory=dict)
    addr: str = "127.0.0.1:7001"
    enforcement: str = "none"
    started_at: float = 1_700_000_000.0
    last_samples: dict[str, DeviceSample] = field(default_factory=dict)


def pump(node: Node, now: float) -> None:
    """Carry out the node's calls to itself (a mesh of one), as the runtime would."""
    for _ in range(20):
        calls = [e for e in node.drain() if isinstance(e, Call)]
        if not calls:
            return
        for call in calls:
            assert call.node == node.name
            node.call_result(call.call_id, node.handle_request(call.msg, now), "", now)


def job(job_id: str, compute: int, memory: int) -> JobRecord:
    return JobRecord(id=job_id, origin="alpha", command=["true"], compute_milli=compute,
                     memory_mib=memory)


@pytest.fixture
def agent() -> StandIn:
    node = Node(NodeConfig("alpha", "127.0.0.1:7001"), random.Random(1), 0.0)
    node.set_devices(parse_sim_devices("gpu:2x16GiB"), {"gpu0": (900, 14336)}, 0.0)
    node.tick(1.0)  # alone: elects itself
    pump(node, 1.0)
    node.submit(job("j1", 250, 4096), 1.0)  # fits: placed on this node and started
    pump(node, 1.0)
    node.job_started("j1", 4242, 1, 1.0)
    node.submit(job("j2", 1000, 64 * 1024), 1.0)  # fits nowhere: stays queued
    pump(node, 1.0)
    node.step_packet("127.0.0.1:9", b"\x00garbage", 1.0)
    node.membership.members["bravo"] = Member("bravo", "127.0.0.1:7002", state=DEAD)
    metrics.observe_decision(node.scheduler, 0.0003)
    metrics.observe_decision(node.scheduler, 0.02)
    return StandIn(node, counters={"packets_dropped_tampered": 3, "frames_dropped_oversized": 1},
                   last_samples={"gpu1": DeviceSample("gpu1", True, utilization_pct=40)})


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(agent: StandIn, process: bool = False) -> tuple[set[str], Samples]:
    body, content_type = metrics.render(agent, process=process)
    assert content_type.startswith("text/plain")
    return parse(body.decode())


def parse(text: str) -> tuple[set[str], Samples]:
    names: set[str] = set()
    samples: Samples = {}
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return names, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_the_families_an_operator_expects_are_there(agent: StandIn) -> None:
    names, _ = scrape(agent)
    for fam in ("members", "membership_probes", "membership_suspicions",
                "membership_refutations", "packets_dropped", "frames_dropped",
                "election_term", "is_coordinator", "scheduler_queue_length",
                "scheduler_placements", "scheduler_refusals", "preemptions",
                "scheduler_decision_seconds", "device_capacity_compute_milli",
                "device_leased_compute_milli", "device_lendable_compute_milli",
                "device_capacity_memory_bytes", "device_leased_memory_bytes",
                "device_lendable_memory_bytes", "device_utilization_ratio", "jobs"):
        assert f"flexmesh_{fam}" in names, fam


def test_membership_and_election(agent: StandIn) -> None:
    _, s = scrape(agent)
    assert value(s, "flexmesh_members", state="alive") == 1
    assert value(s, "flexmesh_members", state="dead") == 1
    assert value(s, "flexmesh_members", state="suspect") == 0
    assert value(s, "flexmesh_packets_dropped_total", reason="malformed") == 1
    assert value(s, "flexmesh_packets_dropped_total", reason="tampered") == 3
    assert value(s, "flexmesh_frames_dropped_total", reason="oversized") == 1
    assert value(s, "flexmesh_election_term") == 1
    assert value(s, "flexmesh_is_coordinator") == 1
    assert value(s, "flexmesh_coordinator_info", coordinator="alpha") == 1
    assert value(s, "flexmesh_agent_info", node="alpha", address="127.0.0.1:7001",
                 enforcement="none") == 1


def test_scheduling_and_jobs(agent: StandIn) -> None:
    _, s = scrape(agent)
    assert value(s, "flexmesh_scheduler_queue_length") == 1
    assert value(s, "flexmesh_scheduler_placements_total") == 1
    assert value(s, "flexmesh_scheduler_refusals_total") == 0
    assert value(s, "flexmesh_preemptions_total", cause="reclaim") == 0
    assert value(s, "flexmesh_preemptions_total", cause="priority") == 0
    assert value(s, "flexmesh_scheduler_preemptions_ordered_total") == 0
    assert value(s, "flexmesh_jobs", state="running", role="both") == 1
    assert value(s, "flexmesh_jobs", state="queued", role="origin") == 1
    assert value(s, "flexmesh_jobs", state="succeeded", role="origin") == 0
    hist = "flexmesh_scheduler_decision_seconds"
    assert value(s, f"{hist}_count") == 2
    assert value(s, f"{hist}_sum") == pytest.approx(0.0203)
    assert value(s, f"{hist}_bucket", le="0.0001") == 0
    assert value(s, f"{hist}_bucket", le="0.0005") == 1
    assert value(s, f"{hist}_bucket", le="0.025") == 2
    assert value(s, f"{hist}_bucket", le="+Inf") == 2


def test_devices(agent: StandIn) -> None:
    _, s = scrape(agent)
    placed = agent.node.origin.jobs["j1"].devices[0]
    other = "gpu1" if placed == "gpu0" else "gpu0"
    g0 = {"node": "alpha", "device": "gpu0"}
    assert value(s, "flexmesh_device_capacity_compute_milli", **g0) == 1000
    assert value(s, "flexmesh_device_capacity_memory_bytes", **g0) == 16384 * MIB
    assert value(s, "flexmesh_device_leased_compute_milli", node="alpha", device=placed) == 250
    assert value(s, "flexmesh_device_leased_memory_bytes", node="alpha",
                 device=placed) == 4096 * MIB
    assert value(s, "flexmesh_device_leased_compute_milli", node="alpha", device=other) == 0
    lend_c, lend_m = (900, 14336) if placed == "gpu0" else (1000, 16384)
    assert value(s, "flexmesh_device_lendable_compute_milli", node="alpha",
                 device=placed) == lend_c - 250
    assert value(s, "flexmesh_device_lendable_memory_bytes", node="alpha",
                 device=placed) == (lend_m - 4096) * MIB
    assert value(s, "flexmesh_device_healthy", **g0) == 1
    assert value(s, "flexmesh_device_info", **g0, kind="gpu", model="sim-gpu-16GiB",
                 backend="sim") == 1
    assert value(s, "flexmesh_device_utilization_ratio", node="alpha", device="gpu1") == 0.4
    assert ("flexmesh_device_utilization_ratio", frozenset(g0.items())) not in s


def test_scrapes_read_the_state_of_the_moment(agent: StandIn) -> None:
    _, before = scrape(agent)
    agent.node.job_exited("j1", 0, "", 2.0)
    agent.counters["packets_dropped_tampered"] += 1
    _, after = scrape(agent)
    assert value(before, "flexmesh_jobs", state="running", role="both") == 1
    assert value(after, "flexmesh_jobs", state="running", role="both") == 0
    assert value(after, "flexmesh_jobs", state="succeeded", role="both") == 1
    assert value(after, "flexmesh_packets_dropped_total", reason="tampered") == 4
    assert sum(v for (n, _), v in after.items()
               if n == "flexmesh_device_leased_compute_milli") == 0


def test_decision_times_belong_to_one_scheduler(agent: StandIn) -> None:
    other = Node(NodeConfig("bravo", "127.0.0.1:7002"), random.Random(2), 0.0)
    metrics.observe_decision(other.scheduler, 1.0)
    assert metrics.decision_times(other.scheduler).count == 1
    assert metrics.decision_times(agent.node.scheduler).count == 2
    _, s = scrape(StandIn(other))
    assert value(s, "flexmesh_scheduler_decision_seconds_count") == 1


def test_decision_buckets() -> None:
    times = metrics.DecisionTimes([0.1, 1.0])
    for x in (0.05, 0.1, 0.5, 3.0, -1.0):
        times.observe(x)
    assert times.cumulative() == [("0.1", 3.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert times.count == 5 and times.total == pytest.approx(3.65)


def test_process_metrics_come_along(agent: StandIn) -> None:
    names, _ = scrape(agent, process=True)
    assert "flexmesh_process_resident_memory_bytes" in names


def test_openmetrics_when_asked(agent: StandIn) -> None:
    body, content_type = metrics.render(agent, "application/openmetrics-text", process=False)
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF")


async def get(url: str, connector: aiohttp.BaseConnector | None = None) -> tuple[int, str, str]:
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as resp:
        return resp.status, resp.headers["Content-Type"], await resp.text()


async def test_metrics_on_the_socket(agent: StandIn, tmp_path: Path) -> None:
    app = api.make_app(agent)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    path = str(tmp_path / "agent.sock")
    await web.UnixSite(runner, path).start()
    try:
        status, ctype, text = await get("http://localhost/metrics",
                                        aiohttp.UnixConnector(path=path))
    finally:
        await runner.cleanup()
    assert status == 200 and ctype.startswith("text/plain")
    _, s = parse(text)
    assert value(s, "flexmesh_scheduler_placements_total") == 1


async def test_metrics_on_tcp(agent: StandIn) -> None:
    runner, url = await metrics.start_tcp_metrics(agent)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        status, _, text = await get(url)
    finally:
        await runner.cleanup()
    assert status == 200
    names, s = parse(text)
    assert value(s, "flexmesh_is_coordinator") == 1
    assert "flexmesh_process_cpu_seconds" in names


def test_the_readme_lists_exactly_the_families_served(agent: StandIn) -> None:
    """The operator's table in README.md and the page agree (process_* aside)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = readme.split("The families, all prefixed `flexmesh_`:", 1)[1].lstrip("\n")
    table = after.split("\n\n", 1)[0]
    listed: set[str] = set()
    for tok in re.findall(r"`([^`]+)`", table):
        m = re.fullmatch(r"([a-z_]*)\{([a-z,]+)\}([a-z_]+)", tok)  # name_{a,b}_rest
        parts = ([f"{m[1]}{x}{m[3]}" for x in m[2].split(",")] if m
                 else [re.sub(r"\{.*\}$", "", tok)])  # name{labels}
        listed.update(p.removesuffix("_total") for p in parts if re.fullmatch("[a-z_]+", p))
    names, _ = scrape(agent)
    served = {n.removeprefix("flexmesh_") for n in names
              if not n.startswith("flexmesh_process_")}
    assert listed == served, (sorted(listed - served), sorted(served - listed))
