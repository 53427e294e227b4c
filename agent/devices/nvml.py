"""NVIDIA GPUs and MIG instances through NVML (``pynvml`` from nvidia-ml-py).

Each GPU is one device, addressed by its ``GPU-...`` UUID; a GPU in MIG mode is replaced
by its MIG instances, each its own device addressed by its ``MIG-...`` UUID. Jobs see
their device through ``CUDA_VISIBLE_DEVICES=<uuid>``.

Foreign usage (what processes that are not flexmesh jobs use):

* memory = everything in use on the device minus what the job processes hold, so the
  driver's own reservation and processes NVML cannot attribute count as foreign too;
* compute = per-process SM utilisation of the other processes where the driver samples
  it; otherwise the device utilisation when no job runs there, none when only jobs run
  there, and a split by memory held when both do. Where utilisation is not reported at all
  (MIG instances), a device with any foreign process counts as fully busy: lending on top
  of a load we cannot see is how jobs get slow and owners get angry.

Failures: every call is guarded. ``NVML_ERROR_NOT_SUPPORTED`` (and "no samples") on an
optional reading just leaves it out; any other NVML error marks that one device unhealthy
with the failing call in ``detail``, and ``NVML_ERROR_GPU_IS_LOST`` also sets ``lost`` so
the agent ends its leases. Nothing is raised into the agent. The pynvml module is injected
(``nvml=``), so tests drive this code with ``tests/fake_pynvml.py``.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

from flexmesh.agent.devices.base import Device, DeviceSample
from flexmesh.agent.devices.idle import foreign_compute_estimate
from flexmesh.agent.units import MILLI

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_NO_SAMPLE_CODES = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_NOT_FOUND", "NVML_ERROR_NO_DATA")


class _CallFailed(Exception):
    def __init__(self, call: str, error: BaseException, code: int | None) -> None:
        super().__init__(f"{call}: {error}")
        self.call, self.error, self.code = call, error, code


@dataclass(slots=True)
class _Entry:
    device: Device
    handle: Any
    detail: str = ""  # why discovery could not read the device
    last_seen_us: int = 0  # for per-process utilisation samples


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _mib_up(nbytes: int) -> int:
    return -(-int(nbytes) // _MIB)


class NvmlBackend:
    """Backend over NVML; blocking, meant to be called from a worker thread."""

    name = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            nvml = importlib.import_module("pynvml")
        self._nvml = nvml
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] | None = None
        self._closed = False
        self._unhealthy: set[str] = set()
        nvml.nvmlInit()

    @classmethod
    def try_open(cls, nvml: Any = None) -> NvmlBackend | None:
        """The backend, or None when pynvml or libnvidia-ml does not load (no GPU here)."""
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError:
                return None
        try:
            return cls(nvml)
        except Exception as err:  # NVMLError_LibraryNotFound, DriverNotLoaded, OSError...
            log.debug("NVML unavailable: %s", err)
            return None

    # -- calls ---------------------------------------------------------------------------

    def _code(self, name: str) -> int | None:
        value = getattr(self._nvml, name, None)
        return value if isinstance(value, int) else None

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._nvml, name)(*args)
        except self._nvml.NVMLError as err:
            raise _CallFailed(name, err, getattr(err, "value", None)) from err

    def _optional(self, name: str, *args: Any) -> Any:
        """A reading the driver may not offer: None when unsupported or absent."""
        if not hasattr(self._nvml, name):
            return None
        try:
            return self._call(name, *args)
        except _CallFailed as failed:
            if failed.code in {self._code(c) for c in _NO_SAMPLE_CODES} or failed.code == 0:
                return None
            raise

    # -- discovery -----------------------------------------------------------------------

    def discover(self) -> list[Device]:
        with self._lock:
            return [entry.device for entry in self._discover_locked().values()]

    def _discover_locked(self) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        try:
            count = int(self._call("nvmlDeviceGetCount"))
        except _CallFailed as failed:
            log.warning("NVML could not count GPUs: %s", failed)
            count = 0
        for index in range(count):
            for entry in self._discover_gpu(index):
                entries[entry.device.id] = entry
        self._entries = entries
        return entries

    def _broken(self, device_id: str, handle: Any, detail: str) -> _Entry:
        device = Device(
            id=device_id,
            kind="gpu",
            model="unknown",
            memory_mib=0,
            backend=self.name,
            healthy=False,
        )
        return _Entry(device=device, handle=handle, detail=detail)

    def _discover_gpu(self, index: int) -> list[_Entry]:
        try:
            handle = self._call("nvmlDeviceGetHandleByIndex", index)
            uuid = _text(self._call("nvmlDeviceGetUUID", handle))
        except _CallFailed as failed:
            return [self._broken(f"nvml-gpu{index}", None, f"GPU {index}: {failed}")]
        try:
            migs = self._mig_handles(handle)
        except _CallFailed as failed:
            return [self._broken(uuid, None, str(failed))]
        if not migs:
            return [self._entry_for(handle, uuid)]
        entries = []
        for slot, mig in migs:
            try:
                entries.append(self._entry_for(mig, _text(self._call("nvmlDeviceGetUUID", mig))))
            except _CallFailed as failed:
                entries.append(self._broken(f"{uuid}/mig{slot}", None, str(failed)))
        return entries

    def _mig_handles(self, handle: Any) -> list[tuple[int, Any]]:
        mode = self._optional("nvmlDeviceGetMigMode", handle)
        enabled = self._code("NVML_DEVICE_MIG_ENABLE")
        if mode is None or enabled is None or int(mode[0]) != enabled:
            return []
        slots = int(self._call("nvmlDeviceGetMaxMigDeviceCount", handle))
        found = []
        for slot in range(slots):
            mig = self._optional("nvmlDeviceGetMigDeviceHandleByIndex", handle, slot)
            if mig is not None:
                found.append((slot, mig))
        return found

    def _entry_for(self, handle: Any, uuid: str) -> _Entry:
        try:
            name = _text(self._call("nvmlDeviceGetName", handle))
            total = int(self._call("nvmlDeviceGetMemoryInfo", handle).total) // _MIB
        except _CallFailed as failed:
            return self._broken(uuid, None, str(failed))
        device = Device(
            id=uuid,
            kind="gpu",
            model=name,
            memory_mib=total,
            backend=self.name,
            compute_milli=MILLI,
            visible_env={"CUDA_VISIBLE_DEVICES": uuid},
        )
        return _Entry(device=device, handle=handle)

    # -- sampling ------------------------------------------------------------------------

    def sample(self, job_pids: frozenset[int]) -> list[DeviceSample]:
        with self._lock:
            entries = self._entries if self._entries is not None else self._discover_locked()
            samples = [self._sample_entry(entry, job_pids) for entry in entries.values()]
        self._log_health(samples)
        return samples

    def _sample_entry(self, entry: _Entry, job_pids: frozenset[int]) -> DeviceSample:
        device_id = entry.device.id
        if entry.handle is None:
            return DeviceSample(id=device_id, healthy=False, detail=entry.detail or "unreadable")
        try:
            return self._read(entry, job_pids)
        except _CallFailed as failed:
            lost = failed.code is not None and failed.code == self._code("NVML_ERROR_GPU_IS_LOST")
            detail = f"NVML {failed}"
            if lost:
                detail = f"GPU has fallen off the bus (NVML_ERROR_GPU_IS_LOST in {failed.call})"
            return DeviceSample(id=device_id, healthy=False, detail=detail, lost=lost)
        except Exception as err:  # a driver or binding bug must not take the agent down
            return DeviceSample(id=device_id, healthy=False, detail=f"NVML read failed: {err!r}")

    def _read(self, entry: _Entry, job_pids: frozenset[int]) -> DeviceSample:
        handle = entry.handle
        used = _mib_up(self._call("nvmlDeviceGetMemoryInfo", handle).used)
        procs = self._processes(handle)
        util = self._optional("nvmlDeviceGetUtilizationRates", handle)
        util_pct = None if util is None else max(0, min(100, int(util.gpu)))
        temp = self._optional(
            "nvmlDeviceGetTemperature", handle, getattr(self._nvml, "NVML_TEMPERATURE_GPU", 0)
        )
        power = self._optional("nvmlDeviceGetPowerUsage", handle)
        job_memory = {pid: mib or 0 for pid, mib in procs.items() if pid in job_pids}
        sm = self._process_utilization(entry)
        return DeviceSample(
            id=entry.device.id,
            healthy=True,
            foreign_memory_mib=max(0, used - sum(job_memory.values())),
            foreign_compute_milli=foreign_compute_estimate(util_pct, sm, procs, job_pids),
            utilization_pct=util_pct or 0,
            memory_used_mib=used,
            temperature_c=None if temp is None else int(temp),
            power_mw=None if power is None else int(power),
            job_memory_mib=job_memory,
            job_util_pct={pid: pct for pid, pct in (sm or {}).items() if pid in job_pids},
        )

    def _processes(self, handle: Any) -> dict[int, int | None]:
        """pid -> MiB held (None where the driver does not say), compute and graphics."""
        procs: dict[int, int | None] = {}
        for call in (
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
        ):
            for proc in self._optional(call, handle) or ():
                raw = getattr(proc, "usedGpuMemory", None)
                mib = _mib_up(raw) if isinstance(raw, int) and raw >= 0 else None
                pid = int(proc.pid)
                previous = procs.get(pid)
                procs[pid] = mib if previous is None else max(previous, mib or 0)
        return procs

    def _process_utilization(self, entry: _Entry) -> dict[int, int] | None:
        """pid -> SM % over the samples since the last read; None if not offered."""
        name = "nvmlDeviceGetProcessUtilization"
        if not hasattr(self._nvml, name):
            return None
        try:
            samples = self._call(name, entry.handle, entry.last_seen_us)
        except _CallFailed as failed:
            if failed.code in (self._code("NVML_ERROR_NOT_FOUND"), 0):
                return {}  # supported, but no process ran since the last read
            if failed.code in (
                self._code("NVML_ERROR_NOT_SUPPORTED"),
                self._code("NVML_ERROR_NO_DATA"),
            ):
                return None
            raise
        usage: dict[int, int] = {}
        for s in samples:
            entry.last_seen_us = max(entry.last_seen_us, int(s.timeStamp))
            usage[int(s.pid)] = max(usage.get(int(s.pid), 0), int(s.smUtil))
        return usage

    def _log_health(self, samples: list[DeviceSample]) -> None:
        for s in samples:
            if not s.healthy and s.id not in self._unhealthy:
                log.warning("GPU %s is unhealthy: %s", s.id, s.detail)
                self._unhealthy.add(s.id)
            elif s.healthy and s.id in self._unhealthy:
                log.info("GPU %s is healthy again", s.id)
                self._unhealthy.discard(s.id)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._nvml.nvmlShutdown()
            except Exception as err:  # shutting down: nothing useful to do with it
                log.debug("nvmlShutdown failed: %s", err)
