from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexmesh.agent.devices.ascend import (
    AscendBackend,
    parse_info,
    parse_mapping,
    parse_proc_mem,
    parse_usages,
    usage_utilization,
    vnpu_template,
)
from flexmesh.agent.devices.base import Backend, DeviceSample

DATA = Path(__file__).parent / "data" / "npu-smi"
JOB = 4242


def recorded(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


class FakeNpuSmi:
    """Answers npu-smi command lines with recorded outputs; records what was asked."""

    def __init__(self, outputs: dict[tuple[str, ...], str]) -> None:
        self.outputs = outputs
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        args = tuple(argv[1:])
        self.calls.append(args)
        if args not in self.outputs:
            raise subprocess.CalledProcessError(2, list(argv), "", "unsupported")
        return self.outputs[args]


def by_id(samples: list[DeviceSample]) -> dict[str, DeviceSample]:
    return {s.id: s for s in samples}


# -- parsing each layout -----------------------------------------------------------------


def test_parse_910b_layout() -> None:
    info = parse_info(recorded("info-910b.txt"))
    assert info.layout == "hbm" and info.has_process_table
    assert [(c.npu_id, c.chip, c.name, c.health) for c in info.chips] == [
        (0, 0, "910B3", "OK"),
        (1, 0, "910B3", "OK"),
        (2, 0, "910B3", "Warning"),
        (3, 0, "910B3", "Critical"),
    ]
    first = info.chips[0]
    # HBM-Usage(MB) is the device memory; Memory-Usage(MB) reads 0 / 0 on 910B.
    assert (first.memory_used_mib, first.memory_total_mib) == (41310, 65536)
    assert (first.aicore_pct, first.power_w, first.temperature_c) == (62, 183.4, 47)
    assert first.bus_id == "0000:C1:00.0" and first.logic_id is None
    assert [(p.npu_id, p.chip, p.pid, p.name, p.memory_mib) for p in info.processes] == [
        (0, 0, 4242, "python3", 30720),
        (0, 0, 5151, "train_llm", 7168),
    ]


def test_parse_310p_duo_layout() -> None:
    info = parse_info(recorded("info-310p.txt"))
    assert info.layout == "memory" and info.has_process_table
    assert [(c.npu_id, c.chip, c.logic_id, c.health) for c in info.chips] == [
        (8, 0, 0, "OK"),
        (8, 1, 1, "OK"),
        (9, 0, 2, "Alarm"),
        (9, 1, 3, "UNKNOWN"),
    ]
    chip = info.chips[0]
    assert (chip.memory_used_mib, chip.memory_total_mib, chip.aicore_pct) == (5734, 21527, 12)
    assert chip.power_w is None  # 310P prints NA for power
    assert [(p.pid, p.memory_mib) for p in info.processes] == [(31337, 3968), (4242, 512)]


def test_parse_310b_layout() -> None:
    info = parse_info(recorded("info-310b.txt"))
    assert info.layout == "memory" and not info.has_process_table
    (chip,) = info.chips
    assert (chip.name, chip.logic_id, chip.bus_id, chip.health) == ("310B4", 0, "NA", "OK")
    assert (chip.memory_used_mib, chip.memory_total_mib, chip.aicore_pct) == (2917, 7545, 34)
    assert chip.power_w == 8.6


def test_parse_memory_usage_not_available() -> None:
    text = recorded("info-310b.txt").replace("2917 / 7545", "NA / 7545")
    chip = parse_info(text).chips[0]
    assert chip.memory_used_mib is None and chip.memory_total_mib == 7545


@pytest.mark.parametrize(
    "text", ["", "npu-smi: command not found", "dcmi module initialize failed"]
)
def test_parse_info_rejects_output_without_a_table(text: str) -> None:
    with pytest.raises(ValueError, match="no NPU table"):
        parse_info(text)


@given(st.text(alphabet=st.sampled_from("| 0123456789abcNPUChipOK/.:=+-\n"), max_size=400))
def test_parse_info_fails_only_with_valueerror(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_info(text)


@given(
    st.sampled_from(["info-910b.txt", "info-310p.txt", "info-310b.txt"]),
    st.lists(st.tuples(st.integers(0, 3000), st.text(max_size=3)), max_size=8),
)
def test_parse_info_survives_corrupted_recordings(name: str, edits: list[tuple[int, str]]) -> None:
    text = recorded(name)
    for position, replacement in edits:
        position %= len(text)
        text = text[:position] + replacement + text[position + 1 :]
    with contextlib.suppress(ValueError):
        info = parse_info(text)
        assert all(c.memory_total_mib >= 0 for c in info.chips)


def test_parse_mapping() -> None:
    assert parse_mapping(recorded("mapping-910b.txt")) == {
        (0, 0): 0,
        (1, 0): 1,
        (2, 0): 2,
        (3, 0): 3,
    }


@pytest.mark.parametrize(
    ("name", "utilization", "fields"),
    [
        (
            "usages-910b.txt",
            71,
            {
                "HBM Capacity(MB)": 65536,
                "HBM Usage Rate(%)": 63,
                "Aicore Usage Rate(%)": 62,
                "Aivector Usage Rate(%)": 18,
            },
        ),
        ("usages-310p.txt", 12, {"DDR Capacity(MB)": 21527, "Vectorcore Usage Rate(%)": 5}),
        (
            "usages-310b.txt",
            34,
            {
                "Memory Capacity(MB)": 7545,
                "Memory Usage Rate(%)": 38,
                "Memory Bandwidth Usage Rate(%)": 9,
            },
        ),
    ],
)
def test_parse_usages(name: str, utilization: int, fields: dict[str, int]) -> None:
    parsed = parse_usages(recorded(name))
    assert usage_utilization(parsed) == utilization
    for key, value in fields.items():
        assert parsed[key] == value


def test_usages_with_na_fields() -> None:
    parsed = parse_usages("\tAicore Usage Rate(%)           : NA\n\tChip ID : 0\n")
    assert "Aicore Usage Rate(%)" not in parsed and usage_utilization(parsed) is None


def test_parse_proc_mem() -> None:
    assert parse_proc_mem(recorded("proc-mem-310b.txt")) == [
        (2718, "yolo_edge", 1260),
        (4242, "python3", 640),
    ]
    assert parse_proc_mem(recorded("proc-mem-idle.txt")) == []


# -- the backend ---------------------------------------------------------------------------


def backend_910b(**extra: str) -> tuple[AscendBackend, FakeNpuSmi]:
    outputs = {("info",): recorded("info-910b.txt"), ("info", "-m"): recorded("mapping-910b.txt")}
    outputs.update({tuple(k.split()): v for k, v in extra.items()})
    fake = FakeNpuSmi(outputs)
    return AscendBackend("/usr/local/sbin/npu-smi", runner=fake), fake


def test_910b_devices() -> None:
    backend, fake = backend_910b()
    devices: list = backend.discover()
    assert [(d.id, d.model, d.memory_mib, d.healthy) for d in devices] == [
        ("npu0", "Ascend 910B3", 65536, True),
        ("npu1", "Ascend 910B3", 65536, True),
        ("npu2", "Ascend 910B3", 65536, True),  # Warning is still usable
        ("npu3", "Ascend 910B3", 65536, False),  # Critical is not
    ]
    assert devices[1].visible_env == {"ASCEND_RT_VISIBLE_DEVICES": "1"}
    assert all(d.kind == "npu" and d.backend == "ascend" for d in devices)
    assert fake.calls == [("info",), ("info", "-m")]


def test_910b_logical_ids_come_from_the_mapping() -> None:
    # A host whose physical NPUs 0..3 are logical devices 4..7 (the rest are elsewhere).
    rows = [f"\t{npu:<30} {0:<30} {npu + 4:<30} Ascend 910B3" for npu in range(4)]
    mapping = "\tNPU ID   Chip ID   Chip Logic ID   Chip Name\n" + "\n".join(rows) + "\n"
    backend, _ = backend_910b(**{"info -m": mapping})
    devices = backend.discover()
    assert [d.id for d in devices] == ["npu4", "npu5", "npu6", "npu7"]
    assert devices[0].visible_env == {"ASCEND_RT_VISIBLE_DEVICES": "4"}


def test_910b_without_mapping_numbers_in_table_order() -> None:
    fake = FakeNpuSmi({("info",): recorded("info-910b.txt")})
    backend = AscendBackend(runner=fake)
    assert [d.id for d in backend.discover()] == ["npu0", "npu1", "npu2", "npu3"]


def test_910b_sample() -> None:
    backend, _ = backend_910b()
    samples = by_id(backend.sample(frozenset({JOB})))
    npu0 = samples["npu0"]
    assert npu0.healthy and npu0.detail == ""
    assert npu0.job_memory_mib == {JOB: 30720}
    assert npu0.memory_used_mib == 41310
    assert npu0.foreign_memory_mib == 41310 - 30720  # train_llm and the driver's reserve
    # Job and foreign process together: 62 % split by memory held (7168 of 37888).
    assert npu0.foreign_compute_milli == 620 * 7168 // 37888
    assert (npu0.temperature_c, npu0.power_mw, npu0.utilization_pct) == (47, 183400, 62)
    assert samples["npu1"].foreign_memory_mib == 3382 and samples["npu1"].job_memory_mib == {}
    assert samples["npu2"].healthy and samples["npu2"].detail == "npu-smi health Warning"
    assert not samples["npu3"].healthy and "Critical" in samples["npu3"].detail


def test_910b_sample_without_jobs_makes_everything_foreign() -> None:
    backend, _ = backend_910b()
    npu0 = by_id(backend.sample(frozenset()))["npu0"]
    assert (npu0.foreign_memory_mib, npu0.foreign_compute_milli) == (41310, 620)


def test_usage_detail_reads_npu_utilization() -> None:
    backend, fake = backend_910b(**{"info -t usages -i 1 -c 0": recorded("usages-910b.txt")})
    backend.usage_detail = True
    samples = by_id(backend.sample(frozenset()))
    assert samples["npu1"].utilization_pct == 71  # NPU Utilization(%), not AICore(%)
    assert samples["npu1"].foreign_compute_milli == 710
    assert samples["npu0"].utilization_pct == 62  # usages failed: falls back to the table
    assert ("info", "-t", "usages", "-i", "0", "-c", "0") in fake.calls


def test_310p_duo_sample() -> None:
    fake = FakeNpuSmi({("info",): recorded("info-310p.txt")})
    backend = AscendBackend(runner=fake)
    devices = backend.discover()
    assert [(d.id, d.memory_mib, d.healthy) for d in devices] == [
        ("npu0", 21527, True),
        ("npu1", 21527, True),
        ("npu2", 21527, False),  # Alarm
        ("npu3", 21527, False),  # UNKNOWN
    ]
    assert devices[3].visible_env == {"ASCEND_RT_VISIBLE_DEVICES": "3"}
    assert fake.calls == [("info",)]  # the Device column gives logical ids: no -m needed
    samples = by_id(backend.sample(frozenset({JOB})))
    assert samples["npu0"].job_memory_mib == {JOB: 512}
    assert samples["npu0"].foreign_memory_mib == 5734 - 512
    assert samples["npu1"].foreign_memory_mib == 1706 and samples["npu1"].job_memory_mib == {}
    assert not samples["npu2"].healthy and "Alarm" in samples["npu2"].detail
    assert samples["npu0"].power_mw is None


def test_310b_uses_proc_mem_for_processes() -> None:
    fake = FakeNpuSmi(
        {
            ("info",): recorded("info-310b.txt"),
            ("info", "-t", "proc-mem", "-i", "0", "-c", "0"): recorded("proc-mem-310b.txt"),
        }
    )
    backend = AscendBackend(runner=fake)
    (device,) = backend.discover()
    assert (device.id, device.model, device.memory_mib) == ("npu0", "Ascend 310B4", 7545)
    (sample,) = backend.sample(frozenset({JOB}))
    assert sample.job_memory_mib == {JOB: 640}
    assert sample.foreign_memory_mib == 2917 - 640
    assert sample.foreign_compute_milli == 340 * 1260 // 1900


def test_310b_memory_not_available_falls_back_to_process_memory() -> None:
    info = recorded("info-310b.txt").replace("2917 / 7545", "NA / 7545")
    fake = FakeNpuSmi(
        {
            ("info",): info,
            ("info", "-t", "proc-mem", "-i", "0", "-c", "0"): recorded("proc-mem-310b.txt"),
        }
    )
    (sample,) = AscendBackend(runner=fake).sample(frozenset({JOB}))
    assert (sample.memory_used_mib, sample.foreign_memory_mib) == (1900, 1260)


def test_310b_without_process_information_is_conservative() -> None:
    fake = FakeNpuSmi({("info",): recorded("info-310b.txt")})
    backend = AscendBackend(runner=fake)
    (sample,) = backend.sample(frozenset({JOB}))
    assert sample.healthy and "per-process memory unavailable" in sample.detail
    assert sample.foreign_memory_mib == 2917 and sample.foreign_compute_milli == 340


def test_npu_smi_failure_marks_devices_unhealthy_and_never_raises() -> None:
    backend, fake = backend_910b()
    backend.discover()
    fake.outputs[("info",)] = "dcmi module initialize failed. ret is -8005\n"
    samples = backend.sample(frozenset())
    assert len(samples) == 4
    assert all(not s.healthy and "npu-smi info failed" in s.detail for s in samples)
    del fake.outputs[("info",)]
    assert all(not s.healthy for s in backend.sample(frozenset()))
    assert len(backend.discover()) == 4  # the devices it knew stay known


def test_a_chip_that_disappears_is_reported() -> None:
    backend, fake = backend_910b()
    backend.discover()
    text = recorded("info-910b.txt")
    start = text.index("| 1     910B3")
    fake.outputs[("info",)] = text[:start] + text[text.index("| 2     910B3") :]
    samples = by_id(backend.sample(frozenset()))
    assert not samples["npu1"].healthy and "no longer listed" in samples["npu1"].detail
    assert samples["npu0"].healthy


def test_no_npu_smi_at_all() -> None:
    backend: Backend = AscendBackend("/nonexistent/npu-smi")
    assert backend.discover() == []
    assert backend.sample(frozenset()) == []
    backend.close()


# -- vNPU templates -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "compute", "memory", "template"),
    [
        ("310P3", 125, 1024, "vir01"),
        ("Ascend 310P3", 125, 4096, "vir02"),  # memory decides
        ("310P3", 250, 1024, "vir02"),
        ("310P3", 251, 1024, "vir04"),
        ("310P3", 500, 12288, "vir04"),
        ("310P3", 501, 1024, None),  # more than the largest template: the whole chip
        ("910B3", 250, 16384, "vir05_1c_16g"),
        ("Ascend910B3", 250, 16385, "vir10_3c_32g"),
        ("910B3", 500, 32768, "vir10_3c_32g"),
        ("910B3", 600, 1, None),
        ("910B4", 100, 8000, "vir05_1c_8g"),
        ("910B4", 400, 9000, "vir10_3c_16g"),
        ("910B2", 250, 1, "vir06_1c_16g"),
        ("910B1", 500, 20000, "vir12_3c_32g"),
        ("910ProB", 60, 2048, "vir02"),
        ("910A", 500, 1, "vir16"),
        ("310B4", 100, 100, None),  # no vNPU on 310B
        ("NVIDIA H100", 100, 100, None),
        ("910B3", 0, 100, None),
    ],
)
def test_vnpu_template(model: str, compute: int, memory: int, template: str | None) -> None:
    assert vnpu_template(model, compute, memory) == template
