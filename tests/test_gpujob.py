"""The ctypes GPU job program (tests/gpujob.py) without a GPU: its arguments, its exit
codes, and what it prints when libcuda is missing or an allocation is refused (a fake
driver stands in for libcuda)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import gpujob
import pytest

PROGRAM = Path(__file__).with_name("gpujob.py")
OOM = 2  # CUDA_ERROR_OUT_OF_MEMORY


def test_defaults() -> None:
    args = gpujob.parse_args([])
    assert (args.mib, args.seconds, args.device, args.busy) == (256, 5.0, 0, False)
    assert args.libcuda == "libcuda.so.1"


def test_every_option() -> None:
    args = gpujob.parse_args(["--mib", "20480", "--seconds", "1.5", "--device", "3", "--busy"])
    assert (args.mib, args.seconds, args.device, args.busy) == (20480, 1.5, 3, True)


@pytest.mark.parametrize("argv", [
    ["--mib", "-1"], ["--mib", "lots"], ["--seconds", "-2"], ["--seconds", "nan"],
    ["--device", "-1"], ["--mib", str(1 << 30)], ["--busy", "--mib", "0"], ["--bogus"],
])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert gpujob.main(argv) == gpujob.EXIT_USAGE
    assert "gpujob.py: error:" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpujob.main(["--help"]) == 0
    assert "--mib" in capsys.readouterr().out


def test_no_libcuda_is_exit_3_with_a_message(tmp_path: Path) -> None:
    missing = tmp_path / "libcuda.so.1"
    res = subprocess.run([sys.executable, str(PROGRAM), "--libcuda", str(missing)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == gpujob.EXIT_NO_LIBCUDA
    assert res.stderr.startswith(f"gpujob: cannot load {missing}")
    assert res.stdout == ""


def test_uuid_is_written_as_nvml_writes_it() -> None:
    raw = bytes.fromhex("0123456789abcdef0011223344556677")
    assert gpujob.format_uuid(raw) == "GPU-01234567-89ab-cdef-0011-223344556677"


class FakeDriver:
    """The driver calls gpujob makes, answering CUDA_SUCCESS unless told otherwise."""

    def __init__(self, free_mib: int) -> None:
        self.free = free_mib * gpujob.MIB
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("cu") or name == "cuDeviceGetUuid_v2":
            raise AttributeError(name)

        def call(*args: Any) -> int:
            self.calls.append(name)
            if name == "cuMemAlloc_v2":
                return OOM if args[1].value > self.free else 0
            if name == "cuGetErrorName":
                args[1]._obj.value = b"CUDA_ERROR_OUT_OF_MEMORY"
            if name == "cuCtxCreate_v2":
                args[0]._obj.value = 0x1000
            if name == "cuDeviceGetName":
                args[0].value = b"Fake GPU"
            return 0

        return call


def test_an_allocation_beyond_the_limit_reports_the_cuda_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    driver = FakeDriver(free_mib=1024)
    assert gpujob.run(gpujob.parse_args(["--mib", "2048", "--seconds", "0"]), driver) == 5
    out = capsys.readouterr()
    assert out.err == "gpujob: cuMemAlloc_v2 of 2048 MiB failed: CUDA_ERROR_OUT_OF_MEMORY\n"
    line = json.loads(out.out)
    assert line["event"] == "alloc_failed" and line["error"] == "CUDA_ERROR_OUT_OF_MEMORY"
    assert "cuMemFree_v2" not in driver.calls


def test_a_job_within_the_limit_allocates_touches_holds_and_frees(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-x")
    driver = FakeDriver(free_mib=1024)
    args = gpujob.parse_args(["--mib", "512", "--seconds", "0.05", "--busy"])
    assert gpujob.run(args, driver) == 0
    allocated, done = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert allocated["event"] == "allocated" and allocated["mib"] == 512
    assert allocated["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-x"
    assert allocated["device_name"] == "Fake GPU"
    assert allocated["device_uuid"] == "GPU-00000000-0000-0000-0000-000000000000"
    assert done["event"] == "done" and done["memsets"] >= 1
    assert driver.calls[:3] == ["cuInit", "cuDeviceGet", "cuCtxCreate_v2"]
    assert driver.calls[-2:] == ["cuMemFree_v2", "cuCtxDestroy_v2"]


def test_a_failing_cuda_call_is_exit_4(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    class NoDevice(FakeDriver):
        def __getattr__(self, name: str) -> Any:
            if name == "cuDeviceGet":
                return lambda *args: 100  # CUDA_ERROR_NO_DEVICE
            return super().__getattr__(name)

    monkeypatch.setattr(gpujob, "load_libcuda", lambda path: NoDevice(0))
    assert gpujob.main(["--seconds", "0"]) == gpujob.EXIT_CUDA_ERROR
    assert capsys.readouterr().err.startswith("gpujob: cuDeviceGet failed:")
