"""A radio shadow with real agents (agent/fleetlab.py): the owner of a borrowed job, submitted
on a node without devices, is cut off from everyone by a partition while the job runs.

- A shadow shorter than ``[jobs] owner_dead_grace`` (and than the owner's
  ``orphan_limit``): the origin declares the owner dead, keeps following the job, and once
  the owner is back the job ends once, there, with its whole output at the origin.
- A shadow longer than the grace: the owner stops its run (``orphan_limit``), the origin
  requeues the job, it runs on the other GPU node, and exactly one result is delivered:
  succeeded, with the second run's output only.

What really ran is told by marker lines the job writes (one shell, one run), not by the
agents. The README's "Jobs that outlive a radio shadow" states the rules.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flexmesh.agent.fleetlab import FleetLab, available

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")


@contextmanager
def shadow_lab(grace: float, orphan: float) -> Iterator[tuple[FleetLab, Path]]:
    why = available()
    if why is not None:
        pytest.skip(why)
    with tempfile.TemporaryDirectory(prefix="flexmesh-lab-") as tmp, \
            FleetLab(Path(tmp), profile="local") as lab:
        lab.config.write_text(f'ui = ""\n[log]\nformat = "json"\n[jobs]\n'
                              f"owner_dead_grace = {grace}\norphan_limit = {orphan}\n")
        # Jobs borrowed from another node run as borrowed_user (nobody): markers it can write.
        os.chmod(tmp, 0o755)
        markers = Path(tmp) / "markers"
        markers.mkdir()
        os.chmod(markers, 0o1777)
        lab.start("a", sim="gpu:1x16GiB")
        lab.start("b", sim="gpu:1x16GiB", join=["a"], wait=False)
        lab.start("d", join=["a"], extra=["--priority", "10"], wait=False)  # no device
        for n in "bd":
            lab.wait_ready(n, timeout=60)
        lab.wait_for("convergence", lambda: lab.converged(["a", "b", "d"]), timeout=60,
                     interval=0.3)
        yield lab, markers / "runs"


def submit(lab: FleetLab, markers: Path, lines: int) -> str:
    """A job of ``lines`` lines of output, one a second, each naming its run (shell pid)."""
    script = (f'echo "$$ start" >> {markers}; i=1; while [ $i -le {lines} ]; do '
              f'echo "line $i of $$"; sleep 1; i=$((i+1)); done; echo "$$ end" >> {markers}')
    res = lab.cli("d", "submit", "--gpu", "1", "--memory", "1GiB", "--kind", "gpu", "-o",
                  "json", "--", "sh", "-c", script)
    job_id: str = json.loads(res.stdout)["id"]
    # Running elsewhere, and followed: its first line is at the origin.
    lab.wait_for("the first line at the origin",
                 lambda: lab.cli("d", "logs", job_id).stdout.startswith("line 1 "),
                 timeout=30, interval=0.2)
    return job_id


def runs(markers: Path) -> dict[str, list[str]]:
    """Run (shell pid) -> its marker words, runs in the order they started."""
    out: dict[str, list[str]] = {}
    for line in markers.read_text().splitlines():
        pid, what = line.split()
        out.setdefault(pid, []).append(what)
    return out


def expected(pid: str, lines: int) -> str:
    return "".join(f"line {i} of {pid}\n" for i in range(1, lines + 1))


def show(lab: FleetLab, job_id: str) -> dict[str, object]:
    job: dict[str, object] = lab.json("d", "show", job_id)
    return job


def ended(lab: FleetLab, job_id: str) -> dict[str, object] | None:
    job = show(lab, job_id)
    return job if job["state"] in TERMINAL else None


def test_a_shadow_shorter_than_the_grace_costs_nothing() -> None:
    # The owner is back within both limits (a shadow of 6 s, and up to 10 s to rejoin).
    with shadow_lab(grace=40, orphan=25) as (lab, markers):
        job_id = submit(lab, markers, lines=14)
        owner = str(show(lab, job_id)["node"])
        assert owner in ("a", "b")
        cut_at = time.monotonic()
        lab.net.partition([owner], [n for n in ("a", "b", "d") if n != owner])
        # The origin declares the owner dead, and keeps the job running, followed.
        job = lab.wait_for("the owner declared dead at the origin",
                           lambda: (j := show(lab, job_id))["reason"] and j, timeout=15,
                           interval=0.2)
        assert job["state"] == "running" and "out of reach" in str(job["reason"]), job
        time.sleep(max(0.0, 6.0 - (time.monotonic() - cut_at)))  # the shadow's length
        lab.net.heal()
        job = lab.wait_for("the job to end", lambda: ended(lab, job_id), timeout=60,
                           interval=0.3)
        assert job["state"] == "succeeded" and job["node"] == owner, job
        (pid, words), = runs(markers).items()  # one run, which went on through the shadow
        assert words == ["start", "end"]
        assert lab.cli("d", "logs", job_id).stdout == expected(pid, 14)


def test_a_shadow_longer_than_the_grace_gives_one_run_at_a_time_and_one_result() -> None:
    with shadow_lab(grace=10, orphan=5) as (lab, markers):
        job_id = submit(lab, markers, lines=8)
        owner = str(show(lab, job_id)["node"])
        other = "b" if owner == "a" else "a"
        lab.net.partition([owner], [other, "d"])
        # The owner stops its run (no JobSync for 5 s); the origin requeues the job after
        # 10 s of grace and it runs on the other GPU node, while the owner is still away.
        job = lab.wait_for("the job placed on the other node",
                           lambda: (j := show(lab, job_id))["node"] == other and j,
                           timeout=40, interval=0.3)
        first = next(iter(runs(markers)))  # the run on the owner (markers are in order)
        assert runs(markers)[first] == ["start"]  # stopped: it never ended
        lab.net.heal()
        job = lab.wait_for("the job to end", lambda: ended(lab, job_id), timeout=60,
                           interval=0.3)
        assert job["state"] == "succeeded" and job["node"] == other, job
        done = runs(markers)
        assert len(done) == 2 and done[first] == ["start"], done
        (second,) = [pid for pid, words in done.items() if words == ["start", "end"]]
        assert lab.cli("d", "logs", job_id).stdout == expected(second, 8)
        # The owner's books: its run ended preempted, by its own orphan rule.
        (run,) = [r for r in lab.json(owner, "jobs", "--here") if r["id"] == job_id]
        assert run["state"] == "preempted" and "did not ask after it" in run["reason"], run
