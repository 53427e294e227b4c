"""vNPUs for NPU fractions in containers: the template a fraction gets and the share it is
leased as, ids per chip, the command lines, and the owner's lifecycle against a fake
npu-smi that keeps its vNPUs in a file and checks every command (create, destroy after the
run, destroy when a start fails, reconciliation after a restart that touches only ours)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flexmesh.agent.containers import ContainerRun, build
from flexmesh.agent.devices import vnpu
from flexmesh.agent.devices.base import Device
from flexmesh.agent.node import Node, NodeConfig
from flexmesh.agent.runtime.vnpu import CREATED, STATE_FILE, VnpuError, Vnpus, run_npu_smi
from flexmesh.protocol import wire

FAKE = Path(__file__).parent / "fake_npu_smi.py"


def npu(logic: int = 0, model: str = "Ascend 910B3", memory: int = 65536) -> Device:
    return Device(id=f"npu{logic}", kind="npu", model=model, memory_mib=memory,
                  backend="ascend", visible_env={"ASCEND_RT_VISIBLE_DEVICES": str(logic)})


# --- templates and shares ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("model", "compute", "memory", "chip_mib", "template", "share"),
    [
        ("Ascend 910B3", 200, 1024, 65536, "vir05_1c_16g", (250, 16384)),
        ("Ascend 910B3", 250, 16384, 65536, "vir05_1c_16g", (250, 16384)),
        ("Ascend 910B3", 251, 1024, 65536, "vir10_3c_32g", (500, 32768)),
        ("Ascend 910B3", 100, 16385, 65536, "vir10_3c_32g", (500, 32768)),
        ("Ascend 910B3", 501, 1, 65536, None, None),  # more than the largest: whole chip
        # The chip reports less than the templates' nominal memory: its own part of it.
        ("310P3", 125, 2000, 21527, "vir01", (125, 2690)),
        ("310P3", 125, 2691, 21527, "vir02", (250, 5381)),
        ("910B1", 100, 1, None, "vir03_1c_8g", (125, 8192)),
        ("910B2C", 126, 1, None, "vir06_1c_16g", (250, 16384)),
        ("910B4", 250, 8192, None, "vir05_1c_8g", (250, 8192)),
        ("910B4-1", 250, 16384, None, "vir05_1c_16g", (250, 16384)),
        ("910A", 62, 1, None, "vir02", (62, 2048)),  # 2 of 32 cores, rounded down
        ("910A", 63, 1, None, "vir04", (125, 4096)),
        ("310B4", 100, 1, None, None, None),  # no vNPUs on a 310B
        ("910B3", 1000, 1, None, None, None),  # a whole chip is no fraction
    ],
)
def test_the_smallest_template_whose_share_covers_the_ask(
        model: str, compute: int, memory: int, chip_mib: int | None, template: str | None,
        share: tuple[int, int] | None) -> None:
    fit = vnpu.choose(model, compute, memory, chip_mib)
    assert (fit and fit.template) == template
    assert (fit and (fit.compute_milli, fit.memory_mib)) == share


def test_a_chips_templates_never_add_up_to_more_than_the_chip() -> None:
    for cores, templates in vnpu.TEMPLATES.values():
        for t in templates:
            s = vnpu.share(t, cores, 65536)
            per_chip = cores // t.cores
            assert per_chip * s.compute_milli <= 1000 and per_chip * s.memory_mib <= 65536


def test_an_npu_fraction_in_a_container_is_leased_as_its_template() -> None:
    d = npu()
    assert vnpu.leased(d, 200, 1024, container=True) == (250, 16384)
    assert vnpu.leased(d, 200, 1024, container=False) == (200, 1024)  # shares the NPU
    assert vnpu.leased(d, 600, 1024, container=True) == (1000, 65536)  # whole chip
    assert vnpu.leased(d, 0, 20000, container=True) == (500, 32768)  # in proportion first
    assert vnpu.leased(d, 200, 70000, container=True) == (200, 70000)  # books refuse it
    gpu = replace(d, backend="nvml", kind="gpu", model="NVIDIA H100")
    assert vnpu.leased(gpu, 200, 1024, container=True) == (200, 1024)
    assert vnpu.leased(replace(d, model="Ascend 310B4"), 200, 1, container=True) == (200, 1)


def test_enforcement_of_npu_fractions() -> None:
    d = npu()
    assert vnpu.device_enforcement(d, "none", containers=True) == "vnpu"
    assert vnpu.device_enforcement(d, "none", containers=False) == "none"
    assert vnpu.run_enforcement(d, "none", 250, container=True) == "vnpu"
    assert vnpu.run_enforcement(d, "none", 250, container=False) == "none"
    assert vnpu.run_enforcement(d, "none", 1000, container=True) == "none"  # whole chip
    sim = Device(id="npu0", kind="npu", model="sim", memory_mib=1024, backend="sim")
    assert vnpu.device_enforcement(sim, "watchdog", containers=True) == "none"


# --- ids, commands, parsing -------------------------------------------------------------

def test_ids_per_chip() -> None:
    assert list(vnpu.id_range(0)) == list(range(100, 116))
    assert list(vnpu.id_range(3)) == list(range(148, 164))
    assert vnpu.free_id(1, [116, 117, 119]) == 118
    assert vnpu.free_id(0, range(100, 116)) is None
    with pytest.raises(ValueError):
        vnpu.id_range(-1)


def test_parsers() -> None:
    ids = vnpu.parse_remap("\tChip Physical ID : 5\n\tChip Logic ID :2\n\tNPU ID : 4\n"
                           "\tChip ID : 1\n")
    assert ids == vnpu.ChipIds(phy_id=5, logic_id=2, npu_id=4, chip_id=1)
    with pytest.raises(ValueError, match="NPU ID"):
        vnpu.parse_remap("Chip Physical ID : 5\nChip Logic ID : 2\nChip ID : 1\n")
    rows = vnpu.parse_list("| Total number of vnpu: 2 |\n| Vnpu ID | Vgroup ID | Container ID"
                           " | Status | Template Name |\n| 100 | NA | 000000000000 | 0 | vir02 |\n"
                           "| 103 | 1 | 3c2f | 1 | vir04 |\n")
    assert [(r.vnpu_id, r.template, r.container) for r in rows] == [
        (100, "vir02", "000000000000"), (103, "vir04", "3c2f")]
    assert vnpu.succeeded("   Status   : OK\n   Message : Create vnpu success\n")
    assert not vnpu.succeeded("   Status   : Error\n")


def test_a_container_on_a_vnpu_gets_it_as_davinci_of_its_id() -> None:
    run = ContainerRun("podman", "img", ["true"], "j1", "lease1", "n1", (1000, 1000),
                       [npu(1)], {}, "/tmp/env", vnpus={"npu1": 117})
    cmd = build(run)
    assert "/dev/vdavinci117:/dev/davinci117" in cmd.argv
    assert "/dev/davinci1" not in cmd.argv  # not the physical NPU
    assert cmd.env["ASCEND_RT_VISIBLE_DEVICES"] == "0"
    assert cmd.env["ASCEND_VISIBLE_DEVICES"] == "117"


# --- the owner's lifecycle on the fake npu-smi ------------------------------------------

CHIPS = [{"npu": n, "chip": 0, "phy": p, "logic": n, "name": "910B3", "cores": 20,
          "memory_mib": 65536} for n, p in ((0, 2), (1, 3))]  # physical ids are not logic


class Host:
    """A fake host: its npu-smi's state file, its /dev with davinci nodes."""

    def __init__(self, tmp: Path) -> None:
        self.state_file = tmp / "npu-smi.json"
        self.state_file.write_text(json.dumps({"chips": CHIPS, "vnpus": {}}))
        self.dev = tmp / "dev"
        self.dev.mkdir()
        for name in ("davinci2", "davinci3", "davinci_manager", "vdavinci999"):
            (self.dev / name).touch()
        self.state_dir = tmp / "state"
        self.state_dir.mkdir()

    def runner(self, argv: Sequence[str]) -> tuple[int, str]:
        return run_npu_smi(argv)  # the agent's own: it answers a set's question with Y

    def vnpus(self) -> Vnpus:
        return Vnpus(str(FAKE), self.state_dir, self.dev)

    @property
    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state_file.read_text())
        return data

    def calls(self, kind: str) -> list[list[str]]:
        return [c for c in self.state["calls"] if len(c) > 2 and c[2] == kind]


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    h = Host(tmp_path)
    monkeypatch.setenv("FAKE_NPU_SMI_STATE", str(h.state_file))
    return h


def test_the_fake_checks_syntax_and_id_ranges(host: Host) -> None:
    def smi(*argv: str) -> tuple[int, str]:
        return host.runner([str(FAKE), *argv])

    assert smi("set", "-t", "create-vnpu", "-i", "0", "-c", "0", "-f", "vir05_1c_16g",
               "-v", "100")[0] == 1  # chip 0 is physical id 2: 132..147
    assert smi("set", "-t", "create-vnpu", "-i", "0", "-c", "0", "-f", "vir02", "-v",
               "132")[0] == 1  # not a 910B3 template
    assert smi("set", "-t", "create-vnpu", "-i", "0", "-c", "0", "-v", "132")[0] == 2
    assert smi("set", "-t", "destroy-vnpu", "-i", "0", "-c", "0", "-v", "x")[0] == 2
    assert smi("set", "-t", "create-vnpu", "-i", "0", "-c", "0", "-f", "vir05_1c_16g",
               "-v", "132")[0] == 0
    assert smi("set", "-t", "destroy-vnpu", "-i", "1", "-c", "0", "-v", "132")[0] == 1
    assert host.state["vnpus"] == {"132": {"npu": 0, "chip": 0, "template": "vir05_1c_16g",
                                           "bound": False}}
    done = subprocess.run([str(FAKE), "set", "-t", "destroy-vnpu", "-i", "0", "-c", "0",
                           "-v", "132"], input="N\n", capture_output=True, text=True,
                          check=False)
    assert done.returncode == 1 and "132" in host.state["vnpus"]  # not confirmed


def test_create_then_destroy(host: Host) -> None:
    v = host.vnpus()
    vid = v.create("j1", "l1", npu(1), "vir05_1c_16g")
    assert vid == 148  # the first id of physical id 3
    assert host.state["vnpus"]["148"]["template"] == "vir05_1c_16g"
    assert v.records[148].state == CREATED
    assert json.loads((host.state_dir / STATE_FILE).read_text())[0]["job"] == "j1"
    assert v.create("j2", "l2", npu(1), "vir10_3c_32g") == 149
    assert host.calls("create-vnpu")[0] == ["set", "-t", "create-vnpu", "-i", "1", "-c", "0",
                                            "-f", "vir05_1c_16g", "-v", "148"]
    assert v.release("j1") == []
    assert set(host.state["vnpus"]) == {"149"} and set(v.records) == {149}
    assert v.create("j3", "l3", npu(1), "vir10_3c_32g") == 148  # the lowest free again
    with pytest.raises(VnpuError, match="failed: Error: the resource is not enough"):
        v.create("j4", "l4", npu(1), "vir05_1c_16g")  # 10 + 10 + 5 > 20 cores
    assert set(v.records) == {148, 149}  # nothing recorded for what was not made


def test_a_bound_vnpu_stays_recorded_until_it_can_go(host: Host) -> None:
    v = host.vnpus()
    vid = v.create("j1", "l1", npu(0), "vir05_1c_16g")
    state = host.state
    state["vnpus"][str(vid)]["bound"] = True  # its container has not exited
    host.state_file.write_text(json.dumps(state))
    assert v.release("j1") == [vid]
    assert vid in v.records
    state = host.state
    state["vnpus"][str(vid)]["bound"] = False
    host.state_file.write_text(json.dumps(state))
    assert v.release("j1") == [] and not v.records


def test_acquire_makes_one_for_a_fraction_only_and_undoes_on_failure(host: Host) -> None:
    v = host.vnpus()
    made = asyncio.run(v.acquire("j1", "l1", [npu(0)], 250, 16384))
    assert made == {"npu0": 132}
    assert asyncio.run(v.acquire("j2", "l2", [npu(1)], 1000, 65536)) == {}  # whole
    gpu = Device(id="GPU-1", kind="gpu", model="H100", memory_mib=1, backend="nvml")
    assert asyncio.run(v.acquire("j3", "l3", [gpu], 250, 1)) == {}
    with pytest.raises(VnpuError, match="no vNPU template"):
        asyncio.run(v.acquire("j4", "l4", [npu(0)], 700, 1))
    ghost = replace(npu(7), id="npu7")  # no /dev/davinci node names logic id 7
    with pytest.raises(VnpuError, match="logic id 7"):
        asyncio.run(v.acquire("j5", "l5", [ghost], 250, 1))
    assert set(v.records) == {132}
    assert set(host.state["vnpus"]) == {"132"}


def test_a_restart_destroys_only_its_own_vnpus_whose_runs_are_gone(host: Host) -> None:
    first = host.vnpus()
    kept = first.create("kept", "lk", npu(0), "vir05_1c_16g")
    gone = first.create("gone", "lg", npu(0), "vir05_1c_16g")
    rerun = first.create("rerun", "old", npu(1), "vir05_1c_16g")
    state = host.state  # a vNPU someone else made (by hand, or another tool)
    state["vnpus"]["140"] = {"npu": 0, "chip": 0, "template": "vir05_1c_16g", "bound": False}
    host.state_file.write_text(json.dumps(state))
    # A record of one whose create never happened (the agent died in between).
    recs = json.loads((host.state_dir / STATE_FILE).read_text())
    recs.append({**recs[0], "vnpu_id": 141, "job": "crashed", "lease": "lc",
                 "state": "creating"})
    (host.state_dir / STATE_FILE).write_text(json.dumps(recs))

    second = host.vnpus()  # the agent restarted; "kept" was adopted, "rerun" is a new run
    assert set(second.records) == {kept, gone, rerun, 141}
    destroyed = second.reconcile([("kept", "lk"), ("rerun", "new")])
    assert sorted(destroyed) == sorted([gone, rerun, 141])
    assert set(host.state["vnpus"]) == {str(kept), "140"}  # the foreign one is left alone
    assert set(second.records) == {kept}


def test_an_unreadable_state_file_is_set_aside(host: Host) -> None:
    (host.state_dir / STATE_FILE).write_text("{not json")
    assert host.vnpus().records == {}
    assert (host.state_dir / f"{STATE_FILE}.unreadable").exists()


def test_without_npu_smi_a_fraction_in_a_container_fails_clearly(host: Host) -> None:
    v = Vnpus(None, host.state_dir, host.dev)
    with pytest.raises(VnpuError, match="npu-smi was not found"):
        asyncio.run(v.acquire("j1", "l1", [npu(0)], 250, 1))


# --- the owner's books --------------------------------------------------------------------

def test_the_owner_leases_an_npu_fraction_in_a_container_as_its_template() -> None:
    node = Node(NodeConfig("owner", "127.0.0.1:7946"), random.Random(1), 0.0)
    node.set_devices([npu(0)], {}, 0.0)
    node.drain()

    def ask(job: str, compute: int, container: bool) -> wire.LeaseReply:
        req = wire.LeaseRequest(job, "origin", "npu0", compute, 1024, 1, "coord", [], 0,
                                False, container)
        reply = node.handle_request(req, 1.0)
        assert isinstance(reply, wire.LeaseReply)
        return reply

    assert ask("c1", 200, True).granted
    assert node.leases.used("npu0") == (250, 16384)  # vir05_1c_16g: 5 of 20 cores
    assert ask("p1", 200, False).granted
    assert node.leases.used("npu0") == (450, 17408)  # a plain process: as asked
    assert ask("c2", 300, True).granted  # vir10_3c_32g
    assert node.leases.used("npu0") == (950, 50176)
    refused = ask("c3", 10, True)  # 50 milli are free, the smallest template is 250
    assert not refused.granted
    assert [d.enforcement for d in node.owner.device_facts("none")] == ["none"]
    node.runtimes = ("podman",)
    assert [d.enforcement for d in node.owner.device_facts("none")] == ["vnpu"]
