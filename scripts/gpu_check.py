"""The prepared check of flexmesh on a real NVIDIA GPU (see README, "Checking a real GPU").

    gpu_check.py --build DIR [--python-version X.Y]   on a machine with a package index
    gpu_check.py --run [DIR] [--out OUT] [--budget S] on the GPU host, offline

``--build`` makes DIR: ``site/`` (flexmesh and its runtime dependencies plus pytest,
installed with ``pip --target`` for Python X.Y on x86-64 Linux; no dev tools, no
``__pycache__``, no dependencies' tests, shared libraries stripped), the tests the check
runs, a ``pytest.ini``, this script and ``manifest.json``. ``site/`` is put on PYTHONPATH
of any Python X.Y on the GPU host: a virtual environment would name the build machine's
interpreter by its absolute path. It prints its size (at most 60 MiB, or it fails).

``--run`` runs, within ``--budget`` seconds (default 470): a probe of what NVML reports
(driver, each GPU's name, UUID, memory, MIG mode; what flexmesh's nvml backend makes of
them), then the ``gpu`` tests; it prints JSON lines on stdout: ``{"nvml": ...}`` and
``{"device": ...}`` lines, one ``{"test": ...}`` line per test with its outcome and
duration, the ``{"measured": ...}`` records the tests wrote, and a ``{"summary": ...}``.
pytest's own output goes to stderr and to OUT/pytest.log. Exit status: 0 all passed,
1 a test failed or errored (or the budget ran out), 2 none ran (all skipped: no GPU),
3 the bundle cannot run here.

Standard library only (Python 3.8+), so that any python3 can start it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LIMIT_MIB = 60
TESTS = ("conftest.py", "fake_pynvml.py", "gpujob.py", "test_gpu_real.py",
         "test_devices_nvml.py")
EXTRA = ("pytest", "pytest-timeout")  # beside flexmesh's own dependencies
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
PYTEST_INI = """\
[pytest]
# The prepared GPU check (scripts/gpu_check.py): only the gpu-marked tests.
markers =
    gpu: needs a real NVIDIA GPU (skipped without one)
    integration: starts real agent processes on 127.0.0.1
timeout = 240
addopts = --strict-markers -ra
"""


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def repo_root() -> Path:
    return HERE.parent


def this_python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


# --- build -------------------------------------------------------------------------------


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"gpu-check: {' '.join(cmd)} failed:\n{res.stderr[-4000:]}")


def install_site(site: Path, python_version: str) -> None:
    """flexmesh (as a wheel built from this checkout) and what it needs, for Python X.Y."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-wheel-") as wheels:
        pip("wheel", "-q", "--no-deps", "-w", wheels, str(repo_root()))
        built = sorted(Path(wheels).glob("flexmesh-*.whl"))
        target = ["--python-version", python_version, "--implementation", "cp",
                  "--abi", "cp" + python_version.replace(".", "")]
        for plat in PLATFORMS:
            target += ["--platform", plat]
        cross = [] if python_version == this_python() else target
        pip("install", "-q", "--no-compile", "--only-binary=:all:", "--target", str(site),
            *cross, str(built[0]), *EXTRA)
    for path in repo_root().glob("build"):
        shutil.rmtree(path, ignore_errors=True)


def prune(site: Path) -> None:
    """Leave what runs: no scripts with the build machine's paths, no bytecode, no
    dependencies' own tests; shared libraries without their debug symbols."""
    shutil.rmtree(site / "bin", ignore_errors=True)
    for path in sorted(site.rglob("*"), reverse=True):
        if path.is_dir() and (path.name == "__pycache__" or (
                path.name in ("tests", "test") and path.parent != site)):
            shutil.rmtree(path, ignore_errors=True)
    strip = shutil.which("strip")
    if strip:
        for lib in site.rglob("*.so*"):
            subprocess.run([strip, "--strip-unneeded", str(lib)], capture_output=True)


def size_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def packages(site: Path) -> list[str]:
    found = []
    for info in sorted(site.glob("*.dist-info")):
        name, _, version = info.name[: -len(".dist-info")].partition("-")
        found.append(f"{name}=={version}")
    return found


def git_commit() -> str:
    res = subprocess.run(["git", "-C", str(repo_root()), "describe", "--always", "--dirty"],
                         capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


def build(bundle: Path, python_version: str) -> int:
    if bundle.exists() and any(bundle.iterdir()) and not (bundle / "manifest.json").exists():
        raise SystemExit(f"gpu-check: {bundle} exists and is not a gpu-check bundle")
    shutil.rmtree(bundle, ignore_errors=True)
    (bundle / "tests").mkdir(parents=True)
    started = time.monotonic()
    install_site(bundle / "site", python_version)
    prune(bundle / "site")
    for name in TESTS:
        shutil.copy(repo_root() / "tests" / name, bundle / "tests" / name)
    (bundle / "pytest.ini").write_text(PYTEST_INI)
    for name in ("gpu_check.py", "gpu-check"):
        shutil.copy(HERE / name, bundle / name)
    size = size_bytes(bundle)
    manifest = {"python_version": python_version, "platform": "linux x86_64",
                "commit": git_commit(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime()),
                "size_bytes": size, "packages": packages(bundle / "site")}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    emit(built=str(bundle), size_mib=round(size / 2**20, 1), limit_mib=LIMIT_MIB,
         python_version=python_version, commit=manifest["commit"],
         packages=manifest["packages"], seconds=round(time.monotonic() - started, 1))
    if size > LIMIT_MIB * 2**20:
        print(f"gpu-check: the bundle is {size / 2**20:.1f} MiB, over {LIMIT_MIB} MiB",
              file=sys.stderr)
        return 1
    return 0


# --- run ---------------------------------------------------------------------------------


def find_python(version: str) -> str | None:
    """An interpreter of ``version`` on this host (the bundle's wheels are built for it)."""
    candidates = [sys.executable, shutil.which(f"python{version}"), shutil.which("python3"),
                  f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    for exe in candidates:
        if not exe or not os.path.exists(exe):
            continue
        res = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True)
        if res.stdout.strip() == version:
            return exe
    return None


def probe() -> int:
    """Run under the bundle's Python: what NVML and flexmesh's nvml backend report."""
    import pynvml

    from flexmesh.agent.devices.nvml import NvmlBackend

    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    try:
        pynvml.nvmlInit()
    except Exception as err:
        emit(nvml=None, error=f"NVML does not load here: {err}")
        return 0
    emit(nvml={"driver_version": text(pynvml.nvmlSystemGetDriverVersion()),
               "cuda_driver_version": pynvml.nvmlSystemGetCudaDriverVersion(),
               "nvml_version": text(pynvml.nvmlSystemGetNVMLVersion()),
               "gpus": pynvml.nvmlDeviceGetCount(),
               "nvidia_smi": shutil.which("nvidia-smi"),
               "mps_control": shutil.which("nvidia-cuda-mps-control")})
    for index in range(pynvml.nvmlDeviceGetCount()):
        emit(device=probe_gpu(pynvml, index, text))
    backend = NvmlBackend.try_open()
    if backend is not None:
        emit(flexmesh_devices=[{"id": d.id, "model": d.model, "memory_mib": d.memory_mib,
                                "healthy": d.healthy} for d in backend.discover()])
        backend.close()
    pynvml.nvmlShutdown()
    return 0


def probe_gpu(pynvml: Any, index: int, text: Any) -> dict[str, Any]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    info: dict[str, Any] = {
        "index": index, "name": text(pynvml.nvmlDeviceGetName(handle)),
        "uuid": text(pynvml.nvmlDeviceGetUUID(handle)),
        "memory_total_mib": int(memory.total) // 2**20,
        "memory_used_mib": int(memory.used) // 2**20}
    for key, call in (("mig_mode", "nvmlDeviceGetMigMode"),
                      ("compute_mode", "nvmlDeviceGetComputeMode"),
                      ("processes", "nvmlDeviceGetComputeRunningProcesses")):
        try:
            value = getattr(pynvml, call)(handle)
        except pynvml.NVMLError as err:
            info[key] = f"error: {err}"
            continue
        if key == "mig_mode":
            value = {"current": int(value[0]), "pending": int(value[1])}
        elif key == "processes":
            value = len(value)
        info[key] = value
    return info


def run_env(bundle: Path, out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(bundle / "site"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
               PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
               FLEXMESH_GPU_REPORT=str(out / "records.jsonl"))
    return env


def _pump(proc: subprocess.Popen[str], log: Any) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        sys.stderr.write(line)


def run_pytest(python: str, bundle: Path, out: Path, seconds: float) -> bool:
    """The gpu tests, output to stderr and OUT/pytest.log; False when the time ran out."""
    cmd = [python, "-s", "-m", "pytest", "-p", "pytest_timeout", "-p", "no:cacheprovider",
           "-m", "gpu", "-v", "--junitxml", str(out / "junit.xml"),
           "tests/test_gpu_real.py", "tests/test_devices_nvml.py"]
    with open(out / "pytest.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=bundle, env=run_env(bundle, out), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        pump = threading.Thread(target=_pump, args=(proc, log), daemon=True)
        pump.start()
        try:
            proc.wait(timeout=max(1.0, seconds))
            return True
        except subprocess.TimeoutExpired:
            print(f"gpu-check: out of time after {seconds:.0f} s; stopping the tests",
                  file=sys.stderr)
            os.killpg(proc.pid, signal.SIGTERM)  # pytest's own session: it and its agents
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return False
        finally:
            pump.join(timeout=10)


def test_results(junit: Path) -> list[dict[str, Any]]:
    if not junit.exists():
        return []
    results = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error"}.get(tag, tag)
                message = (found.get("message") or "")[:500]
                break
        results.append({"test": f"{case.get('classname')}::{case.get('name')}",
                        "outcome": outcome, "duration_s": round(float(case.get("time", 0)), 1),
                        "message": message})
    return results


def run(bundle: Path, out: Path, budget: float) -> int:
    started = time.monotonic()
    manifest = json.loads((bundle / "manifest.json").read_text())
    python = find_python(manifest["python_version"])
    emit(check="start", host=platform.node(), bundle=str(bundle), commit=manifest["commit"],
         python_needed=manifest["python_version"], python=python, budget_s=budget)
    if python is None:
        emit(summary={"verdict": "cannot run",
                      "why": f"no Python {manifest['python_version']} on this host: build "
                             "with --python-version for the one here"})
        return 3
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("junit.xml", "records.jsonl", "pytest.log"):
        (out / stale).unlink(missing_ok=True)
    env = run_env(bundle, out)
    res = subprocess.run([python, "-s", str(bundle / "gpu_check.py"), "--probe"], env=env,
                         capture_output=True, text=True, timeout=120)
    sys.stdout.write(res.stdout)
    if res.returncode != 0:
        emit(probe_error=res.stderr[-2000:])
    finished = run_pytest(python, bundle, out, budget - (time.monotonic() - started) - 10)
    return report(out, finished, time.monotonic() - started)


def report(out: Path, finished: bool, elapsed: float) -> int:
    results = test_results(out / "junit.xml")
    for r in results:
        emit(**r)
    records = out / "records.jsonl"
    if records.exists():
        for line in records.read_text().splitlines():
            emit(measured=json.loads(line))
    counts = {k: sum(r["outcome"] == k for r in results)
              for k in ("passed", "failed", "error", "skipped")}
    if not finished or counts["failed"] or counts["error"]:
        verdict, rc = ("out of time" if not finished else "failed"), 1
    elif counts["passed"] == 0:
        verdict, rc = "nothing ran (no GPU?)", 2
    else:
        verdict, rc = "passed", 0
    emit(summary={"verdict": verdict, **counts, "total_s": round(elapsed, 1)})
    return rc


def default_bundle() -> Path:
    return HERE if (HERE / "manifest.json").exists() else repo_root() / ".gpu-check"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--build", metavar="DIR", help="make the bundle in DIR (needs pip)")
    mode.add_argument("--run", nargs="?", const="", metavar="DIR",
                      help="run the check from bundle DIR (default: .gpu-check)")
    mode.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--python-version", default=this_python(),
                   help="build for this Python X.Y (the GPU host's; default: this one's)")
    p.add_argument("--out", help="report files (junit.xml, pytest.log): default DIR/out")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run")
    args = p.parse_args(argv)
    if args.probe:
        return probe()
    if args.build:
        return build(Path(args.build).resolve(), args.python_version)
    bundle = Path(args.run).resolve() if args.run else default_bundle()
    if not (bundle / "manifest.json").exists():
        emit(summary={"verdict": "cannot run", "why": f"no bundle at {bundle}: "
                      "make one with scripts/gpu-check --build DIR"})
        return 3
    return run(bundle, Path(args.out).resolve() if args.out else bundle / "out", args.budget)


if __name__ == "__main__":
    sys.exit(main())
