"""How a node holds a job to the fraction it leased, and what each way can really promise.

One ``enforcement`` mode per node, shown by ``flexmesh devices``:

========== ============================================ =====================================
mode       memory                                       compute
========== ============================================ =====================================
mps        hard: the MPS server refuses allocations     capped: the job may use at most
           past CUDA_MPS_PINNED_DEVICE_MEM_LIMIT        CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of
                                                        the SMs (a spatial cap; memory
                                                        bandwidth and caches stay shared)
hami-core  hard: libvgpu.so intercepts allocations      throttled: kernel launches are
           past CUDA_DEVICE_MEMORY_LIMIT                rate-limited toward
                                                        CUDA_DEVICE_SM_LIMIT by time slices;
                                                        bursts above it happen
watchdog   checked: NVML reads each job's memory every  none: jobs time-slice the device
           second and the agent stops a job over its    with everyone else
           lease ("gpu memory limit exceeded")
none       none                                         none
========== ============================================ =====================================

No mode here gives a hard compute guarantee; MIG is the only hardware partition and a MIG
instance is already its own device. Modes apply to NVIDIA GPUs only: on an Ascend NPU
``effective_mode`` falls back to ``watchdog`` (npu-smi reports per-process memory) and on
a sim or Jetson device to ``none`` (a Jetson has neither MPS nor per-process GPU
memory readings: jobs there share the GPU on trust). An NPU fraction in a container runs
on a vNPU of its own instead (``vnpu``: hard, by the chip's partition; see ``vnpu``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flexmesh.agent.devices.base import Device, DeviceSample
from flexmesh.agent.units import MILLI

MPS = "mps"
HAMI_CORE = "hami-core"
WATCHDOG = "watchdog"
NONE = "none"
MODES = (MPS, HAMI_CORE, WATCHDOG, NONE)

GPU_MEMORY_EXCEEDED = "gpu memory limit exceeded"
DEFAULT_MPS_PIPE_DIR = "/tmp/nvidia-mps"


@dataclass(frozen=True, slots=True)
class ModeLimits:
    memory: str  # "hard" | "checked" | "none"
    compute: str  # "capped" | "throttled" | "none"


LIMITS: dict[str, ModeLimits] = {
    MPS: ModeLimits(memory="hard", compute="capped"),
    HAMI_CORE: ModeLimits(memory="hard", compute="throttled"),
    WATCHDOG: ModeLimits(memory="checked", compute="none"),
    NONE: ModeLimits(memory="none", compute="none"),
}


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown enforcement mode {mode!r}: use one of {', '.join(MODES)}")
    return mode


def effective_mode(device: Device, mode: str) -> str:
    """The node's mode as it applies to one device (see the module docstring)."""
    _check_mode(mode)
    if device.backend == "nvml":
        return mode
    if device.backend == "ascend" and mode != NONE:
        return WATCHDOG
    return NONE


def _percent_ceil(compute_milli: int) -> int:
    return min(100, max(1, math.ceil(compute_milli * 100 / MILLI)))


def job_env(
    device: Device,
    compute_milli: int,
    memory_mib: int,
    mode: str,
    hami_lib: str | None = None,
    mps_pipe_dir: str | None = None,
) -> dict[str, str]:
    """Environment for a job leasing ``compute_milli``/``memory_mib`` of ``device``.

    Always includes the device's visibility variables; the limit variables depend on the
    mode. Inside the job the one visible device is ordinal 0, and the MPS memory limit is
    set by ordinal because MPS does not apply limits given by UUID reliably.
    """
    if not 0 < compute_milli <= MILLI:
        raise ValueError(f"compute_milli {compute_milli} is out of range 1..{MILLI}")
    if memory_mib < 0:
        raise ValueError(f"memory_mib {memory_mib} is negative")
    env = dict(device.visible_env)
    applied = effective_mode(device, mode)
    if applied == MPS:
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(_percent_ceil(compute_milli))
        if memory_mib > 0:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={memory_mib}M"
        if mps_pipe_dir:
            env["CUDA_MPS_PIPE_DIRECTORY"] = mps_pipe_dir
    elif applied == HAMI_CORE:
        if not hami_lib:
            raise ValueError("hami-core enforcement needs the path of libvgpu.so (hami_lib)")
        env["LD_PRELOAD"] = hami_lib
        if memory_mib > 0:
            env["CUDA_DEVICE_MEMORY_LIMIT"] = f"{memory_mib}m"
        env["CUDA_DEVICE_SM_LIMIT"] = str(_percent_ceil(compute_milli))
    return env


# Variables that name devices: a job on several devices sees them all, in lease order.
_DEVICE_LISTS = ("CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES")


def visible_env(devices: Sequence[Device]) -> dict[str, str]:
    """The variables that make ``devices`` (and only them) visible to a job."""
    out: dict[str, str] = {}
    for device in devices:
        for key, value in device.visible_env.items():
            out[key] = f"{out[key]},{value}" if key in out and key in _DEVICE_LISTS else value
    return out


def job_env_many(
    devices: Sequence[Device],
    compute_milli: int,
    memory_mib: int,
    mode: str,
    hami_lib: str | None = None,
    mps_pipe_dir: str | None = None,
) -> dict[str, str]:
    """``job_env`` for a job holding ``compute_milli``/``memory_mib`` on each of
    ``devices`` (all on this node). Visibility lists every device; the MPS memory limit is
    given per ordinal; the HAMi-core and MPS percentages apply to every device alike."""
    if not devices:
        raise ValueError("a job needs at least one device")
    envs = [job_env(d, compute_milli, memory_mib, mode, hami_lib, mps_pipe_dir)
            for d in devices]
    if len(envs) == 1:
        return envs[0]
    out: dict[str, str] = {}
    for key in dict.fromkeys(k for env in envs for k in env):
        values = [env[key] for env in envs if key in env]
        if key in _DEVICE_LISTS:
            out[key] = ",".join(values)
        elif key == "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT":
            out[key] = ",".join(f"{i}={memory_mib}M" for i in range(len(values)))
        else:
            out[key] = values[0]
    return out


def mps_daemon_running(pipe_dir: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True when an MPS control daemon's ``control`` pipe exists in its pipe directory."""
    environ = os.environ if env is None else env
    directory = pipe_dir or environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_MPS_PIPE_DIR
    return Path(directory, "control").exists()


def detect_enforcement(
    configured: str = "auto",
    hami_lib: str | None = None,
    mps_pipe_dir: str | None = None,
    nvml_available: bool = False,
    env: Mapping[str, str] | None = None,
) -> str:
    """Pick the node's mode: an explicit setting is checked; ``auto`` takes the strongest
    available: MPS daemon found -> mps; configured libvgpu.so exists -> hami-core;
    NVML present -> watchdog; otherwise none."""
    if configured != "auto":
        mode = _check_mode(configured)
        if mode == HAMI_CORE and not (hami_lib and Path(hami_lib).is_file()):
            raise ValueError(f"enforcement = hami-core but libvgpu.so is not at {hami_lib!r}")
        if mode == MPS and not mps_daemon_running(mps_pipe_dir, env):
            raise ValueError("enforcement = mps but no MPS control daemon pipe was found")
        if mode in (MPS, HAMI_CORE) and not nvml_available:
            raise ValueError(f"enforcement = {mode} needs NVML, which did not load")
        return mode
    if nvml_available and mps_daemon_running(mps_pipe_dir, env):
        return MPS
    if nvml_available and hami_lib and Path(hami_lib).is_file():
        return HAMI_CORE
    return WATCHDOG if nvml_available else NONE


def watchdog_verdict(job_memory_mib_used: int, lease_memory_mib: int) -> str | None:
    """``"gpu memory limit exceeded"`` when a job holds more device memory than it leased."""
    if job_memory_mib_used > lease_memory_mib:
        return GPU_MEMORY_EXCEEDED
    return None


def job_memory_used(samples: Iterable[DeviceSample], device_id: str, pids: Iterable[int]) -> int:
    """Device memory (MiB) held by a job's processes on one device, from backend samples."""
    wanted = set(pids)
    return sum(
        mib
        for sample in samples
        if sample.id == device_id
        for pid, mib in sample.job_memory_mib.items()
        if pid in wanted
    )
