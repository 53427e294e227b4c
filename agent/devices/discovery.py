"""Find the device backends this node has; several can be active at once.

* NVML when ``pynvml`` imports and ``libnvidia-ml`` loads and reports at least one GPU;
* Ascend when ``npu-smi`` is at the configured path or on ``PATH``;
* Jetson (the integrated GPU of an NVIDIA Jetson) when ``jetson`` is ``on``, or when it is
  ``auto``, NVML found no GPU, the machine is a Tegra (``/etc/nv_tegra_release`` or
  ``nvidia,tegra`` in ``/proc/device-tree/compatible``) and a GPU load file or a
  tegrastats log is there;
* sim when a ``--sim-devices`` spec is given (a bad spec is the one error raised here:
  it is the operator's typo, not a missing library).

Nothing is raised for a missing library, driver or tool; the backend is simply absent.
Blocking (NVML init, an ``npu-smi`` probe): call it from a worker thread.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexmesh.agent.devices.ascend import AscendBackend, Runner
from flexmesh.agent.devices.base import Backend
from flexmesh.agent.devices.jetson import (
    DEFAULT_MEMORY_SHARE,
    JetsonBackend,
    find_load_file,
    is_tegra,
)
from flexmesh.agent.devices.nvml import NvmlBackend
from flexmesh.agent.devices.sim import SimBackend, parse_sim_devices

log = logging.getLogger(__name__)

NPU_SMI_NAME = "npu-smi"


def find_npu_smi(npu_smi_path: str | None = None, path_env: str | None = None) -> str | None:
    """The npu-smi to run: the configured path if executable, else the one on PATH."""
    if npu_smi_path:
        candidate = Path(npu_smi_path)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        log.warning("npu-smi not found or not executable at %s", npu_smi_path)
    return shutil.which(NPU_SMI_NAME, path=path_env)


def _open_nvml(nvml: Any) -> NvmlBackend | None:
    backend = NvmlBackend.try_open(nvml)
    if backend is None:
        return None
    if not backend.discover():
        backend.close()  # the library loads, but this machine has no GPU
        return None
    return backend


@dataclass(frozen=True, slots=True)
class JetsonOptions:
    """``[devices]`` settings of the Jetson backend, and its roots (moved by tests)."""

    mode: str = "auto"  # "auto" | "on" | "off"
    memory_share: float = DEFAULT_MEMORY_SHARE
    tegrastats_log: Path | None = None
    sys_root: Path = Path("/sys")
    proc_root: Path = Path("/proc")
    dev_root: Path = Path("/dev")
    etc_root: Path = Path("/etc")


def open_jetson(options: JetsonOptions, nvml_found: bool) -> JetsonBackend | None:
    """The Jetson backend if ``options`` select it here (see the module docstring)."""
    if options.mode == "off" or (options.mode == "auto" and nvml_found):
        return None
    if options.mode == "auto":
        if not is_tegra(options.proc_root, options.etc_root):
            return None
        log_there = options.tegrastats_log is not None and options.tegrastats_log.is_file()
        if find_load_file(options.sys_root) is None and not log_there:
            return None
    return JetsonBackend(
        options.memory_share, options.tegrastats_log, sys_root=options.sys_root,
        proc_root=options.proc_root, dev_root=options.dev_root)


def discover_backends(
    sim_spec: str | None,
    sim_load_file: Path | None,
    npu_smi_path: str | None,
    enable_nvml: bool = True,
    *,
    nvml: Any = None,
    npu_smi_runner: Runner | None = None,
    path_env: str | None = None,
    jetson: JetsonOptions | None = None,
) -> list[Backend]:
    """Every backend available here, in the order nvml, jetson, ascend, sim.

    ``nvml``, ``npu_smi_runner`` and ``path_env`` are for tests: a fake pynvml module, a
    fake npu-smi runner, and the PATH to search instead of the process's own;
    ``jetson`` the Jetson settings (default: auto, real roots).
    """
    backends: list[Backend] = []
    if enable_nvml:
        backend = _open_nvml(nvml)
        if backend is not None:
            backends.append(backend)
    jetson_backend = open_jetson(jetson or JetsonOptions(), bool(backends))
    if jetson_backend is not None:
        backends.append(jetson_backend)
    smi = find_npu_smi(npu_smi_path, path_env)
    if smi is not None:
        backends.append(AscendBackend(smi, runner=npu_smi_runner))
    if sim_spec:
        backends.append(SimBackend(parse_sim_devices(sim_spec), sim_load_file))
    log.info("device backends: %s", ", ".join(b.name for b in backends) or "none")
    return backends
