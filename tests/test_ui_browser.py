"""The live web page in a real browser: a two-agent mesh on loopback (one agent process from
LocalMesh, one Agent in this process serving the page), opened in headless Chromium.

Skipped only where ``/usr/bin/chromium`` is missing; ``.ci/run`` installs Debian's
``chromium`` so that it runs in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from flexmesh.agent import api
from flexmesh.agent.config import Settings
from flexmesh.agent.localmesh import LocalMesh
from flexmesh.agent.models import JobRecord
from flexmesh.agent.runtime import Agent
from flexmesh.agent.ui import start_ui

CHROMIUM = "/usr/bin/chromium"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
]


async def until(what: str, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def mesh_agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """alpha-node (a process, two sim GPUs) and bravo-node (this process, one sim NPU)."""
    mesh = LocalMesh(tmp_path / "mesh")
    agent: Agent | None = None
    try:
        alpha = await asyncio.to_thread(mesh.start, "alpha-node", "gpu:2x16GiB")
        settings = Settings(
            name="bravo-node", bind="127.0.0.1:0", join=[alpha.addr],
            socket=str(tmp_path / "bravo.sock"), state_dir=str(tmp_path / "bravo"),
            profile="local", sim_devices="npu:1x32GiB", nvml=False,
            key_file=str(mesh.key_file),
        )
        agent = Agent(settings)
        await agent.start()
        node = agent.node
        await until("both nodes alive and all three devices seen", lambda: (
            sum(n["state"] == "alive" for n in node.views.nodes()) == 2
            and len(node.views.devices()) == 3 and node.belief.coordinator is not None))
        yield agent
    finally:
        if agent is not None:
            await agent.stop()
        await asyncio.to_thread(mesh.close)


async def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after Chromium has run it for a few (virtual) seconds."""
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        "--virtual-time-budget=3000", "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 45)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def _submit(agent: Agent, job_id: str, command: list[str], **fields: Any) -> JobRecord:
    job = JobRecord(id=job_id, origin=agent.node.name, command=command, compute_milli=250,
                    memory_mib=fields.pop("memory_mib", 1024), **fields)
    await agent.submit(job)
    return job


def data_values(dom: str, attr: str) -> set[str]:
    return {html.unescape(v) for v in re.findall(rf'data-{attr}="([^"]*)"', dom)}


async def test_the_page_shows_the_nodes_and_devices_of_a_running_mesh(
        mesh_agent: Agent, tmp_path: Path) -> None:
    # Work to show: a job running on bravo's NPU, one that ended, one that can never fit.
    running = await _submit(mesh_agent, "run1", ["sleep", "30"], kind="npu")
    ended = await _submit(mesh_agent, "end1", ["false"], kind="npu")
    waiting = await _submit(mesh_agent, "wait1", ["true"], kind="npu", memory_mib=1 << 20)
    jobs = mesh_agent.node.origin.jobs
    await until("the jobs to run and end", lambda: (
        jobs[running.id].state == "running" and jobs[ended.id].terminal
        and jobs[waiting.id].reason != ""))
    mesh_agent.count("packets_dropped_unknown_key", 3)
    runner, url = await start_ui(mesh_agent)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/ui")
        dom = await dump_dom(url, tmp_path / "chromium")
    finally:
        await runner.cleanup()
        await mesh_agent.cancel(running.id)
    work = {k: re.search(rf'<section data-work="{k}">.*?</section>', dom, re.S)
            for k in ("queued", "running", "ended", "dropped")}
    assert all(work.values()), work
    assert 'data-job="wait1"' in work["queued"].group(0)  # type: ignore[union-attr]
    assert 'data-job="run1"' in work["running"].group(0)  # type: ignore[union-attr]
    assert 'data-job="end1"' in work["ended"].group(0)  # type: ignore[union-attr]
    assert "unknown_key: 3" in work["dropped"].group(0)  # type: ignore[union-attr]
    assert data_values(dom, "jobs") == {"run1"}  # on bravo-node/npu0
    assert "sleep 30" not in dom  # never a command
    assert data_values(dom, "node") == {"alpha-node", "bravo-node"}
    assert data_values(dom, "device") == {"alpha-node/gpu0", "alpha-node/gpu1",
                                          "bravo-node/npu0"}
    coordinator = mesh_agent.node.belief.coordinator
    section = re.search(rf'<section class="node" data-node="{coordinator}">.*?</section>', dom,
                        re.S)
    assert section is not None and "coordinator" in section.group(0)
    error = re.search(r'<div id="error"[^>]*>([^<]*)</div>', dom)
    assert error is not None and error.group(1) == ""
    assert "bravo-node" in re.sub(r"<[^>]+>", "", dom.split('id="me"', 1)[1])[:40]


async def test_state_and_host_check(mesh_agent: Agent) -> None:
    runner, url = await start_ui(mesh_agent)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/state") as resp:
                assert resp.status == 200
                state = await resp.json()
            async with session.get(url) as resp:
                assert resp.status == 200
                assert "script-src 'sha256-" in resp.headers["Content-Security-Policy"]
            # A page that rebinds its DNS name to 127.0.0.1 must not read the mesh.
            async with session.get(url + "/state", headers={"Host": "evil.example"}) as resp:
                assert resp.status == 403
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
    assert state["status"]["name"] == "bravo-node"
    assert {n["name"] for n in state["nodes"]} == {"alpha-node", "bravo-node"}
    assert {(d["node"], d["id"]) for d in state["devices"]} == {
        ("alpha-node", "gpu0"), ("alpha-node", "gpu1"), ("bravo-node", "npu0")}


async def test_the_page_on_the_agents_socket(mesh_agent: Agent, tmp_path: Path) -> None:
    runner = web.AppRunner(api.make_app(mesh_agent))
    await runner.setup()
    path = str(tmp_path / "api.sock")
    await web.UnixSite(runner, path).start()
    try:
        connector = aiohttp.UnixConnector(path=path)
        async with aiohttp.ClientSession(connector=connector) as session:
            for page in ("/ui", "/ui/"):
                async with session.get(f"http://localhost{page}") as resp:
                    assert resp.status == 200 and "<title>flexmesh</title>" in await resp.text()
            async with session.get("http://localhost/ui/state") as resp:
                state = await resp.json()
    finally:
        await runner.cleanup()
    assert len(state["devices"]) == 3 and state["status"]["coordinator"] in (
        "alpha-node", "bravo-node")


async def test_the_page_shows_a_battery(mesh_agent: Agent, tmp_path: Path) -> None:
    level = tmp_path / "battery"
    level.write_text("18 discharging")
    # As a reload would: the sampler reads the battery with the settings of the moment.
    mesh_agent.settings.power_source = "file"
    mesh_agent.settings.power_path = str(level)
    await until("the battery read", lambda: mesh_agent.node.power.fact() is not None)
    runner, url = await start_ui(mesh_agent)
    try:
        dom = await dump_dom(url, tmp_path / "chromium")
    finally:
        await runner.cleanup()
    assert data_values(dom, "battery") == {"18"}  # bravo-node's; alpha-node is on mains
    section = re.search(r'<section class="node" data-node="bravo-node">.*?</section>', dom,
                        re.S)
    assert section is not None
    assert "battery 18% \u00b7 not lending (floor 25%)" in html.unescape(section.group(0))
