"""The Jetson backend over a fake /sys, /proc, /dev and /etc under tmp_path, and recorded
tegrastats lines from TX2, Xavier, Nano and Orin boards."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from flexmesh.agent import config
from flexmesh.agent.devices.base import Device, DeviceSample
from flexmesh.agent.devices.discovery import JetsonOptions, discover_backends, open_jetson
from flexmesh.agent.devices.enforcement import effective_mode, job_env, visible_env
from flexmesh.agent.devices.jetson import (
    DEVICE_ID,
    RESCAN_S,
    JetsonBackend,
    find_load_file,
    gpu_holders,
    parse_tegrastats,
)
from flexmesh.agent.runtime.sampling import Sampler

PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)

TX2 = ("RAM 2160/7852MB (lfb 1196x4MB) SWAP 0/3926MB (cached 0MB) CPU [2%@345,off,off,"
       "1%@345,0%@345,0%@345] EMC_FREQ 0%@1600 GR3D_FREQ 12%@1377 APE 150 PLL@36.5C "
       "MCPU@36.5C PMIC@100C Tboard@33C GPU@34C BCPU@36.5C thermal@35.5C Tdiode@33.25C")
XAVIER = ("RAM 1594/31919MB (lfb 7043x4MB) SWAP 0/15959MB (cached 0MB) CPU [1%@1190,0%@1190,"
          "0%@1190,0%@1190,off,off,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 0%@1377 APE 150 MTS fg "
          "0% bg 0% AO@33.5C GPU@33C Tdiode@36C PMIC@100C AUX@33C CPU@34.5C thermal@33.7C")
NANO = ("RAM 1584/3956MB (lfb 72x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
        "CPU [5%@102,3%@102,2%@102,1%@102] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@30C "
        "CPU@32.5C PMIC@100C GPU@30.5C AO@38.5C thermal@31.5C POM_5V_IN 1074/1074")
ORIN = ("04-21-2023 10:12:01 RAM 2448/30536MB (lfb 6178x4MB) SWAP 0/15268MB (cached 0MB) "
        "CPU [0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 7%@[305,305] "
        "VIC_FREQ 729 APE 174 CV0@-256C CPU@43.75C SOC2@40.843C GPU@-256C tj@44.093C")
ORIN_JP6 = ("RAM 2048/7772MB (lfb 2x4MB) SWAP 0/3886MB (cached 0MB) CPU [1%@1510,2%@1510] "
            "GR3D_FREQ 45% cpu@48.5C soc2@47.1C gpu@47.3C VDD_IN 4814mW/4814mW")


@pytest.mark.parametrize(("line", "pct", "freq", "used", "total", "temp"), [
    (TX2, 12, 1377, 2160, 7852, 34),
    (XAVIER, 0, 1377, 1594, 31919, 33),
    (NANO, 0, 76, 1584, 3956, 30),  # 30.5 rounds to even
    (ORIN, 7, 305, 2448, 30536, -256),
    (ORIN_JP6, 45, None, 2048, 7772, 47),
])
def test_parse_recorded_tegrastats_lines(
    line: str, pct: int, freq: int | None, used: int, total: int, temp: int | None,
) -> None:
    stats = parse_tegrastats(line)
    assert (stats.gpu_pct, stats.gpu_freq_mhz) == (pct, freq)
    assert (stats.ram_used_mib, stats.ram_total_mib) == (used, total)
    assert stats.gpu_temp_c == temp


def test_parse_tegrastats_of_garbage_says_nothing() -> None:
    stats = parse_tegrastats("tegrastats: command not found")
    assert stats.gpu_pct is None and stats.ram_total_mib is None
    assert parse_tegrastats("GR3D_FREQ 250%@1377").gpu_pct == 100


class Board:
    """A fake Jetson: roots under tmp_path, a load file, meminfo, a model, processes."""

    def __init__(self, root: Path, load_path: str | None = "devices/gpu.0/load") -> None:
        self.sys, self.proc, self.dev, self.etc = (root / n for n in ("sys", "proc", "dev", "etc"))
        for d in (self.sys, self.proc, self.dev, self.etc):
            d.mkdir()
        (self.proc / "meminfo").write_text(
            "MemTotal:        7957540 kB\nMemFree:  100 kB\nMemAvailable: 5000000 kB\n")
        (self.proc / "device-tree").mkdir()
        (self.proc / "device-tree" / "model").write_bytes(
            b"NVIDIA Jetson Orin Nano Developer Kit\0")
        (self.proc / "device-tree" / "compatible").write_bytes(
            b"nvidia,p3768-0000+p3767-0005\0nvidia,p3767-0005\0nvidia,tegra234\0")
        self.load = None
        if load_path is not None:
            self.load = self.sys / load_path
            self.load.parent.mkdir(parents=True)
            self.load.write_text("0\n")

    def process(self, pid: int, rss_pages: int, *targets: str) -> None:
        fd = self.proc / str(pid) / "fd"
        fd.mkdir(parents=True)
        (self.proc / str(pid) / "statm").write_text(f"100000 {rss_pages} 10 1 0 50 0\n")
        for n, target in enumerate(targets):
            resolved = target if target.startswith(("pipe:", "socket:")) else str(self.dev / target)
            os.symlink(resolved, fd / str(n))

    def backend(self, **kw: object) -> JetsonBackend:
        return JetsonBackend(sys_root=self.sys, proc_root=self.proc, dev_root=self.dev,
                             **kw)  # type: ignore[arg-type]

    def options(self, **kw: object) -> JetsonOptions:
        return JetsonOptions(sys_root=self.sys, proc_root=self.proc, dev_root=self.dev,
                             etc_root=self.etc, **kw)  # type: ignore[arg-type]


def pages(mib: int) -> int:
    return round(mib / PAGE_MIB)


def test_discover_one_gpu_with_its_share_of_unified_memory(tmp_path: Path) -> None:
    board = Board(tmp_path)
    [device] = board.backend(memory_share=0.25).discover()
    assert device.id == DEVICE_ID and device.kind == "gpu" and device.backend == "jetson"
    assert device.model == "NVIDIA Jetson Orin Nano Developer Kit"  # NUL stripped
    assert device.memory_mib == 7957540 // 1024 // 4
    assert device.visible_env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert JetsonBackend.inline is False


def test_memory_share_out_of_range_is_refused(tmp_path: Path) -> None:
    board = Board(tmp_path)
    for share in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="memory share"):
            board.backend(memory_share=share)


def test_no_meminfo_means_no_device(tmp_path: Path) -> None:
    board = Board(tmp_path)
    (board.proc / "meminfo").unlink()
    backend = board.backend()
    assert backend.discover() == [] and backend.sample(frozenset()) == []


@pytest.mark.parametrize("where", [
    "devices/gpu.0/load",
    "devices/platform/bus@0/17000000.gpu/gpu.0/load",  # matched by **/gpu.0/load
    "devices/platform/host1x/57000000.gpu/load",  # Nano, TX1
])
def test_load_file_is_found_where_boards_put_it(tmp_path: Path, where: str) -> None:
    board = Board(tmp_path, where)
    assert find_load_file(board.sys) == board.load


def test_utilization_from_the_load_file_at_every_sample(tmp_path: Path) -> None:
    board = Board(tmp_path)
    backend = board.backend()
    backend.discover()
    assert board.load is not None
    board.load.write_text("375\n")
    [sample] = backend.sample(frozenset())
    assert sample.utilization_pct == 37 and sample.healthy
    assert sample.foreign_compute_milli == 370  # no job, no visible holder: all foreign
    board.load.write_text("1000\n")
    assert backend.sample(frozenset())[0].utilization_pct == 100
    board.load.write_text("garbage\n")
    [sample] = backend.sample(frozenset())
    assert not sample.healthy and "GPU load unreadable" in sample.detail


def test_gpu_holders_are_found_through_fd_links(tmp_path: Path) -> None:
    board = Board(tmp_path)
    board.process(100, pages(512), "null", "nvhost-ctrl-gpu", "nvmap")
    board.process(200, pages(256), "pipe:[1234]", "nvmap")
    board.process(300, pages(64), "null", "tty1", "nvhostile")
    board.process(400, pages(64), "nvhost-as-gpu")
    (board.proc / "self").mkdir()  # not a pid
    assert gpu_holders(board.proc, board.dev) == {100, 200, 400}


def test_foreign_use_excludes_job_processes(tmp_path: Path) -> None:
    board = Board(tmp_path)
    assert board.load is not None
    board.load.write_text("800\n")
    board.process(100, pages(300), "nvmap")  # someone else's CUDA program
    board.process(200, pages(100), "nvhost-ctrl-gpu")  # a flexmesh job
    board.process(300, pages(900), "null")  # not on the GPU
    backend = board.backend()
    backend.discover()
    [sample] = backend.sample(frozenset({200}))
    assert sample.foreign_memory_mib == pytest.approx(300, abs=1)
    assert sample.job_memory_mib.keys() == {200}
    assert sample.memory_used_mib == pytest.approx(400, abs=2)
    # 80 % busy, split by resident memory: 3/4 of it foreign
    assert sample.foreign_compute_milli == pytest.approx(600, abs=3)
    [only_jobs] = backend.sample(frozenset({100, 200}))
    assert only_jobs.foreign_compute_milli == 0 and only_jobs.foreign_memory_mib == 0


def test_tegrastats_log_where_no_load_file(tmp_path: Path) -> None:
    board = Board(tmp_path, load_path=None)
    log = tmp_path / "tegrastats.log"
    log.write_text(f"{NANO}\n{TX2}\nRAM 2160/7852MB GR3D_FREQ 99%@13")  # last line unfinished
    now = log.stat().st_mtime
    backend = board.backend(tegrastats_log=log, clock=lambda: now + 1)
    backend.discover()
    [sample] = backend.sample(frozenset())
    assert sample.utilization_pct == 12 and sample.temperature_c == 34
    assert sample.foreign_compute_milli == 120 and sample.detail == ""
    stale = board.backend(tegrastats_log=log, clock=lambda: now + 60)
    [sample] = stale.sample(frozenset())
    assert sample.detail == "tegrastats log is stale" and sample.utilization_pct == 0
    assert sample.healthy  # load unknown is not a broken GPU
    [sample] = board.backend().sample(frozenset())
    assert "no GPU load file" in sample.detail


def test_unknown_load_with_a_foreign_holder_counts_the_gpu_busy(tmp_path: Path) -> None:
    board = Board(tmp_path, load_path=None)
    board.process(100, pages(10), "nvmap")
    [sample] = board.backend().sample(frozenset())
    assert sample.foreign_compute_milli == 1000
    [sample] = board.backend().sample(frozenset({100}))
    assert sample.foreign_compute_milli == 0


def test_auto_detection(tmp_path: Path) -> None:
    board = Board(tmp_path)
    assert open_jetson(board.options(), nvml_found=False) is not None
    assert open_jetson(board.options(), nvml_found=True) is None  # NVML wins
    assert open_jetson(board.options(mode="off"), nvml_found=False) is None
    (board.proc / "device-tree" / "compatible").write_bytes(b"raspberrypi,4-model-b\0")
    assert open_jetson(board.options(), nvml_found=False) is None  # not a Tegra
    (board.etc / "nv_tegra_release").write_text("# R35 (release), REVISION: 3.1\n")
    assert open_jetson(board.options(), nvml_found=False) is not None
    assert board.load is not None
    board.load.unlink()
    assert open_jetson(board.options(), nvml_found=False) is None  # no load file
    assert open_jetson(board.options(mode="on"), nvml_found=True) is not None  # forced


def test_discover_backends_adds_jetson(tmp_path: Path) -> None:
    board = Board(tmp_path)
    backends = discover_backends(None, None, None, enable_nvml=False, path_env="",
                                 jetson=board.options(memory_share=1.0))
    assert [b.name for b in backends] == ["jetson"]
    [device] = backends[0].discover()
    assert device.memory_mib == 7957540 // 1024


def test_jobs_see_the_gpu_and_no_enforcement_applies(tmp_path: Path) -> None:
    [device] = Board(tmp_path).backend().discover()
    assert effective_mode(device, "watchdog") == "none"
    assert job_env(device, 500, 1024, "mps") == {"CUDA_VISIBLE_DEVICES": "0"}
    assert visible_env([device]) == {"CUDA_VISIBLE_DEVICES": "0"}


@pytest.mark.parametrize(("key", "value", "message"), [
    ("jetson", "maybe", "jetson must be auto, on or off"),
    ("jetson_memory_share", "0", "more than 0 and at most 1"),
    ("jetson_memory_share", "1.5", "more than 0 and at most 1"),
    ("jetson_memory_share", "nan", "more than 0 and at most 1"),
])
def test_config_refuses_bad_jetson_settings(
    tmp_path: Path, key: str, value: str, message: str,
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[devices]\n{key} = "{value}"\n' if key == "jetson"
                    else f"[devices]\n{key} = {value}\n")
    with pytest.raises(config.ConfigError, match=message):
        config.load(str(path), {}, env={})


def test_config_reads_jetson_settings(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[devices]\njetson = "on"\njetson_memory_share = 0.75\n'
                    'jetson_tegrastats_log = "/var/log/tegrastats.log"\n')
    s = config.load(str(path), {}, env={})
    assert (s.jetson, s.jetson_memory_share, s.jetson_tegrastats_log) == (
        "on", 0.75, "/var/log/tegrastats.log")


def test_holders_rescan_all_processes_only_every_few_seconds(tmp_path: Path) -> None:
    board = Board(tmp_path)
    now = [0.0]
    backend = board.backend(clock=lambda: now[0])
    board.process(100, pages(10), "nvmap")
    board.process(200, pages(10), "null")
    assert backend.holders() == {100}
    os.symlink(str(board.dev / "nvhost-ctrl-gpu"), board.proc / "200" / "fd" / "9")
    board.process(300, pages(10), "nvhost-gpu")  # a new process is read at once
    now[0] = RESCAN_S - 0.5
    assert backend.holders() == {100, 300}  # 200 opened the GPU late: not yet read again
    now[0] = RESCAN_S
    assert backend.holders() == {100, 200, 300}
    for name in os.listdir(board.proc / "100" / "fd"):
        os.unlink(board.proc / "100" / "fd" / name)
    os.rmdir(board.proc / "100" / "fd")
    os.unlink(board.proc / "100" / "statm")
    os.rmdir(board.proc / "100")  # it exited
    assert backend.holders() == {200, 300}


@pytest.mark.parametrize(("backend", "stopped"), [("jetson", False), ("nvml", True)])
def test_the_watchdog_leaves_jetson_jobs_alone(backend: str, stopped: bool) -> None:
    """A Jetson's job memory is resident memory, not a GPU reading: no watchdog there."""
    stops: list[str] = []
    run = SimpleNamespace(id="j1", terminal=False, lease_id="l1", devices=["d0"])
    node = SimpleNamespace(
        owner=SimpleNamespace(runs={"j1": run}),
        leases=SimpleNamespace(leases={"l1": SimpleNamespace(memory_mib=100)}),
        stop_job=lambda job_id, *_: stops.append(job_id))
    agent = SimpleNamespace(node=node, loop=SimpleNamespace(time=lambda: 0.0))
    sampler = Sampler(agent)  # type: ignore[arg-type]
    sampler.devices = [Device("d0", "gpu", "GPU", 1000, backend)]
    sampler._trees = {"j1": {200}}
    assert sampler.watchdog([DeviceSample("d0", True, job_memory_mib={200: 500})]) is stopped
    assert stops == (["j1"] if stopped else [])
