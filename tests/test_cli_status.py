"""`flexmesh status` draws the running mesh; `flexmesh ui` prints the page's address;
/metrics is served on the socket."""

from __future__ import annotations

import urllib.request

import pytest

from flexmesh.agent.localmesh import LocalMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]



def test_status_ui_and_metrics_of_a_running_mesh(mesh: LocalMesh) -> None:
    mesh.start("alpha", sim="gpu:2x16GiB")
    mesh.start("bravo", sim="npu:1x32GiB", join=["alpha"])
    mesh.wait_for("convergence", lambda: mesh.converged(["alpha", "bravo"]))
    out = mesh.cli("bravo", "status").stdout
    for text in ("alpha", "bravo", "gpu0", "gpu1", "npu0", "coordinator"):
        assert text in out, (text, out)
    data = mesh.json("bravo", "status")
    assert {n["name"] for n in data["nodes"]} == {"alpha", "bravo"}
    assert len(data["devices"]) == 3

    url = mesh.cli("bravo", "ui").stdout.strip()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/ui")
    with urllib.request.urlopen(url.replace("/ui", "/ui/state"), timeout=10) as resp:
        state = resp.read().decode()
    assert "alpha" in state and "npu0" in state

    mesh.cli("alpha", "submit", "--wait", "--gpu", "0.5", "--", "true")
    from flexmesh.agent.cli import _UnixConnection

    conn = _UnixConnection(mesh.agents["alpha"].socket, 10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    assert 'flexmesh_members{state="alive"} 2.0' in text
    assert "flexmesh_scheduler_decision_seconds_count 1.0" in text
    jobs = [line for line in text.splitlines()
            if line.startswith("flexmesh_jobs{") and 'state="succeeded"' in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in jobs) == 1.0, jobs
