from __future__ import annotations

from pathlib import Path

import pytest

from flexmesh.agent.devices.base import Device, DeviceSample
from flexmesh.agent.devices.enforcement import (
    GPU_MEMORY_EXCEEDED,
    LIMITS,
    MODES,
    detect_enforcement,
    effective_mode,
    job_env,
    job_env_many,
    job_memory_used,
    mps_daemon_running,
    visible_env,
    watchdog_verdict,
)

GPU = Device(
    id="GPU-1234",
    kind="gpu",
    model="NVIDIA H100",
    memory_mib=81559,
    backend="nvml",
    visible_env={"CUDA_VISIBLE_DEVICES": "GPU-1234"},
)
NPU = Device(
    id="npu3",
    kind="npu",
    model="Ascend 910B3",
    memory_mib=65536,
    backend="ascend",
    visible_env={"ASCEND_RT_VISIBLE_DEVICES": "3"},
)
SIM = Device(id="gpu0", kind="gpu", model="sim-gpu", memory_mib=16384, backend="sim")


def test_mps_environment() -> None:
    env = job_env(GPU, 250, 4096, "mps")
    assert env == {
        "CUDA_VISIBLE_DEVICES": "GPU-1234",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=4096M",
    }


def test_mps_rounds_the_thread_share_up_and_passes_the_pipe_dir() -> None:
    env = job_env(GPU, 1, 0, "mps", mps_pipe_dir="/run/mps")
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "1"
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/run/mps"
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env  # no memory leased, no limit set
    assert job_env(GPU, 333, 1, "mps")["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "34"
    assert job_env(GPU, 1000, 1, "mps")["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"


def test_hami_core_environment() -> None:
    env = job_env(GPU, 500, 8192, "hami-core", hami_lib="/usr/lib/libvgpu.so")
    assert env == {
        "CUDA_VISIBLE_DEVICES": "GPU-1234",
        "LD_PRELOAD": "/usr/lib/libvgpu.so",
        "CUDA_DEVICE_MEMORY_LIMIT": "8192m",
        "CUDA_DEVICE_SM_LIMIT": "50",
    }


def test_hami_core_needs_the_library() -> None:
    with pytest.raises(ValueError, match=r"libvgpu\.so"):
        job_env(GPU, 500, 8192, "hami-core")


@pytest.mark.parametrize("mode", ["watchdog", "none"])
def test_modes_without_env_limits_only_make_the_device_visible(mode: str) -> None:
    assert job_env(GPU, 250, 4096, mode) == {"CUDA_VISIBLE_DEVICES": "GPU-1234"}


def test_job_env_does_not_alias_the_device_env() -> None:
    env = job_env(GPU, 250, 4096, "watchdog")
    env["X"] = "1"
    assert "X" not in GPU.visible_env


@pytest.mark.parametrize("mode", MODES)
def test_npu_and_sim_devices_never_get_cuda_limits(mode: str) -> None:
    npu_env = job_env(NPU, 250, 4096, mode, hami_lib="/x/libvgpu.so")
    assert npu_env == {"ASCEND_RT_VISIBLE_DEVICES": "3"}
    assert job_env(SIM, 250, 4096, mode, hami_lib="/x/libvgpu.so") == {}


def test_effective_mode() -> None:
    assert effective_mode(GPU, "mps") == "mps"
    assert effective_mode(NPU, "mps") == "watchdog"
    assert effective_mode(NPU, "none") == "none"
    assert effective_mode(SIM, "watchdog") == "none"
    with pytest.raises(ValueError, match="unknown enforcement mode"):
        effective_mode(GPU, "cgroups")


@pytest.mark.parametrize(("compute", "memory"), [(0, 10), (1001, 10), (-5, 10), (500, -1)])
def test_job_env_rejects_impossible_leases(compute: int, memory: int) -> None:
    with pytest.raises(ValueError):
        job_env(GPU, compute, memory, "mps")


def test_no_mode_claims_a_hard_compute_limit() -> None:
    assert set(LIMITS) == set(MODES)
    assert all(limits.compute != "hard" for limits in LIMITS.values())
    assert LIMITS["watchdog"].compute == "none" and LIMITS["watchdog"].memory == "checked"
    assert LIMITS["hami-core"].compute == "throttled"


@pytest.fixture
def mps_dir(tmp_path: Path) -> Path:
    (tmp_path / "control").touch()
    return tmp_path


@pytest.fixture
def hami_lib(tmp_path: Path) -> str:
    lib = tmp_path / "libvgpu.so"
    lib.write_bytes(b"\x7fELF")
    return str(lib)


def test_mps_daemon_detection(mps_dir: Path, tmp_path: Path) -> None:
    assert mps_daemon_running(str(mps_dir))
    assert mps_daemon_running(env={"CUDA_MPS_PIPE_DIRECTORY": str(mps_dir)})
    assert not mps_daemon_running(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not mps_daemon_running(str(empty))  # a pipe dir left behind, no daemon


def test_detect_auto_prefers_mps_then_hami_then_watchdog(
    mps_dir: Path, hami_lib: str, tmp_path: Path
) -> None:
    nowhere = str(tmp_path / "no-mps")
    assert detect_enforcement("auto", hami_lib, str(mps_dir), nvml_available=True) == "mps"
    assert detect_enforcement("auto", hami_lib, nowhere, nvml_available=True) == "hami-core"
    assert detect_enforcement("auto", None, nowhere, nvml_available=True) == "watchdog"
    missing_lib = str(tmp_path / "missing.so")
    assert detect_enforcement("auto", missing_lib, nowhere, nvml_available=True) == "watchdog"
    assert detect_enforcement("auto", hami_lib, str(mps_dir), nvml_available=False) == "none"


def test_detect_checks_an_explicit_setting(mps_dir: Path, hami_lib: str, tmp_path: Path) -> None:
    nowhere = str(tmp_path / "no-mps")
    assert detect_enforcement("hami-core", hami_lib, nowhere, nvml_available=True) == "hami-core"
    assert detect_enforcement("mps", None, str(mps_dir), nvml_available=True) == "mps"
    assert detect_enforcement("none", None, str(mps_dir), nvml_available=True) == "none"
    assert detect_enforcement("watchdog", None, nowhere, nvml_available=False) == "watchdog"
    with pytest.raises(ValueError, match=r"libvgpu\.so"):
        detect_enforcement("hami-core", str(tmp_path / "gone.so"), nowhere, nvml_available=True)
    with pytest.raises(ValueError, match="MPS control daemon"):
        detect_enforcement("mps", None, nowhere, nvml_available=True)
    with pytest.raises(ValueError, match="NVML"):
        detect_enforcement("mps", None, str(mps_dir), nvml_available=False)
    with pytest.raises(ValueError, match="unknown enforcement mode"):
        detect_enforcement("hard", None, nowhere, nvml_available=True)


@pytest.mark.parametrize(
    ("used", "lease", "verdict"),
    [
        (4096, 4096, None),
        (4097, 4096, GPU_MEMORY_EXCEEDED),
        (0, 0, None),
        (1, 0, GPU_MEMORY_EXCEEDED),
    ],
)
def test_watchdog_verdict(used: int, lease: int, verdict: str | None) -> None:
    assert watchdog_verdict(used, lease) == verdict
    assert GPU_MEMORY_EXCEEDED == "gpu memory limit exceeded"


def test_job_memory_used_sums_a_jobs_processes_on_its_device() -> None:
    samples = [
        DeviceSample(id="GPU-1234", healthy=True, job_memory_mib={10: 1000, 11: 500, 20: 64}),
        DeviceSample(id="GPU-5678", healthy=True, job_memory_mib={10: 4000}),
    ]
    assert job_memory_used(samples, "GPU-1234", [10, 11]) == 1500
    assert job_memory_used(samples, "GPU-5678", {10}) == 4000
    assert job_memory_used(samples, "GPU-9999", [10]) == 0


GPU2 = Device(id="GPU-5678", kind="gpu", model="NVIDIA H100", memory_mib=81559, backend="nvml",
              visible_env={"CUDA_VISIBLE_DEVICES": "GPU-5678"})


def test_a_job_on_several_devices_sees_them_all_in_lease_order() -> None:
    assert visible_env([GPU2, GPU]) == {"CUDA_VISIBLE_DEVICES": "GPU-5678,GPU-1234"}
    assert job_env_many([GPU], 1000, 0, "watchdog") == job_env(GPU, 1000, 0, "watchdog")
    env = job_env_many([GPU, GPU2], 1000, 8192, "mps")
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1234,GPU-5678"
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=8192M,1=8192M"  # by ordinal
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"
    env = job_env_many([GPU, GPU2], 1000, 8192, "hami-core", hami_lib="/lib/libvgpu.so")
    assert env["CUDA_DEVICE_MEMORY_LIMIT"] == "8192m"  # HAMi-core applies it to each device
    assert env["LD_PRELOAD"] == "/lib/libvgpu.so"
    with pytest.raises(ValueError):
        job_env_many([], 1000, 0, "none")


def test_a_job_under_mps_reaches_the_daemon_the_agent_found(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's environment is clean, so the owner hands it the MPS pipe directory the
    agent's own environment names (a daemon started with its own directories)."""
    from types import SimpleNamespace

    from flexmesh.agent.models import JobRecord
    from flexmesh.agent.node import RunJob
    from flexmesh.agent.runtime.processes import Processes

    procs = Processes.__new__(Processes)
    procs.agent = SimpleNamespace(  # type: ignore[assignment]
        sampler=SimpleNamespace(enforcement="mps"), settings=SimpleNamespace(hami_lib=""))
    run = RunJob(JobRecord(id="j1", origin="a", command=["true"], compute_milli=250,
                           memory_mib=2048), (GPU,))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/tmp/fm-mps/pipe")
    env = procs.owner_env(run)
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/fm-mps/pipe"
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1234"
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY")
    assert "CUDA_MPS_PIPE_DIRECTORY" not in procs.owner_env(run)
