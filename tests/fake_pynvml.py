"""A fake ``pynvml`` module for tests: configurable GPUs, MIG, processes, utilisation and
failures on demand, without touching the real library.

It mirrors the names the NVML backend uses (``nvmlInit``, ``nvmlDeviceGetCount``,
``nvmlDeviceGetMemoryInfo``, ...), the ``NVMLError`` class with its ``value`` code and the
``NVML_ERROR_*`` constants (same numbers as nvidia-ml-py). Handles are the ``FakeGpu``
objects themselves.

    fake = FakeNvml([FakeGpu("GPU-0", used_mib=1024, processes=[FakeProcess(7, 512)])])
    backend = NvmlBackend(nvml=fake)
    fake.fail("GPU-0", "nvmlDeviceGetMemoryInfo", fake.NVML_ERROR_UNKNOWN)
    fake.lose("GPU-0")  # every call on it now raises NVML_ERROR_GPU_IS_LOST
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

_MIB = 1024 * 1024

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_NO_DATA = 21
NVML_ERROR_UNKNOWN = 999

_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_NO_DATA: "No data",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _STRINGS.get(self.value, f"NVML error {self.value}")


@dataclass
class FakeProcess:
    pid: int
    used_mib: int | None = 0  # None: the driver does not report it
    sm_util: int | None = None  # per-process SM %, None: no sample for this process
    graphics: bool = False


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A100-SXM4-40GB"
    memory_mib: int = 40960
    used_mib: int = 0
    utilization: int | None = 0  # None: NOT_SUPPORTED (as on MIG instances)
    temperature: int | None = 40
    power_mw: int | None = 90_000
    processes: list[FakeProcess] = field(default_factory=list)
    process_util_supported: bool = True
    mig: list[FakeGpu | None] | None = None  # None: not MIG capable; None slot: empty
    mig_enabled: bool = False
    failures: dict[str, int] = field(default_factory=dict)  # call name or "*" -> code
    parent: FakeGpu | None = None


class FakeNvml(types.ModuleType):
    NVMLError = NVMLError
    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_TIMEOUT = NVML_ERROR_TIMEOUT
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_NO_DATA = NVML_ERROR_NO_DATA
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN
    NVML_DEVICE_MIG_DISABLE = 0
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_TEMPERATURE_GPU = 0

    def __init__(
        self,
        gpus: list[FakeGpu] | None = None,
        init_error: int | None = None,
        legacy_bytes: bool = False,
    ) -> None:
        super().__init__("pynvml")
        self.gpus = list(gpus or [])
        for gpu in self.gpus:
            for mig in gpu.mig or []:
                if mig is not None:
                    mig.parent = gpu
        self.init_error = init_error
        self.legacy_bytes = legacy_bytes  # old pynvml returned bytes for strings
        self.initialized = False
        self.shutdowns = 0
        self.failures: dict[str, int] = {}  # calls without a handle
        self.clock_us = 0
        self.calls: list[str] = []

    # -- test controls -------------------------------------------------------------------

    def find(self, uuid: str) -> FakeGpu:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
            for mig in gpu.mig or []:
                if mig is not None and mig.uuid == uuid:
                    return mig
        raise KeyError(uuid)

    def fail(self, uuid: str, call: str, code: int) -> None:
        self.find(uuid).failures[call] = code

    def heal(self, uuid: str) -> None:
        self.find(uuid).failures.clear()

    def lose(self, uuid: str) -> None:
        self.find(uuid).failures["*"] = NVML_ERROR_GPU_IS_LOST

    # -- helpers -------------------------------------------------------------------------

    def _enter(self, call: str, handle: FakeGpu | None = None) -> None:
        self.calls.append(call)
        if not self.initialized:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        if call in self.failures:
            raise NVMLError(self.failures[call])
        gpu = handle
        while gpu is not None:
            for key in (call, "*"):
                if key in gpu.failures:
                    raise NVMLError(gpu.failures[key])
            gpu = gpu.parent

    def _str(self, value: str) -> str | bytes:
        return value.encode() if self.legacy_bytes else value

    # -- the pynvml surface ----------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialized = False
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        if "nvmlDeviceGetHandleByIndex" in gpu.failures:
            raise NVMLError(gpu.failures["nvmlDeviceGetHandleByIndex"])
        return gpu

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str | bytes:
        self._enter("nvmlDeviceGetUUID", handle)
        return self._str(handle.uuid)

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str | bytes:
        self._enter("nvmlDeviceGetName", handle)
        return self._str(handle.name)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        self._enter("nvmlDeviceGetMemoryInfo", handle)
        total, used = handle.memory_mib * _MIB, handle.used_mib * _MIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> SimpleNamespace:
        self._enter("nvmlDeviceGetUtilizationRates", handle)
        if handle.utilization is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=handle.utilization, memory=0)

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        self._enter("nvmlDeviceGetTemperature", handle)
        if handle.temperature is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return handle.temperature

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetPowerUsage", handle)
        if handle.power_mw is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return handle.power_mw

    def _procs(self, handle: FakeGpu, graphics: bool) -> list[SimpleNamespace]:
        return [
            SimpleNamespace(
                pid=p.pid,
                gpuInstanceId=0,
                computeInstanceId=0,
                usedGpuMemory=None if p.used_mib is None else p.used_mib * _MIB,
            )
            for p in handle.processes
            if p.graphics == graphics
        ]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[SimpleNamespace]:
        self._enter("nvmlDeviceGetComputeRunningProcesses", handle)
        return self._procs(handle, graphics=False)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeGpu) -> list[SimpleNamespace]:
        self._enter("nvmlDeviceGetGraphicsRunningProcesses", handle)
        return self._procs(handle, graphics=True)

    def nvmlDeviceGetProcessUtilization(self, handle: FakeGpu, last_seen: int) -> list[Any]:
        self._enter("nvmlDeviceGetProcessUtilization", handle)
        if not handle.process_util_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        self.clock_us += 1_000_000
        samples = [
            SimpleNamespace(
                pid=p.pid,
                timeStamp=self.clock_us,
                smUtil=p.sm_util,
                memUtil=0,
                encUtil=0,
                decUtil=0,
            )
            for p in handle.processes
            if p.sm_util is not None
        ]
        if not samples:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return samples

    def nvmlDeviceGetMigMode(self, handle: FakeGpu) -> list[int]:
        self._enter("nvmlDeviceGetMigMode", handle)
        if handle.mig is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        mode = self.NVML_DEVICE_MIG_ENABLE if handle.mig_enabled else self.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetMaxMigDeviceCount", handle)
        return 7 if handle.mig is not None else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeGpu, index: int) -> FakeGpu:
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        slots = handle.mig or []
        if index >= len(slots) or slots[index] is None:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        mig = slots[index]
        assert mig is not None
        return mig
