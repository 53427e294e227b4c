#!/usr/bin/env python3
"""A GPU job without a framework: the CUDA driver API through ctypes (``libcuda.so.1``).

    gpujob.py [--mib N] [--seconds S] [--device ORDINAL] [--busy] [--libcuda PATH]

Initialises CUDA, creates a context on device ORDINAL (of those CUDA_VISIBLE_DEVICES
leaves visible), allocates N MiB in one cuMemAlloc_v2 and touches it with cuMemsetD8_v2,
then holds it for S seconds: idle, or with ``--busy`` memsetting it over and over so the
device shows utilization. Then it frees the memory and exits.

It prints JSON lines on stdout (flushed): ``{"event": "allocated", ...}`` once the memory
is held (with the device's UUID and name, CUDA_VISIBLE_DEVICES and the CUDA_MPS_* it saw),
then ``{"event": "done", ...}``. On failure one line on stderr names the call and the CUDA
error (``cuGetErrorName``), e.g. ``gpujob: cuMemAlloc_v2 of 4096 MiB failed:
CUDA_ERROR_OUT_OF_MEMORY``, and the exit code says what failed:

    0 done   2 bad arguments   3 libcuda not loadable   4 a CUDA call failed
    5 the allocation failed (under MPS or HAMi-core limits: the lease was enforced)

Standard library only (Python 3.7+), so any interpreter on a GPU host can run it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from typing import Any

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NO_LIBCUDA = 3
EXIT_CUDA_ERROR = 4
EXIT_ALLOC_FAILED = 5

MIB = 1024 * 1024
CUDA_SUCCESS = 0
MAX_MIB = 1 << 24  # 16 TiB: anything above is a typo


class NoLibcuda(Exception):
    """libcuda could not be loaded: no NVIDIA driver here."""


class CudaError(Exception):
    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"{call} failed: {name} ({code})")
        self.call, self.code, self.name = call, code, name


def _non_negative(kind: type, what: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, not {text!r}") from None
        if value < 0 or value != value:  # negative or NaN
            raise argparse.ArgumentTypeError(f"{what} must not be negative: {text!r}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpujob.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=_non_negative(int, "--mib"), default=256,
                   help="device memory to allocate and hold, in MiB (default 256)")
    p.add_argument("--seconds", type=_non_negative(float, "--seconds"), default=5.0,
                   help="how long to hold it (default 5)")
    p.add_argument("--device", type=_non_negative(int, "--device"), default=0,
                   help="CUDA device ordinal among the visible ones (default 0)")
    p.add_argument("--busy", action="store_true",
                   help="memset the allocation in a loop while holding it (utilization)")
    p.add_argument("--libcuda", default="libcuda.so.1", help="the driver library to load")
    args = p.parse_args(argv)
    if args.mib > MAX_MIB:
        p.error(f"--mib {args.mib} is more than any device has")
    if args.busy and args.mib == 0:
        p.error("--busy needs memory to write: give --mib above 0")
    return args


def load_libcuda(path: str) -> Any:
    try:
        return ctypes.CDLL(path)
    except OSError as err:
        raise NoLibcuda(f"cannot load {path}: {err}") from err


class Cuda:
    """The few driver calls used here, each checked; ``lib`` is a ctypes CDLL (or a fake
    with the same functions, for tests)."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib

    def error_name(self, code: int) -> str:
        name = ctypes.c_char_p()
        try:
            if self.lib.cuGetErrorName(code, ctypes.byref(name)) == CUDA_SUCCESS and name.value:
                return str(name.value.decode())
        except AttributeError:
            pass
        return f"CUDA error {code}"

    def call(self, name: str, *args: Any) -> None:
        code = int(getattr(self.lib, name)(*args))
        if code != CUDA_SUCCESS:
            raise CudaError(name, code, self.error_name(code))

    def has(self, name: str) -> bool:
        try:
            getattr(self.lib, name)
        except AttributeError:
            return False
        return True

    def open(self, ordinal: int) -> tuple[ctypes.c_int, ctypes.c_void_p]:
        self.call("cuInit", 0)
        device = ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(device), ordinal)
        ctx = ctypes.c_void_p()
        if self.has("cuCtxCreate_v2"):
            self.call("cuCtxCreate_v2", ctypes.byref(ctx), 0, device)
        else:  # a driver without the v2 symbol: the primary context does the same here
            self.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), device)
            self.call("cuCtxSetCurrent", ctx)
        return device, ctx

    def describe(self, device: ctypes.c_int) -> dict[str, Any]:
        name = ctypes.create_string_buffer(256)
        uuid = (ctypes.c_ubyte * 16)()
        out: dict[str, Any] = {}
        try:
            self.call("cuDeviceGetName", name, 256, device)
            out["device_name"] = name.value.decode(errors="replace")
            call = "cuDeviceGetUuid_v2" if self.has("cuDeviceGetUuid_v2") else "cuDeviceGetUuid"
            self.call(call, ctypes.byref(uuid), device)
            out["device_uuid"] = format_uuid(bytes(uuid))
        except CudaError as err:  # informative only
            out["describe_error"] = str(err)
        return out


def format_uuid(raw: bytes) -> str:
    """CUDA's 16 UUID bytes as NVML and nvidia-smi write a GPU's: GPU-8-4-4-4-12 hex."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def hold(cuda: Cuda, ptr: ctypes.c_uint64, nbytes: int, seconds: float, busy: bool) -> int:
    """Hold the allocation for ``seconds``; with ``busy``, memset it until then. Returns
    the number of memsets done."""
    deadline = time.monotonic() + seconds
    passes = 0
    while time.monotonic() < deadline:
        if not busy:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            continue
        cuda.call("cuMemsetD8_v2", ptr, passes & 0xFF, ctypes.c_size_t(nbytes))
        cuda.call("cuCtxSynchronize")
        passes += 1
    return passes


def run(args: argparse.Namespace, lib: Any) -> int:
    cuda = Cuda(lib)
    device, ctx = cuda.open(args.device)
    seen = {k: v for k, v in os.environ.items()
            if k == "CUDA_VISIBLE_DEVICES" or k.startswith(("CUDA_MPS_", "FLEXMESH_"))}
    info = {"pid": os.getpid(), "ordinal": args.device, **cuda.describe(device), "env": seen}
    ptr = ctypes.c_uint64(0)
    nbytes = args.mib * MIB
    if nbytes:
        try:
            cuda.call("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(nbytes))
        except CudaError as err:
            print(f"gpujob: cuMemAlloc_v2 of {args.mib} MiB failed: {err.name}",
                  file=sys.stderr, flush=True)
            emit("alloc_failed", mib=args.mib, error=err.name, **info)
            return EXIT_ALLOC_FAILED
        cuda.call("cuMemsetD8_v2", ptr, 0, ctypes.c_size_t(nbytes))
        cuda.call("cuCtxSynchronize")
    emit("allocated", mib=args.mib, **info)
    start = time.monotonic()
    passes = hold(cuda, ptr, nbytes, args.seconds, args.busy)
    if nbytes:
        cuda.call("cuMemFree_v2", ptr)
    if cuda.has("cuCtxDestroy_v2") and ctx.value:
        cuda.call("cuCtxDestroy_v2", ctx)
    emit("done", mib=args.mib, held_s=round(time.monotonic() - start, 3), memsets=passes)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse: --help is 0, a bad argument 2
        return int(exit_.code or 0)
    try:
        lib = load_libcuda(args.libcuda)
    except NoLibcuda as err:
        print(f"gpujob: {err}", file=sys.stderr, flush=True)
        return EXIT_NO_LIBCUDA
    try:
        return run(args, lib)
    except CudaError as err:
        print(f"gpujob: {err}", file=sys.stderr, flush=True)
        return EXIT_CUDA_ERROR


if __name__ == "__main__":
    sys.exit(main())
