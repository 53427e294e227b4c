from __future__ import annotations

import json
import os
import threading

import pytest
from fake_pynvml import FakeGpu, FakeNvml, FakeProcess

from flexmesh.agent.devices.base import Backend, DeviceSample
from flexmesh.agent.devices.nvml import NvmlBackend

JOB = 4242
JOBS = frozenset({JOB})


def by_id(samples: list[DeviceSample]) -> dict[str, DeviceSample]:
    return {s.id: s for s in samples}


def two_gpus() -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu(
                "GPU-aaaa",
                name="NVIDIA H100 80GB HBM3",
                memory_mib=81559,
                used_mib=6000,
                utilization=70,
                temperature=55,
                power_mw=310_000,
                processes=[FakeProcess(JOB, 4000, sm_util=50), FakeProcess(77, 1500, 20)],
            ),
            FakeGpu("GPU-bbbb", memory_mib=40960, used_mib=0, utilization=0),
        ]
    )


def test_discovers_gpus_by_uuid() -> None:
    backend: Backend = NvmlBackend(nvml=two_gpus())
    devices = backend.discover()
    assert [(d.id, d.kind, d.model, d.memory_mib, d.backend) for d in devices] == [
        ("GPU-aaaa", "gpu", "NVIDIA H100 80GB HBM3", 81559, "nvml"),
        ("GPU-bbbb", "gpu", "NVIDIA A100-SXM4-40GB", 40960, "nvml"),
    ]
    assert devices[0].visible_env == {"CUDA_VISIBLE_DEVICES": "GPU-aaaa"}
    assert all(d.compute_milli == 1000 and d.healthy for d in devices)


def test_samples_readings_and_foreign_usage() -> None:
    fake = two_gpus()
    backend = NvmlBackend(nvml=fake)
    backend.discover()
    a = by_id(backend.sample(JOBS))["GPU-aaaa"]
    assert a.healthy and a.detail == ""
    assert (a.memory_used_mib, a.temperature_c, a.power_mw, a.utilization_pct) == (
        6000,
        55,
        310_000,
        70,
    )
    assert a.job_memory_mib == {JOB: 4000}
    # Foreign memory is everything but the job's: process 77 plus what nobody owns.
    assert a.foreign_memory_mib == 2000
    # Per-process SM samples: only pid 77 is foreign.
    assert a.foreign_compute_milli == 200
    assert set(a.job_util_pct) <= {JOB}  # the job's own utilization, where NVML gave it


def test_sample_discovers_lazily_and_strings_may_be_bytes() -> None:
    fake = two_gpus()
    fake.legacy_bytes = True
    backend = NvmlBackend(nvml=fake)
    assert set(by_id(backend.sample(frozenset()))) == {"GPU-aaaa", "GPU-bbbb"}
    assert backend.discover()[0].id == "GPU-aaaa"


def test_without_per_process_utilisation_compute_is_attributed() -> None:
    fake = two_gpus()
    gpu = fake.find("GPU-aaaa")
    gpu.process_util_supported = False
    backend = NvmlBackend(nvml=fake)
    # Job and foreign process together: 70 % split by memory held (1500 of 5500).
    assert by_id(backend.sample(JOBS))["GPU-aaaa"].foreign_compute_milli == 700 * 1500 // 5500
    # No job there: all of it is foreign.
    assert by_id(backend.sample(frozenset()))["GPU-aaaa"].foreign_compute_milli == 700
    gpu.processes = [FakeProcess(JOB, 4000)]
    assert by_id(backend.sample(JOBS))["GPU-aaaa"].foreign_compute_milli == 0


def test_process_without_memory_figure_and_graphics_processes() -> None:
    fake = FakeNvml(
        [
            FakeGpu(
                "GPU-c",
                used_mib=3000,
                utilization=10,
                processes=[FakeProcess(JOB, None), FakeProcess(9, 700, graphics=True)],
            )
        ]
    )
    sample = NvmlBackend(nvml=fake).sample(JOBS)[0]
    assert sample.job_memory_mib == {JOB: 0}
    assert sample.foreign_memory_mib == 3000  # the job's share is unknown: all counts


def test_optional_readings_may_be_unsupported() -> None:
    fake = FakeNvml(
        [FakeGpu("GPU-d", temperature=None, power_mw=None, process_util_supported=False)]
    )
    sample = NvmlBackend(nvml=fake).sample(frozenset())[0]
    assert sample.healthy and sample.temperature_c is None and sample.power_mw is None


def mig_machine() -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu(
                "GPU-mig-parent",
                name="NVIDIA A100-SXM4-40GB",
                mig_enabled=True,
                mig=[
                    FakeGpu(
                        "MIG-1111",
                        name="NVIDIA A100-SXM4-40GB MIG 3g.20gb",
                        memory_mib=19968,
                        used_mib=2048,
                        utilization=None,
                        temperature=None,
                        power_mw=None,
                        process_util_supported=False,
                        processes=[FakeProcess(77, 2048)],
                    ),
                    None,  # an empty slot
                    FakeGpu(
                        "MIG-2222",
                        name="NVIDIA A100-SXM4-40GB MIG 2g.10gb",
                        memory_mib=9856,
                        used_mib=1024,
                        utilization=None,
                        process_util_supported=False,
                        processes=[FakeProcess(JOB, 1024)],
                    ),
                ],
            ),
            FakeGpu("GPU-mig-capable-off", mig=[], mig_enabled=False),
        ]
    )


def test_mig_instances_are_devices_of_their_own() -> None:
    devices = NvmlBackend(nvml=mig_machine()).discover()
    assert [(d.id, d.memory_mib) for d in devices] == [
        ("MIG-1111", 19968),
        ("MIG-2222", 9856),
        ("GPU-mig-capable-off", 40960),
    ]
    assert devices[0].visible_env == {"CUDA_VISIBLE_DEVICES": "MIG-1111"}
    assert devices[0].model.endswith("MIG 3g.20gb")


def test_mig_utilisation_unknown_counts_foreign_processes_as_busy() -> None:
    samples = by_id(NvmlBackend(nvml=mig_machine()).sample(JOBS))
    assert samples["MIG-1111"].healthy
    assert samples["MIG-1111"].foreign_compute_milli == 1000
    assert samples["MIG-1111"].foreign_memory_mib == 2048
    assert samples["MIG-2222"].foreign_compute_milli == 0
    assert samples["MIG-2222"].foreign_memory_mib == 0
    assert samples["MIG-2222"].job_memory_mib == {JOB: 1024}


def test_a_failing_call_marks_only_that_device_unhealthy() -> None:
    fake = two_gpus()
    backend = NvmlBackend(nvml=fake)
    backend.discover()
    fake.fail("GPU-bbbb", "nvmlDeviceGetComputeRunningProcesses", fake.NVML_ERROR_UNKNOWN)
    samples = by_id(backend.sample(JOBS))
    assert samples["GPU-aaaa"].healthy
    b = samples["GPU-bbbb"]
    assert not b.healthy and not b.lost
    assert "nvmlDeviceGetComputeRunningProcesses" in b.detail and "Unknown Error" in b.detail
    fake.heal("GPU-bbbb")
    assert by_id(backend.sample(JOBS))["GPU-bbbb"].healthy


def test_a_gpu_that_falls_off_the_bus_is_reported_lost() -> None:
    fake = mig_machine()
    backend = NvmlBackend(nvml=fake)
    backend.discover()
    fake.lose("GPU-mig-parent")  # its MIG instances go with it
    samples = by_id(backend.sample(JOBS))
    for mig in ("MIG-1111", "MIG-2222"):
        assert not samples[mig].healthy and samples[mig].lost
        assert "fallen off the bus" in samples[mig].detail
    assert samples["GPU-mig-capable-off"].healthy


def test_discovery_survives_broken_gpus() -> None:
    fake = two_gpus()
    fake.fail("GPU-aaaa", "nvmlDeviceGetUUID", fake.NVML_ERROR_GPU_IS_LOST)
    fake.fail("GPU-bbbb", "nvmlDeviceGetName", fake.NVML_ERROR_UNKNOWN)
    backend = NvmlBackend(nvml=fake)
    devices = backend.discover()
    assert [(d.id, d.healthy) for d in devices] == [("nvml-gpu0", False), ("GPU-bbbb", False)]
    samples = by_id(backend.sample(frozenset()))
    assert "GPU 0" in samples["nvml-gpu0"].detail
    assert "nvmlDeviceGetName" in samples["GPU-bbbb"].detail


def test_discovery_survives_a_failing_count_and_mig_query() -> None:
    fake = mig_machine()
    fake.failures["nvmlDeviceGetCount"] = fake.NVML_ERROR_UNKNOWN
    assert NvmlBackend(nvml=fake).discover() == []
    fake.failures.clear()
    fake.fail("GPU-mig-parent", "nvmlDeviceGetMaxMigDeviceCount", fake.NVML_ERROR_NO_PERMISSION)
    devices = NvmlBackend(nvml=fake).discover()
    assert [(d.id, d.healthy) for d in devices] == [
        ("GPU-mig-parent", False),
        ("GPU-mig-capable-off", True),
    ]


def test_unexpected_exceptions_do_not_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = two_gpus()
    backend = NvmlBackend(nvml=fake)
    backend.discover()

    def broken(handle: FakeGpu) -> None:
        raise RuntimeError("ctypes went wrong")

    monkeypatch.setattr(fake, "nvmlDeviceGetMemoryInfo", broken)
    assert all(not s.healthy and "ctypes" in s.detail for s in backend.sample(JOBS))


def test_try_open_returns_none_without_the_library() -> None:
    fake = FakeNvml(init_error=FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert NvmlBackend.try_open(fake) is None
    assert NvmlBackend.try_open(FakeNvml(init_error=FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED)) is None
    opened = NvmlBackend.try_open(two_gpus())
    assert opened is not None and len(opened.discover()) == 2


def test_close_shuts_nvml_down_once() -> None:
    fake = two_gpus()
    backend = NvmlBackend(nvml=fake)
    backend.close()
    backend.close()
    assert fake.shutdowns == 1


def test_concurrent_samples_from_worker_threads() -> None:
    fake = two_gpus()
    backend = NvmlBackend(nvml=fake)
    results: list[int] = []

    def work() -> None:
        for _ in range(50):
            results.append(len(backend.sample(JOBS)))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [2] * 200


def _real_backend() -> NvmlBackend:
    backend = NvmlBackend.try_open()
    if backend is None or not backend.discover():
        pytest.skip("no NVIDIA GPU with a loadable libnvidia-ml here")
    return backend


@pytest.mark.gpu
def test_real_gpu_discovery_and_sampling() -> None:
    backend = _real_backend()
    try:
        devices = backend.discover()
        samples = by_id(backend.sample(frozenset({os.getpid()})))
        for device in devices:
            assert device.backend == "nvml" and device.memory_mib > 0
            assert device.id.startswith(("GPU-", "MIG-"))
            assert device.visible_env == {"CUDA_VISIBLE_DEVICES": device.id}
            sample = samples[device.id]
            assert sample.healthy, sample.detail
            assert 0 <= sample.foreign_memory_mib <= device.memory_mib
            assert 0 <= sample.foreign_compute_milli <= 1000
            assert 0 <= sample.memory_used_mib <= device.memory_mib
        # What the backend reported, for the record (pytest -s shows it).
        print(
            json.dumps(
                {
                    "devices": [d.__repr__() for d in devices],
                    "samples": [s.__repr__() for s in samples.values()],
                },
                indent=1,
            )
        )
    finally:
        backend.close()
