"""Real agents in network namespaces on one bridge (agent/fleetlab.py): over lossy,
rate-limited links they converge, elect one coordinator and lend a GPU; a partition gives
each side its own coordinator until it heals; nothing of the lab is left afterwards."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexmesh.agent.fleetlab import FleetLab, available
from flexmesh.agent.netlab import PREFIX, in_ns, ip, lab_namespaces

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[FleetLab]:
    why = available()
    if why is not None:
        pytest.skip(why)
    profile = getattr(request, "param", "local")
    with tempfile.TemporaryDirectory(prefix="flexmesh-lab-") as tmp, \
            FleetLab(Path(tmp), profile=profile) as lab:
        yield lab


def start_four(lab: FleetLab) -> list[str]:
    lab.start("a", sim="gpu:1x16GiB")
    lab.start("b", sim="gpu:1x16GiB", join=["a"], wait=False)
    lab.start("c", sim="gpu:1x16GiB", join=["a"], wait=False)
    lab.start("d", join=["a"], extra=["--priority", "10"], wait=False)  # no device
    for n in "bcd":
        lab.wait_ready(n, timeout=60)
    return ["a", "b", "c", "d"]


def finished(lab: FleetLab, node: str, job_id: str) -> dict[str, object] | None:
    job: dict[str, object] = lab.json(node, "show", job_id)
    return job if job["state"] in TERMINAL else None


def coordinators(lab: FleetLab, names: list[str]) -> set[str | None]:
    return {lab.coordinator(n) for n in names}


@pytest.mark.parametrize("lab", ["lan"], indirect=True)
def test_lossy_narrow_links_converge_and_lend_a_gpu(lab: FleetLab) -> None:
    names = start_four(lab)
    for n in names:
        lab.net.set_loss(n, 10)
        lab.net.set_rate(n, 2)
    h = lab.net.hosts["d"]
    assert "numgen random mod 100 < 10 drop" in in_ns(h.ns, "nft", "list", "ruleset")
    assert "tbf" in in_ns(h.ns, "tc", "qdisc", "show", "dev", "eth0")
    lab.wait_for("convergence", lambda: lab.converged(names), timeout=60, interval=0.5)
    assert coordinators(lab, names) == {"a"}
    res = lab.cli("d", "submit", "--gpu", "0.5", "--memory", "1GiB", "--kind", "gpu",
                  "-o", "json", "--", "sh", "-c", 'echo "ran on $FLEXMESH_DEVICE"')
    job_id = json.loads(res.stdout)["id"]
    job = lab.wait_for("the job to end", lambda: finished(lab, "d", job_id), timeout=60,
                       interval=0.5)
    assert job["state"] == "succeeded", job
    assert job["node"] in ("a", "b", "c")
    assert lab.cli("d", "logs", job_id).stdout == "ran on gpu0\n"


def test_partition_gives_each_side_a_coordinator_until_it_heals(lab: FleetLab) -> None:
    names = start_four(lab)
    lab.wait_for("convergence", lambda: lab.converged(names), timeout=60, interval=0.3)
    lab.net.partition(["a", "b"], ["c", "d"])
    # c and d keep a (suspect) as coordinator until they declare it dead, then elect c.
    lab.wait_for("a coordinator on each side",
                 lambda: lab.converged(["a", "b"]) and lab.converged(["c", "d"])
                 and coordinators(lab, ["c", "d"]) == {"c"}, timeout=60, interval=0.3)
    assert coordinators(lab, ["a", "b"]) == {"a"}
    lab.net.heal()
    lab.wait_for("one coordinator again", lambda: lab.converged(names), timeout=60,
                 interval=0.3)
    assert coordinators(lab, names) == {"a"}


def test_nothing_is_left_after_close(tmp_path: Path) -> None:
    why = available()
    if why is not None:
        pytest.skip(why)
    # What a lab killed before it could close leaves: namespaces named after a dead pid.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}{dead.pid}-0-sw"
    ip("netns", "add", stale)
    with FleetLab(tmp_path, profile="local") as lab:
        assert stale not in lab_namespaces()
        lab.start("a")
        lab.start("b", join=["a"])
        prefix = lab.net.prefix + "-"
        assert len(lab_namespaces(prefix)) == 3  # the switch and two hosts
        procs = [a.proc for a in lab.agents.values()]
    assert lab_namespaces(prefix) == []
    assert all(p is not None and p.poll() is not None for p in procs)
