"""A fleet of eight real agents (agent/fleetlab.py) split into two groups of four, each with
three GPU nodes and a node without devices that submits: each side elects a coordinator of
its own and runs its jobs on its own GPUs; once the partition heals there is one
coordinator, no device is ever leased beyond its capacity (the devices' leased fractions,
sampled on every node while jobs from both sides run into the heal and more are queued),
and every job ends once, succeeded: one run of it on one owner, its output once."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flexmesh.agent.cli import get_json
from flexmesh.agent.fleetlab import FleetLab, available

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")
SIDES = {"d": ["a", "b", "c", "d"], "h": ["e", "f", "g", "h"]}  # submitter -> its side
ALL = [*SIDES["d"], *SIDES["h"]]
GPU = [n for n in ALL if n not in SIDES]


@pytest.fixture
def lab() -> Iterator[FleetLab]:
    why = available()
    if why is not None:
        pytest.skip(why)
    with tempfile.TemporaryDirectory(prefix="flexmesh-lab-") as tmp, \
            FleetLab(Path(tmp), profile="lan") as lab:
        lab.start("a", sim="gpu:1x16GiB")
        for n in ALL[1:]:
            if n in SIDES:  # no device, and never the coordinator
                lab.start(n, join=["a"], extra=["--priority", "10"], wait=False)
            else:
                lab.start(n, sim="gpu:1x16GiB", join=["a"], wait=False)
        for n in ALL[1:]:
            lab.wait_ready(n, timeout=60)
        lab.wait_for("convergence", lambda: lab.converged(ALL), timeout=60, interval=0.5)
        yield lab


def submit(lab: FleetLab, node: str, seconds: float, text: str) -> str:
    res = lab.cli(node, "submit", "--gpu", "1", "--memory", "1GiB", "--kind", "gpu", "-o",
                  "json", "--", "sh", "-c", f"sleep {seconds}; echo '{text}'")
    job_id: str = json.loads(res.stdout)["id"]
    return job_id


def job(lab: FleetLab, origin: str, job_id: str) -> dict[str, Any]:
    info: dict[str, Any] = get_json(lab.agents[origin].socket, f"/v1/jobs/{job_id}") or {}
    return info


def all_in(lab: FleetLab, jobs: dict[str, str], states: tuple[str, ...]) -> bool:
    return all(job(lab, origin, j).get("state") in states for j, origin in jobs.items())


def coordinators(lab: FleetLab, names: list[str]) -> set[str | None]:
    return {lab.coordinator(n) for n in names}


def over_leased(lab: FleetLab) -> list[dict[str, Any]]:
    """Every device, as any node sees it, leased beyond its capacity."""
    bad = []
    for n in ALL:
        for d in get_json(lab.agents[n].socket, "/v1/devices") or []:
            if d["leased_compute_milli"] > d["compute_milli"] \
                    or d["leased_memory_mib"] > d["memory_mib"]:
                bad.append({"seen_on": n, **d})
    return bad


def test_a_split_fleet_runs_on_both_sides_and_heals_without_over_leasing(
        lab: FleetLab) -> None:
    lab.net.partition(SIDES["d"], SIDES["h"])
    # e's side may name b, c or d (suspect) for a while: a coordinator keeps the role
    # while merely suspect, and the next is chosen among those still alive.
    lab.wait_for("a coordinator on each side, of that side",
                 lambda: lab.converged(SIDES["d"]) and lab.converged(SIDES["h"])
                 and coordinators(lab, SIDES["d"]) == {"a"}
                 and coordinators(lab, SIDES["h"]) == {"e"}, timeout=60, interval=0.5)
    texts: dict[str, str] = {}  # job -> its output
    origin: dict[str, str] = {}  # job -> where it was submitted

    def add(sub: str, seconds: float) -> str:
        text = f"job {len(texts)} from {sub}"
        j = submit(lab, sub, seconds, text)
        texts[j], origin[j] = text + "\n", sub
        return j

    # A job on each side, run there while the sides cannot see each other.
    short = {add(sub, 0.5): sub for sub in SIDES}
    lab.wait_for("both sides' jobs to end", lambda: all_in(lab, short, TERMINAL),
                 timeout=30, interval=0.3)
    for j, sub in short.items():
        info = job(lab, sub, j)
        assert info["state"] == "succeeded" and info["node"] in SIDES[sub], info
    # Each side fills its three GPUs with jobs that run on into the heal.
    held = {add(sub, 8): sub for sub in SIDES for _ in range(3)}
    lab.wait_for("every GPU busy", lambda: all_in(lab, held, ("running",)), timeout=30,
                 interval=0.3)
    assert all(job(lab, sub, j)["node"] in SIDES[sub] for j, sub in held.items())
    lab.net.heal()
    # Two more whole GPUs, asked for while all six are held: they wait for one to free.
    later = {add("d", 1): "d" for _ in range(2)}
    lab.wait_for("one coordinator again", lambda: lab.converged(ALL), timeout=60,
                 interval=0.5)
    assert coordinators(lab, ALL) == {"a"}

    def ended_and_within_capacity() -> bool:
        assert over_leased(lab) == []
        return all_in(lab, origin, TERMINAL)

    lab.wait_for("every job to end", ended_and_within_capacity, timeout=60, interval=0.5)
    assert over_leased(lab) == []
    assert len(origin) == 10 and set(later) <= set(origin)
    for j, sub in origin.items():
        info = job(lab, sub, j)
        assert info["state"] == "succeeded", info
        assert lab.cli(sub, "logs", j).stdout == texts[j]
    for sub in SIDES:  # each origin lists each of its jobs once
        listed = [r["id"] for r in get_json(lab.agents[sub].socket, "/v1/jobs")]
        assert sorted(listed) == sorted(j for j, o in origin.items() if o == sub), listed
    # The owners' books: each job ran exactly once, on one GPU node, and succeeded there.
    runs = [(n, r) for n in GPU for r in get_json(lab.agents[n].socket, "/v1/jobs?here=1")
            if r["id"] in origin]
    assert sorted(r["id"] for _, r in runs) == sorted(origin), runs
    assert all(r["state"] == "succeeded" for _, r in runs), runs
