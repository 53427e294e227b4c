"""flexmesh's device path on a real NVIDIA GPU: NVML discovery against nvidia-smi, a
foreign process lowering what the node lends, the watchdog, MPS limits, and a job borrowed
from a deviceless node allocating on the GPU.

Every test here is marked ``gpu`` and skips, saying why, where no NVIDIA GPU with a
loadable libnvidia-ml (or no libcuda.so.1) is present. Jobs are ``tests/gpujob.py``, the
CUDA driver API through ctypes. ``scripts/gpu-check --run`` runs this file and reports;
with ``FLEXMESH_GPU_REPORT=FILE`` each test appends what it measured as JSON lines.

The whole file takes about three minutes on a GPU: most of it is the idle window (a
foreign process's memory is still counted for 60 s after it exits, then 30 s of hold).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flexmesh.agent.devices.nvml import NvmlBackend
from flexmesh.agent.localmesh import LocalMesh

pytestmark = pytest.mark.gpu

GPUJOB = Path(__file__).with_name("gpujob.py")
TERMINAL = {"succeeded", "failed", "cancelled", "preempted", "lost"}
MIB = 1024 * 1024


def record(test: str, **fields: Any) -> None:
    """Append what a test measured to $FLEXMESH_GPU_REPORT (JSON lines), if set."""
    path = os.environ.get("FLEXMESH_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"record": test, **fields}) + "\n")


# --- what this host has ------------------------------------------------------------------


@pytest.fixture(scope="module")
def nvml() -> Iterator[NvmlBackend]:
    backend = NvmlBackend.try_open()
    if backend is None:
        pytest.skip("no NVIDIA GPU here: pynvml or libnvidia-ml.so.1 does not load")
    try:
        if not backend.discover():
            pytest.skip("NVML loads but reports no GPU")
        yield backend
    finally:
        backend.close()


def loaded_path(name: str) -> str | None:
    """Where this process loaded the library ``name`` from (/proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith(name):
                return parts[5].strip()
    return None


@pytest.fixture(scope="module")
def libcuda(nvml: NvmlBackend) -> str:
    """The driver library's absolute path: a job starts with a clean environment, where
    an LD_LIBRARY_PATH that found it here may be missing."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        pytest.skip(f"libcuda.so.1 does not load, so no CUDA job can run: {err}")
    return loaded_path("libcuda.so") or "libcuda.so.1"


def _world_usable(path: str) -> bool:
    """Whether any user (a borrowed job runs as `nobody`) can reach and run ``path``."""
    p = Path(os.path.realpath(path))
    if not p.stat().st_mode & stat.S_IXOTH:
        return False
    return all(d.stat().st_mode & stat.S_IXOTH for d in p.parents)


@pytest.fixture(scope="module")
def job(libcuda: str) -> Iterator[list[str]]:
    """The command that runs gpujob.py, from a directory every user can read: an agent
    running as root runs borrowed jobs as `nobody`."""
    pythons = [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    usable = [p for p in pythons if os.path.exists(p) and _world_usable(p)]
    python = usable[0] if usable else os.path.realpath(sys.executable)
    where = Path(tempfile.mkdtemp(prefix="flexmesh-gpujob-"))
    try:
        where.chmod(0o755)
        shutil.copy(GPUJOB, where / "gpujob.py")
        (where / "gpujob.py").chmod(0o644)
        yield [python, str(where / "gpujob.py"), "--libcuda", libcuda]
    finally:
        shutil.rmtree(where, ignore_errors=True)


def agent_args(path: Path, enforcement: str, nvml: bool = True) -> list[str]:
    path.write_text(
        f'[devices]\nnvml = {"true" if nvml else "false"}\nenforcement = "{enforcement}"\n\n'
        "[jobs]\nallow_root = true\nstop_grace = 2.0\n")
    return ["--config", str(path)]


def own_gpu(mesh: LocalMesh, node: str) -> dict[str, Any]:
    """The node's first NVIDIA device once it has been measured (lendable memory > 0)."""
    def measured() -> dict[str, Any] | None:
        rows = [r for r in mesh.json(node, "devices")
                if r["node"] == node and r["backend"] == "nvml" and r["healthy"]]
        return rows[0] if rows and rows[0]["lendable_memory_mib"] > 0 else None

    found: dict[str, Any] = mesh.wait_for(f"a measured GPU on {node}", measured, timeout=30)
    return found


def lendable_mib(mesh: LocalMesh, node: str, device: str) -> int:
    rows = [r for r in mesh.json(node, "devices") if r["node"] == node and r["id"] == device]
    return int(rows[0]["lendable_memory_mib"])


def wait_lendable(mesh: LocalMesh, device: str, what: str, ok: Any, timeout: float) -> int:
    """Poll node g's lendable memory of ``device`` until ``ok(value)``; the value."""
    def check() -> tuple[int] | None:
        value = lendable_mib(mesh, "g", device)
        return (value,) if ok(value) else None

    found: tuple[int] = mesh.wait_for(what, check, timeout=timeout, interval=0.5)
    return found[0]


def submit(mesh: LocalMesh, node: str, flags: list[str], command: list[str]) -> str:
    """Submit on ``node``; the job gets this host's LD_LIBRARY_PATH (the driver's)."""
    if os.environ.get("LD_LIBRARY_PATH"):
        flags = [*flags, "--env", f"LD_LIBRARY_PATH={os.environ['LD_LIBRARY_PATH']}"]
    res = mesh.cli(node, "submit", *flags, "-o", "json", "--", *command)
    return str(json.loads(res.stdout)["id"])


def ended(mesh: LocalMesh, node: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job: dict[str, Any] = mesh.json(node, "show", job_id)
        return job if job["state"] in TERMINAL else None

    found: dict[str, Any] = mesh.wait_for(f"job {job_id} to end", done, timeout=timeout,
                                          interval=0.5)
    return found


def events(mesh: LocalMesh, node: str, job_id: str) -> tuple[dict[str, Any], str]:
    """The job's JSON lines by event, and its stderr."""
    logs = mesh.cli(node, "logs", job_id)
    lines = [json.loads(line) for line in logs.stdout.splitlines() if line.startswith("{")]
    return {e["event"]: e for e in lines}, logs.stderr


# --- the tests ---------------------------------------------------------------------------


def _smi_rows() -> list[list[str]]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi is not on PATH")
    out = subprocess.run(
        [smi, "--query-gpu=name,uuid,memory.total,mig.mode.current",
         "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=60,
        check=True).stdout
    return [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]


def _nvml_gpu(pynvml: Any, index: int) -> dict[str, Any]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    try:
        current = int(pynvml.nvmlDeviceGetMigMode(handle)[0])
        mig = "Enabled" if current == pynvml.NVML_DEVICE_MIG_ENABLE else "Disabled"
    except pynvml.NVMLError:
        mig = "[N/A]"
    return {"index": index, "name": text(pynvml.nvmlDeviceGetName(handle)),
            "uuid": text(pynvml.nvmlDeviceGetUUID(handle)),
            "memory_mib": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // MIB,
            "mig_mode": mig,
            "driver_version": text(pynvml.nvmlSystemGetDriverVersion())}


def test_nvml_backend_agrees_with_nvidia_smi(nvml: NvmlBackend) -> None:
    import pynvml

    rows = _smi_rows()
    devices = {d.id: d for d in nvml.discover()}
    assert len(rows) == pynvml.nvmlDeviceGetCount()
    for index, (name, uuid, total, mig) in enumerate(rows):
        gpu = _nvml_gpu(pynvml, index)
        record("nvml_vs_nvidia_smi", nvml=gpu,
               nvidia_smi={"name": name, "uuid": uuid, "memory_mib": total, "mig_mode": mig})
        assert (gpu["name"], gpu["uuid"]) == (name, uuid)
        assert abs(gpu["memory_mib"] - int(total)) <= max(1, int(total) // 100)
        assert gpu["mig_mode"] == mig or {gpu["mig_mode"], mig} <= {"Disabled", "[N/A]"}
        if mig == "Enabled":  # the GPU is replaced by its MIG instances
            assert uuid not in devices
            continue
        device = devices[uuid]
        assert (device.model, device.backend, device.kind) == (name, "nvml", "gpu")
        assert device.memory_mib == gpu["memory_mib"]
        assert device.visible_env == {"CUDA_VISIBLE_DEVICES": uuid}
    assert all(d.healthy for d in devices.values())


@contextlib.contextmanager
def foreign_job(job: list[str], uuid: str, mib: int, seconds: float) -> Iterator[Any]:
    """gpujob.py started outside flexmesh on ``uuid``, yielded once it holds ``mib``."""
    proc = subprocess.Popen([*job, "--mib", str(mib), "--seconds", str(seconds), "--busy"],
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": uuid},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith('{"event": "allocated"'), (line, proc.poll())
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.timeout(300)
def test_a_foreign_process_lowers_lendable_memory_until_it_is_gone(
        mesh: LocalMesh, job: list[str], tmp_path: Path) -> None:
    mesh.start("g", extra=agent_args(tmp_path / "g.toml", "watchdog"))
    gpu = own_gpu(mesh, "g")
    before = gpu["lendable_memory_mib"]
    mib = min(20480, before // 2)
    if mib < 1024:
        pytest.skip(f"only {before} MiB lendable on {gpu['id']}")
    start = time.monotonic()
    with foreign_job(job, gpu["id"], mib, seconds=10) as proc:
        held = wait_lendable(mesh, gpu["id"], "lendable memory to drop",
                             lambda v: v <= before - mib, timeout=30)
        dropped_s = time.monotonic() - start
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    exited = time.monotonic()
    after = wait_lendable(mesh, gpu["id"], "lendable memory to come back",
                          lambda v: v >= before - 512, timeout=150)
    record("foreign_process", device=gpu["id"], held_mib=mib, lendable_before_mib=before,
           lendable_held_mib=held, lendable_after_mib=after, drop_s=round(dropped_s, 1),
           recovered_s_after_exit=round(time.monotonic() - exited, 1))


def test_the_watchdog_stops_a_job_over_its_lease_and_not_one_within(
        mesh: LocalMesh, job: list[str], tmp_path: Path) -> None:
    mesh.start("g", extra=agent_args(tmp_path / "g.toml", "watchdog"))
    gpu = own_gpu(mesh, "g")
    assert gpu["enforcement"] == "watchdog"
    over = submit(mesh, "g", ["--gpu", "0.1", "--memory", "1GiB"],
                  [*job, "--mib", "3072", "--seconds", "60"])
    within = submit(mesh, "g", ["--gpu", "0.1", "--memory", "4GiB"],
                    [*job, "--mib", "1024", "--seconds", "8", "--busy"])
    stopped = ended(mesh, "g", over)
    assert (stopped["state"], stopped["reason"]) == ("failed", "gpu memory limit exceeded")
    seen, _ = events(mesh, "g", over)
    assert "allocated" in seen and "done" not in seen
    left = ended(mesh, "g", within)
    seen_within, err = events(mesh, "g", within)
    assert (left["state"], left["exit_code"]) == ("succeeded", 0), (left, err)
    assert seen_within["allocated"]["env"]["CUDA_VISIBLE_DEVICES"] == gpu["id"]
    assert seen_within["done"]["memsets"] > 0
    record("watchdog", over=stopped, within=left)


@contextlib.contextmanager
def mps_daemon(control: str) -> Iterator[dict[str, str]]:
    """An MPS control daemon of our own (its pipe and log directories), stopped after."""
    base = Path(tempfile.mkdtemp(prefix="fm-mps-"))  # short: the pipes are Unix sockets
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(base / "pipe"),
           "CUDA_MPS_LOG_DIRECTORY": str(base / "log")}
    for d in env.values():
        Path(d).mkdir(mode=0o755)
    daemon = subprocess.Popen([control, "-f"], env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (base / "pipe" / "control").exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                logs = " ".join(p.read_text()[-500:] for p in (base / "log").glob("*.log"))
                pytest.skip(f"the MPS control daemon did not start here: {logs or 'no log'}")
            time.sleep(0.1)
        yield env
    finally:
        with contextlib.suppress(Exception):
            subprocess.run([control], input="quit\n", text=True, env={**os.environ, **env},
                           timeout=30, capture_output=True)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(base, ignore_errors=True)


def test_under_mps_an_allocation_beyond_the_lease_fails_inside_the_job(
        mesh: LocalMesh, job: list[str], tmp_path: Path) -> None:
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        pytest.skip("nvidia-cuda-mps-control is not on PATH")
    with mps_daemon(control) as env:
        mesh.start("g", extra=agent_args(tmp_path / "g.toml", "mps"), env=env)
        gpu = own_gpu(mesh, "g")
        assert gpu["enforcement"] == "mps"
        flags = ["--gpu", "0.25", "--memory", "2GiB"]
        fits = submit(mesh, "g", flags, [*job, "--mib", "512", "--seconds", "1", "--busy"])
        over = submit(mesh, "g", flags, [*job, "--mib", "4096", "--seconds", "1"])
        ok, refused = ended(mesh, "g", fits), ended(mesh, "g", over)
        seen_ok, err_ok = events(mesh, "g", fits)
        assert (ok["state"], ok["exit_code"]) == ("succeeded", 0), (ok, err_ok)
        limits = seen_ok["allocated"]["env"]
        assert limits["CUDA_MPS_PIPE_DIRECTORY"] == env["CUDA_MPS_PIPE_DIRECTORY"]
        assert limits["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M"
        assert limits["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
        seen, err = events(mesh, "g", over)
        assert (refused["state"], refused["exit_code"]) == ("failed", 5), (refused, err)
        assert "cuMemAlloc_v2 of 4096 MiB failed: CUDA_ERROR_" in err
        record("mps", within=ok, over=refused, cuda_error=seen["alloc_failed"]["error"])


def test_a_job_submitted_on_a_deviceless_node_allocates_on_the_gpu(
        mesh: LocalMesh, job: list[str], tmp_path: Path) -> None:
    mesh.start("g", extra=agent_args(tmp_path / "g.toml", "watchdog"))
    mesh.start("e", join=["g"],
               extra=[*agent_args(tmp_path / "e.toml", "none", nvml=False), "--priority", "9"])
    mesh.wait_for("convergence", lambda: mesh.converged(["g", "e"]))
    gpu = own_gpu(mesh, "g")
    assert not [r for r in mesh.json("e", "devices") if r["node"] == "e"]
    job_id = submit(mesh, "e", ["--gpu", "0.25", "--memory", "4GiB", "--kind", "gpu"],
                    [*job, "--mib", "1024", "--seconds", "2", "--busy"])
    done = ended(mesh, "e", job_id)
    seen, err = events(mesh, "e", job_id)
    assert (done["state"], done["exit_code"]) == ("succeeded", 0), (done, err)
    assert (done["node"], done["device"]) == ("g", gpu["id"])
    allocated = seen["allocated"]
    assert allocated["env"]["CUDA_VISIBLE_DEVICES"] == gpu["id"]
    assert allocated["env"]["FLEXMESH_ORIGIN"] == "e"
    if gpu["id"].startswith("GPU-"):
        assert allocated["device_uuid"] == gpu["id"]
    record("borrowed", job=done, cuda_device=allocated.get("device_uuid"))
