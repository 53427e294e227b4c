from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_pynvml import FakeGpu, FakeNvml
from hypothesis import given
from hypothesis import strategies as st

from flexmesh.agent.devices.ascend import AscendBackend
from flexmesh.agent.devices.base import Backend, Device
from flexmesh.agent.devices.discovery import discover_backends, find_npu_smi
from flexmesh.agent.devices.nvml import NvmlBackend
from flexmesh.agent.devices.sim import SimBackend, parse_sim_devices


def test_spec_numbers_devices_per_kind() -> None:
    devices = parse_sim_devices("gpu:2x16GiB,npu:1x32GiB")
    assert [(d.id, d.kind, d.memory_mib) for d in devices] == [
        ("gpu0", "gpu", 16384),
        ("gpu1", "gpu", 16384),
        ("npu0", "npu", 32768),
    ]
    assert {d.model for d in devices} == {"sim-gpu-16GiB", "sim-npu-32GiB"}  # one per size
    assert all(d.backend == "sim" and d.compute_milli == 1000 and d.healthy for d in devices)
    assert all(d.visible_env == {} for d in devices)


def test_spec_keeps_counting_across_entries_of_one_kind() -> None:
    devices = parse_sim_devices("gpu:1x8GiB, npu:1x4G ,GPU:2x512")
    assert [d.id for d in devices] == ["gpu0", "npu0", "gpu1", "gpu2"]
    assert [d.memory_mib for d in devices] == [8192, 4096, 512, 512]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("", "empty"),
        ("gpu", "malformed"),
        ("gpu:2", "malformed"),
        ("gpu:x16GiB", "malformed"),
        ("gpu:2x", "malformed"),
        ("gpu:2x16GiB,", "malformed"),
        ("tpu:1x16GiB", "unknown device kind"),
        ("gpu:0x16GiB", "count of zero"),
        ("gpu:1x0", "no memory"),
        ("gpu:1x16QiB", "invalid size"),
        ("gpu:5000x1G", "too many"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_sim_devices(spec)


@given(
    st.lists(
        st.tuples(st.sampled_from(["gpu", "npu"]), st.integers(1, 5), st.integers(1, 65536)),
        min_size=1,
        max_size=6,
    )
)
def test_spec_round_trip(entries: list[tuple[str, int, int]]) -> None:
    spec = ",".join(f"{kind}:{count}x{mib}MiB" for kind, count, mib in entries)
    devices = parse_sim_devices(spec)
    assert len(devices) == sum(count for _, count, _ in entries)
    assert len({d.id for d in devices}) == len(devices)
    for kind in ("gpu", "npu"):
        ids = [d.id for d in devices if d.kind == kind]
        assert ids == [f"{kind}{i}" for i in range(len(ids))]


def _backend(tmp_path: Path, load: object | None = None, raw: str | None = None) -> SimBackend:
    path = tmp_path / "load.json"
    if raw is not None:
        path.write_text(raw)
    elif load is not None:
        path.write_text(json.dumps(load))
    return SimBackend(parse_sim_devices("gpu:2x16GiB,npu:1x32GiB"), path)


def test_sim_backend_satisfies_the_protocol(tmp_path: Path) -> None:
    backend: Backend = _backend(tmp_path)
    assert backend.name == "sim"
    assert [d.id for d in backend.discover()] == ["gpu0", "gpu1", "npu0"]
    backend.close()


def test_no_load_file_means_no_foreign_load(tmp_path: Path) -> None:
    for backend in (_backend(tmp_path), SimBackend(parse_sim_devices("gpu:1x1G"))):
        samples = backend.sample(frozenset())
        assert all(
            s.healthy and s.foreign_memory_mib == 0 and s.foreign_compute_milli == 0
            for s in samples
        )


def test_foreign_load_is_read_on_every_sample(tmp_path: Path) -> None:
    backend = _backend(tmp_path, {"gpu0": {"memory_mib": 4096, "compute_milli": 500}})
    sample = {s.id: s for s in backend.sample(frozenset())}
    assert (sample["gpu0"].foreign_memory_mib, sample["gpu0"].foreign_compute_milli) == (4096, 500)
    assert sample["gpu0"].utilization_pct == 50
    assert sample["gpu1"].foreign_memory_mib == 0
    # A test raises the local workload by rewriting the file.
    (tmp_path / "load.json").write_text(json.dumps({"gpu1": {"compute_milli": 900}}))
    sample = {s.id: s for s in backend.sample(frozenset())}
    assert sample["gpu0"].foreign_compute_milli == 0
    assert sample["gpu1"].foreign_compute_milli == 900


def test_load_is_clamped_to_the_device(tmp_path: Path) -> None:
    backend = _backend(tmp_path, {"gpu0": {"memory_mib": 10**9, "compute_milli": -5}})
    gpu0 = backend.sample(frozenset())[0]
    assert (gpu0.foreign_memory_mib, gpu0.foreign_compute_milli) == (16384, 0)


def test_unhealthy_through_the_load_file(tmp_path: Path) -> None:
    backend = _backend(
        tmp_path,
        {"npu0": {"healthy": False}, "gpu1": {"healthy": False, "detail": "ECC", "lost": True}},
    )
    samples = {s.id: s for s in backend.sample(frozenset())}
    assert not samples["npu0"].healthy and "sim load file" in samples["npu0"].detail
    assert not samples["gpu1"].healthy and samples["gpu1"].detail == "ECC" and samples["gpu1"].lost
    assert samples["gpu0"].healthy
    assert {d.id: d.healthy for d in backend.discover()} == {
        "gpu0": True,
        "gpu1": False,
        "npu0": False,
    }


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "{",
        "[1, 2]",
        "null",
        '"gpu0"',
        '{"gpu0": 5}',
        '{"gpu0": {"memory_mib": "lots"}}',
        '{"gpu0": {"compute_milli": true, "memory_mib": null}}',
        "\xff\xfe",
    ],
)
def test_malformed_load_file_is_no_load_and_never_raises(tmp_path: Path, raw: str) -> None:
    backend = _backend(tmp_path, raw=raw)
    samples = backend.sample(frozenset())
    assert all(
        s.healthy and s.foreign_memory_mib == 0 and s.foreign_compute_milli == 0 for s in samples
    )


def test_load_file_in_a_missing_directory(tmp_path: Path) -> None:
    backend = SimBackend([Device("gpu0", "gpu", "sim-gpu", 1024, "sim")], tmp_path / "no" / "x")
    assert backend.sample(frozenset())[0].foreign_memory_mib == 0


# -- discovery of backends (sim, NVML and Ascend together) ---------------------------------


def _npu_smi_script(directory: Path) -> Path:
    script = directory / "npu-smi"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    return script


def test_discovery_finds_nothing_on_a_bare_machine(tmp_path: Path) -> None:
    fake = FakeNvml(init_error=FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert discover_backends(None, None, None, nvml=fake, path_env=str(tmp_path)) == []


def test_discovery_with_the_real_pynvml_never_raises(tmp_path: Path) -> None:
    backends = discover_backends(None, None, None, path_env=str(tmp_path))
    assert [b.name for b in backends] in ([], ["nvml"])  # ["nvml"] on a GPU machine
    for backend in backends:
        backend.close()


def test_discovery_of_all_three_backends(tmp_path: Path) -> None:
    script = _npu_smi_script(tmp_path)
    fake = FakeNvml([FakeGpu("GPU-1")])
    backends = discover_backends(
        "gpu:1x8GiB",
        tmp_path / "load.json",
        None,
        nvml=fake,
        path_env=str(tmp_path),
        npu_smi_runner=lambda argv: "",
    )
    assert [b.name for b in backends] == ["nvml", "ascend", "sim"]
    nvml, ascend, sim = backends
    assert isinstance(nvml, NvmlBackend) and [d.id for d in nvml.discover()] == ["GPU-1"]
    assert isinstance(ascend, AscendBackend) and ascend.npu_smi_path == str(script)
    assert isinstance(sim, SimBackend) and [d.id for d in sim.discover()] == ["gpu0"]


def test_nvml_that_loads_without_gpus_is_left_out(tmp_path: Path) -> None:
    fake = FakeNvml([])
    assert discover_backends(None, None, None, nvml=fake, path_env=str(tmp_path)) == []
    assert fake.shutdowns == 1


def test_nvml_can_be_disabled(tmp_path: Path) -> None:
    fake = FakeNvml([FakeGpu("GPU-1")])
    assert discover_backends(None, None, None, False, nvml=fake, path_env=str(tmp_path)) == []
    assert "nvmlInit" not in fake.calls


def test_npu_smi_at_a_configured_path(tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    script = _npu_smi_script(tools)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_npu_smi(str(script), str(empty)) == str(script)
    # A configured path that is wrong falls back to PATH; not executable counts as wrong.
    assert find_npu_smi(str(tmp_path / "nope"), str(tools)) == str(script)
    script.chmod(0o644)
    assert find_npu_smi(str(script), str(empty)) is None
    assert find_npu_smi(None, str(empty)) is None
    fake = FakeNvml(init_error=FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED)
    assert discover_backends(None, None, str(script), nvml=fake, path_env=str(empty)) == []


def test_a_bad_sim_spec_is_the_operators_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown device kind"):
        discover_backends("tpu:1x1G", None, None, enable_nvml=False, path_env=str(tmp_path))
