"""A real agent on fake Ascend hardware: its NPUs come from the fake npu-smi (which keeps
its vNPUs in a file), its container runtime is a fake ``podman`` that records each ``run``
and checks that the vNPU it is handed exists and is bound while the container runs.

An NPU fraction in a container is leased as its template, gets a vNPU made before the
container and destroyed after it (also when the container fails); a fraction as a plain
process gets none and ``flexmesh devices`` says so; a restarted agent destroys the vNPUs
of runs that are gone, and no one else's."""

from __future__ import annotations

import fcntl
import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from flexmesh.agent.localmesh import LocalMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FAKE_NPU_SMI = Path(__file__).parent / "fake_npu_smi.py"
TERMINAL = ("succeeded", "failed", "cancelled", "preempted", "lost")
CHIPS: list[dict[str, Any]] = [
    {"npu": n, "chip": 0, "phy": n + 4, "logic": n, "name": "910B3", "cores": 20,
     "memory_mib": 65536} for n in (0, 1)]

# The fake podman: `info`, `ps`, `stop`, `rm` answer; `run` appends its argv and env file
# to the log, fails (125) when told to or when a vNPU it is given is not there, else binds
# the vNPU for the container's life and prints what the command would.
PODMAN = r'''#!PYTHON
import fcntl, json, re, signal, sys, time
from pathlib import Path
conf = json.loads((Path(__file__).parent / "podman.json").read_text())
args = sys.argv[1:]
if not args or args[0] != "run":
    sys.exit(0)
env_file = args[args.index("--env-file") + 1]
with open(conf["log"], "a") as log:
    log.write(json.dumps({"argv": args, "env": Path(env_file).read_text()}) + "\n")
state_path = Path(conf["npu_smi_state"])
ids = [m.group(1) for a in args if (m := re.fullmatch(r"/dev/vdavinci(\d+):/dev/davinci\1", a))]
def bind(flag):
    with open(state_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(state_path.read_text())
        missing = [i for i in ids if i not in state["vnpus"]]
        for i in ids:
            if i in state["vnpus"]:
                state["vnpus"][i]["bound"] = flag
        tmp = state_path.with_name(".podman.tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(state_path)
    return missing
if Path(conf["fail"]).exists():
    print("Error: crun: cannot stat /dev/vdavinci: No such device", file=sys.stderr)
    sys.exit(125)
missing = bind(True)
if missing:
    print(f"Error: no vNPU {missing}", file=sys.stderr)
    sys.exit(125)
def stopped(signum, frame):  # the container stopped: its vNPU is free again
    bind(False)
    sys.exit(143)
signal.signal(signal.SIGTERM, stopped)
print(f"in a container on vNPU {','.join(ids) or 'none'}", flush=True)
time.sleep(float(conf["sleep"]))
bind(False)
'''


class FakeHost:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.dev = root / "dev"
        self.dev.mkdir()
        for c in CHIPS:
            (self.dev / f"davinci{c['phy']}").touch()
        self.state_file = root / "npu-smi.json"
        self.state_file.write_text(json.dumps({"chips": CHIPS, "vnpus": {}}))
        self.log = root / "podman.log"
        self.log.touch()
        self.fail = root / "podman.fail"
        podman = self.bin / "podman"
        podman.write_text(PODMAN.replace("PYTHON", sys.executable, 1))
        podman.chmod(podman.stat().st_mode | stat.S_IXUSR)
        (self.bin / "podman.json").write_text(json.dumps({
            "log": str(self.log), "npu_smi_state": str(self.state_file),
            "fail": str(self.fail), "sleep": 1.0}))

    def set_sleep(self, seconds: float) -> None:
        conf = json.loads((self.bin / "podman.json").read_text())
        (self.bin / "podman.json").write_text(json.dumps({**conf, "sleep": seconds}))

    def config(self, mesh: LocalMesh, name: str) -> list[str]:
        path = mesh.root / f"{name}.toml"
        path.write_text(f'[devices]\nnpu_smi = "{FAKE_NPU_SMI}"\nnpu_dev_dir = "{self.dev}"\n'
                        'nvml = false\njetson = "off"\n[containers]\nruntime = "podman"\n')
        return ["--config", str(path)]

    def env(self) -> dict[str, str]:
        import os

        return {"PATH": f"{self.bin}:{os.environ['PATH']}",
                "FAKE_NPU_SMI_STATE": str(self.state_file)}

    def add_vnpus(self, vnpus: dict[str, dict[str, Any]]) -> None:
        """vNPUs made by someone else, written as the fake writes (the agent's sampling
        calls npu-smi meanwhile)."""
        with open(self.state_file.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads(self.state_file.read_text())
            state["vnpus"].update(vnpus)
            tmp = self.root / ".test.tmp"
            tmp.write_text(json.dumps(state))
            tmp.replace(self.state_file)

    @property
    def vnpus(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state_file.read_text())["vnpus"]
        return data

    def calls(self, kind: str) -> list[list[str]]:
        calls = json.loads(self.state_file.read_text())["calls"]
        return [c for c in calls if len(c) > 2 and c[2] == kind]

    def runs(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log.read_text().splitlines()]


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "host")


def _ended(mesh: LocalMesh, node: str, job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = mesh.json(node, "show", job_id)
    return job if job["state"] in TERMINAL else None


def _submit(mesh: LocalMesh, node: str, *argv: str) -> str:
    res = mesh.cli(node, "submit", "--kind", "npu", "-o", "json", *argv)
    job_id: str = json.loads(res.stdout)["id"]
    return job_id


def _start(mesh: LocalMesh, host: FakeHost) -> None:
    mesh.start("box", extra=host.config(mesh, "box"), env=host.env())
    mesh.wait_for("the NPUs, with vNPUs for containers", lambda: [
        d["enforcement"] for d in mesh.json("box", "devices")] == ["vnpu", "vnpu"], 60)


def test_an_npu_fraction_in_a_container_runs_on_a_vnpu_of_its_template(
        mesh: LocalMesh, host: FakeHost) -> None:
    _start(mesh, host)
    job_id = _submit(mesh, "box", "--compute", "20", "--memory", "1GiB", "--image",
                     "localhost/img", "--", "run-model")
    job = mesh.wait_for("the job to end", lambda: _ended(mesh, "box", job_id), 60)
    assert job["state"] == "succeeded", job
    (run,) = host.runs()
    vid = next(a.split(":")[0].removeprefix("/dev/vdavinci") for a in run["argv"]
               if a.startswith("/dev/vdavinci"))
    first = 100 + 16 * CHIPS[int(job["device"][3:])]["phy"]
    assert int(vid) in range(first, first + 16)  # the chip's range, by its physical id
    assert f"/dev/davinci{int(job['device'][3:])}" not in run["argv"]  # not the whole NPU
    env = dict(line.split("=", 1) for line in run["env"].splitlines())
    assert env["FLEXMESH_COMPUTE_MILLI"] == "250"  # leased as vir05_1c_16g: 5 of 20 cores
    assert env["FLEXMESH_MEMORY_MIB"] == "16384"
    assert env["ASCEND_RT_VISIBLE_DEVICES"] == "0" and env["ASCEND_VISIBLE_DEVICES"] == vid
    assert mesh.cli("box", "logs", job_id).stdout.strip() == f"in a container on vNPU {vid}"
    (create,) = host.calls("create-vnpu")
    assert create[create.index("-f") + 1] == "vir05_1c_16g"
    records = mesh.agents["box"].dir / "state" / "vnpus.json"
    mesh.wait_for("its vNPU to be destroyed, and its record",
                  lambda: json.loads(records.read_text()) == [], 30)
    assert not host.vnpus and len(host.calls("destroy-vnpu")) == 1


def test_a_cancelled_container_job_gives_its_vnpu_back(
        mesh: LocalMesh, host: FakeHost) -> None:
    _start(mesh, host)
    host.set_sleep(120)
    job_id = _submit(mesh, "box", "--compute", "50", "--image", "localhost/img", "--", "x")
    mesh.wait_for("the container to run", lambda: "in a container on vNPU" in mesh.cli(
        "box", "logs", job_id).stdout, 60)
    ((vid, v),) = host.vnpus.items()
    assert v["bound"] and v["template"] == "vir10_3c_32g"
    row = next(d for d in mesh.json("box", "devices") if job_id in (d["jobs"] or []))
    assert row["leased_compute_milli"] == 500 and row["job_enforcement"] == {job_id: "vnpu"}
    mesh.cli("box", "cancel", job_id)
    job = mesh.wait_for("the job to end", lambda: _ended(mesh, "box", job_id), 60)
    assert job["state"] == "cancelled", job
    records = mesh.agents["box"].dir / "state" / "vnpus.json"
    mesh.wait_for("its vNPU to be destroyed, and its record",
                  lambda: json.loads(records.read_text()) == [], 30)
    assert not host.vnpus
    (destroy,) = host.calls("destroy-vnpu")
    assert destroy[-1] == vid


def test_a_failed_container_and_a_full_chip_leave_no_vnpu(
        mesh: LocalMesh, host: FakeHost) -> None:
    _start(mesh, host)
    host.fail.touch()  # podman cannot start the container
    job_id = _submit(mesh, "box", "--compute", "40", "--image", "localhost/img", "--", "x")
    job = mesh.wait_for("the job to end", lambda: _ended(mesh, "box", job_id), 60)
    assert job["state"] == "failed", job
    assert len(host.calls("create-vnpu")) == 1
    mesh.wait_for("its vNPU to be destroyed", lambda: not host.vnpus, 30)
    # Someone else's vNPUs fill both chips (as the books could not know): the create is
    # refused and the job fails saying so.
    host.add_vnpus({str(base + n): {"npu": c["npu"], "chip": 0, "template": "vir10_3c_32g",
                                    "bound": True}
                    for n, c in enumerate(CHIPS) for base in (200, 210)})
    job_id = _submit(mesh, "box", "--compute", "20", "--image", "localhost/img", "--", "x")
    job = mesh.wait_for("the job to end", lambda: _ended(mesh, "box", job_id), 60)
    assert job["state"] == "failed" and "vnpu:" in job["reason"], job
    assert "resource is not enough" in job["reason"], job
    assert set(host.vnpus) == {"200", "201", "210", "211"}  # theirs, untouched


def test_an_npu_fraction_as_a_plain_process_shares_the_npu(
        mesh: LocalMesh, host: FakeHost) -> None:
    _start(mesh, host)
    job_id = _submit(mesh, "box", "--compute", "20", "--", "sleep", "4")
    mesh.wait_for("the job to run", lambda: mesh.json("box", "show", job_id)["state"]
                  == "running", 60)
    row = next(d for d in mesh.json("box", "devices") if job_id in (d["jobs"] or []))
    assert row["leased_compute_milli"] == 200  # as asked: no template
    assert row["enforcement"] == "vnpu" and row["job_enforcement"] == {job_id: "none"}
    table = mesh.cli("box", "devices").stdout
    assert f"{job_id}(none)" in table
    job = mesh.wait_for("the job to end", lambda: _ended(mesh, "box", job_id), 60)
    assert job["state"] == "succeeded", job
    assert host.calls("create-vnpu") == [] and host.runs() == []


def test_a_restarted_agent_destroys_its_vnpus_whose_runs_are_gone(
        mesh: LocalMesh, host: FakeHost) -> None:
    _start(mesh, host)
    mesh.kill("box")
    host.add_vnpus({str(vid): {"npu": npu, "chip": 0, "template": "vir05_1c_16g",
                               "bound": False}
                    for vid, npu in ((170, 0), (164, 0), (180, 1))})  # (170: someone else's)
    ours = [{"vnpu_id": vid, "job": "gone", "lease": "l1", "device": f"npu{npu}",
             "npu_id": npu, "chip_id": 0, "phy_id": npu + 4, "template": "vir05_1c_16g",
             "state": "created"} for vid, npu in ((164, 0), (180, 1))]
    (mesh.agents["box"].dir / "state" / "vnpus.json").write_text(json.dumps(ours))
    mesh.restart("box")
    records = mesh.agents["box"].dir / "state" / "vnpus.json"
    mesh.wait_for("its stale vNPUs to go, and their records",
                  lambda: json.loads(records.read_text()) == [], 60)
    assert set(host.vnpus) == {"170"}
