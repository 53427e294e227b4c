"""The integrated GPU of an NVIDIA Jetson (TX2, Xavier, Nano, Orin), where NVML does not exist.

A Jetson has one GPU that shares the system memory with the CPUs (unified memory), so the
device this backend reports is:

* memory: ``memory_share`` (``[devices] jetson_memory_share``, default 0.5) of
  ``MemTotal`` in ``/proc/meminfo``: the rest stays with the CPU side;
* model: ``/proc/device-tree/model`` (NUL-terminated), id ``jetson-gpu0``;
* utilization: the GPU load file (``/sys/devices/gpu.0/load``, or one found under
  ``/sys/devices/**/gpu.0/load`` or ``/sys/devices/platform/*/*.gpu/load``; per-mille,
  0..1000), read at every sample: one small file. Where there is none, the last line of a
  ``tegrastats --logfile`` log (``jetson_tegrastats_log``), parsed by ``parse_tegrastats``;
  a log not written for ``STALE_S`` seconds gives no utilization.
* foreign use: processes holding ``/dev/nvhost-*`` or ``/dev/nvmap`` open (found through
  the ``/proc/PID/fd`` links this agent may read), minus the flexmesh job processes. Their
  compute is the GPU utilization (split with jobs by resident memory when both run, see
  ``idle.foreign_compute_estimate``); their memory is their resident set (RSS), which is
  what unified memory lets us see cheaply: GPU buffers a driver maps outside RSS are not
  counted.

Jobs see the GPU as ``CUDA_VISIBLE_DEVICES=0``. There is no MPS, HAMi-core or per-process
GPU memory reading here, so the enforcement mode on this device is ``none``.
Every root (``/sys``, ``/proc``, ``/dev``, ``/etc``) can be moved for tests.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flexmesh.agent.devices.base import Device, DeviceSample
from flexmesh.agent.devices.idle import foreign_compute_estimate
from flexmesh.agent.units import MILLI

log = logging.getLogger(__name__)

DEFAULT_MEMORY_SHARE = 0.5
STALE_S = 10.0  # a tegrastats log older than this says nothing about now
RESCAN_S = 5.0  # every process's fds are read this often; between, new ones and holders
DEVICE_ID = "jetson-gpu0"
_LOAD_GLOBS = ("devices/**/gpu.0/load", "devices/platform/*/*.gpu/load")
_GR3D_RE = re.compile(r"\bGR3D_FREQ\s+(\d+)%(?:@\[?(\d+))?")
_RAM_RE = re.compile(r"\bRAM\s+(\d+)/(\d+)([kMG])B\b")
_GPU_TEMP_RE = re.compile(r"\bGPU@(-?\d+(?:\.\d+)?)C\b", re.IGNORECASE)
_UNIT_MIB = {"k": 1 / 1024, "M": 1.0, "G": 1024.0}


@dataclass(frozen=True, slots=True)
class TegraStats:
    """What one ``tegrastats`` line says about the GPU; None where the line does not say."""

    gpu_pct: int | None = None
    gpu_freq_mhz: int | None = None
    ram_used_mib: int | None = None
    ram_total_mib: int | None = None
    gpu_temp_c: int | None = None


def parse_tegrastats(line: str) -> TegraStats:
    """Parse one ``tegrastats`` line (TX2/Xavier ``GR3D_FREQ 0%@1377``, Orin
    ``GR3D_FREQ 0%@[305,305]`` or ``GR3D_FREQ 45%``, Nano ``GR3D_FREQ 0%@76``; ``RAM
    2048/7772MB``). Fields the line lacks are None; a percentage over 100 is clamped."""
    gr3d = _GR3D_RE.search(line)
    ram = _RAM_RE.search(line)
    temp = _GPU_TEMP_RE.search(line)
    used = total = None
    if ram:
        scale = _UNIT_MIB[ram.group(3)]
        used, total = int(int(ram.group(1)) * scale), int(int(ram.group(2)) * scale)
    return TegraStats(
        gpu_pct=min(100, int(gr3d.group(1))) if gr3d else None,
        gpu_freq_mhz=int(gr3d.group(2)) if gr3d and gr3d.group(2) else None,
        ram_used_mib=used,
        ram_total_mib=total,
        gpu_temp_c=round(float(temp.group(1))) if temp else None,
    )


def find_load_file(sys_root: Path) -> Path | None:
    """The GPU load file under ``sys_root`` (normally ``/sys``), or None."""
    direct = sys_root / "devices" / "gpu.0" / "load"
    if direct.is_file():
        return direct
    for pattern in _LOAD_GLOBS:
        for path in sorted(sys_root.glob(pattern)):
            if path.is_file():
                return path
    return None


def is_tegra(proc_root: Path, etc_root: Path) -> bool:
    """True on an NVIDIA Tegra SoC: ``/etc/nv_tegra_release`` exists or the device tree
    says ``nvidia,tegra...``."""
    if (etc_root / "nv_tegra_release").exists():
        return True
    try:
        compatible = (proc_root / "device-tree" / "compatible").read_bytes()
    except OSError:
        return False
    return b"nvidia,tegra" in compatible


def read_model(proc_root: Path) -> str:
    try:
        text = (proc_root / "device-tree" / "model").read_bytes().decode("utf-8", "replace")
    except OSError:
        return "NVIDIA Jetson"
    return text.replace("\x00", "").strip() or "NVIDIA Jetson"


def mem_total_mib(proc_root: Path) -> int:
    """``MemTotal`` of ``/proc/meminfo`` in MiB; raises ValueError when it is missing."""
    for line in (proc_root / "meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "MemTotal":
            parts = value.split()
            if parts and parts[0].isdigit():
                return int(parts[0]) // 1024
    raise ValueError(f"no MemTotal in {proc_root / 'meminfo'}")


def read_load_permille(path: Path) -> int:
    """The GPU load (0..1000) from a load file; ValueError for anything else."""
    value = int(path.read_text().strip())
    if not 0 <= value <= MILLI:
        raise ValueError(f"GPU load {value} in {path} is out of range 0..{MILLI}")
    return value


def _is_gpu_node(target: str, dev: str) -> bool:
    return target == f"{dev}/nvmap" or target.startswith(f"{dev}/nvhost-")


def _pids(proc_root: Path) -> set[int]:
    try:
        return {int(name) for name in os.listdir(proc_root) if name.isdigit()}
    except OSError:
        return set()


def _holds_gpu(proc_root: Path, pid: int, dev: str) -> bool:
    fd_dir = os.path.join(proc_root, str(pid), "fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:  # not ours to read, or the process has just exited
        return False
    for fd in fds:
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target == f"{dev}/nvmap" or target.startswith(f"{dev}/nvhost-"):
            return True
    return False


def gpu_holders(proc_root: Path, dev_root: Path, pids: set[int] | None = None) -> set[int]:
    """Pids (of ``pids``, default all) with a Jetson GPU node (``nvhost-*``, ``nvmap``)
    open, among the processes whose ``fd`` directory this process may read."""
    dev = str(dev_root).rstrip("/")
    return {pid for pid in (_pids(proc_root) if pids is None else pids)
            if _holds_gpu(proc_root, pid, dev)}


def rss_mib(proc_root: Path, pid: int) -> int:
    """Resident memory of ``pid`` in MiB from ``/proc/PID/statm``; 0 when unreadable."""
    try:
        fields = (proc_root / str(pid) / "statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return 0


class JetsonBackend:
    """Backend for a Jetson's integrated GPU; reads files only, from a worker thread."""

    name = "jetson"
    inline = False  # a sample scans /proc/*/fd: keep it off the event loop

    def __init__(
        self,
        memory_share: float = DEFAULT_MEMORY_SHARE,
        tegrastats_log: Path | None = None,
        *,
        sys_root: Path = Path("/sys"),
        proc_root: Path = Path("/proc"),
        dev_root: Path = Path("/dev"),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < memory_share <= 1:
            raise ValueError(f"jetson memory share {memory_share} is out of range (0, 1]")
        self.memory_share = memory_share
        self.tegrastats_log = tegrastats_log
        self.sys_root, self.proc_root, self.dev_root = sys_root, proc_root, dev_root
        self._clock = clock
        self.load_file = find_load_file(sys_root)
        self._device: Device | None = None
        self._checked: set[int] = set()  # pids whose fds were read since the last rescan
        self._holders: set[int] = set()
        self._rescan_at = float("-inf")

    def discover(self) -> list[Device]:
        try:
            total = mem_total_mib(self.proc_root)
        except (OSError, ValueError) as err:
            log.warning("jetson: cannot read total memory: %s", err)
            return []
        self._device = Device(
            id=DEVICE_ID,
            kind="gpu",
            model=read_model(self.proc_root),
            memory_mib=int(total * self.memory_share),
            backend=self.name,
            compute_milli=MILLI,
            visible_env={"CUDA_VISIBLE_DEVICES": "0"},
        )
        return [self._device]

    def holders(self) -> set[int]:
        """GPU holders: every readable process every ``RESCAN_S`` seconds; in between only
        the processes new since then and the known holders (a process that opens the GPU
        late is seen at the next rescan). ``scripts/bench_jetson`` measures both costs."""
        now = self._clock()
        pids = _pids(self.proc_root)
        if now >= self._rescan_at:
            self._rescan_at, self._checked = now + RESCAN_S, set()
        todo = (pids - self._checked) | (self._holders & pids)
        self._holders = gpu_holders(self.proc_root, self.dev_root, todo)
        self._checked = (self._checked & pids) | todo
        return self._holders

    def _utilization(self) -> tuple[int | None, int | None, str]:
        """(percent, GPU temperature, why unknown) from the load file or tegrastats."""
        if self.load_file is not None:
            try:
                return read_load_permille(self.load_file) // 10, None, ""
            except (OSError, ValueError) as err:
                return None, None, f"GPU load unreadable: {err}"
        if self.tegrastats_log is None:
            return None, None, "no GPU load file and no tegrastats log"
        try:
            if self._clock() - self.tegrastats_log.stat().st_mtime > STALE_S:
                return None, None, "tegrastats log is stale"
            stats = parse_tegrastats(_last_line(self.tegrastats_log))
        except OSError as err:
            return None, None, f"tegrastats log unreadable: {err}"
        if stats.gpu_pct is None:
            return None, stats.gpu_temp_c, "tegrastats line has no GR3D_FREQ"
        return stats.gpu_pct, stats.gpu_temp_c, ""

    def sample(self, job_pids: frozenset[int]) -> list[DeviceSample]:
        if self._device is None and not self.discover():
            return []
        assert self._device is not None
        util, temp, why = self._utilization()
        memory = {pid: rss_mib(self.proc_root, pid)
                  for pid in self.holders()}
        job_memory = {pid: mib for pid, mib in memory.items() if pid in job_pids}
        foreign_memory = sum(mib for pid, mib in memory.items() if pid not in job_pids)
        return [DeviceSample(
            id=self._device.id,
            healthy=not why.startswith("GPU load unreadable"),
            foreign_memory_mib=foreign_memory,
            foreign_compute_milli=foreign_compute_estimate(
                util, None, dict(memory), job_pids),
            utilization_pct=util or 0,
            detail=why,
            memory_used_mib=sum(memory.values()),
            temperature_c=temp,
            job_memory_mib=job_memory,
        )]

    def close(self) -> None:
        return None


def _last_line(path: Path, tail: int = 4096) -> str:
    """The last complete non-empty line of a (growing) log file, reading its tail only."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - tail))
        data = f.read()
    if not data.endswith(b"\n"):  # tegrastats is writing the last line right now
        data = data[: data.rfind(b"\n") + 1]
    complete = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return complete[-1] if complete else ""
