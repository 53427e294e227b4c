"""The terminal picture of the mesh: a golden rendering, and properties of bars and lines."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from flexmesh.agent.statusview import (
    LEASED,
    LENDABLE,
    LOCAL,
    MIN_WIDTH,
    bar,
    fmt_compute,
    render,
    shares,
    split_bar,
)
from flexmesh.agent.units import format_mib

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def device(node: str, id: str, leased: tuple[int, int], lendable: tuple[int, int],
           memory: int = 16384, kind: str = "gpu", model: str = "sim-gpu",
           healthy: bool = True) -> dict[str, Any]:
    return {"node": node, "id": id, "kind": kind, "model": model, "memory_mib": memory,
            "compute_milli": 1000, "leased_compute_milli": leased[0],
            "leased_memory_mib": leased[1], "lendable_compute_milli": lendable[0],
            "lendable_memory_mib": lendable[1], "backend": "sim", "healthy": healthy}


NODES = [
    {"name": "alpha", "address": "127.0.0.1:7001", "state": "alive", "coordinator": True,
     "devices": 2},
    {"name": "bravo", "address": "127.0.0.1:7002", "state": "alive", "coordinator": False,
     "devices": 1},
    {"name": "charlie", "address": "127.0.0.1:7003", "state": "dead", "coordinator": False,
     "devices": 0},
    {"name": "delta", "address": "127.0.0.1:7004", "state": "alive", "coordinator": False,
     "devices": 0},
]
DEVICES = [
    device("alpha", "gpu0", (250, 4096), (650, 10240)),
    device("alpha", "gpu1", (0, 0), (1000, 16384)),
    device("bravo", "npu0", (500, 32768), (0, 0), memory=65536, kind="npu",
           model="Ascend 910B", healthy=False),
]

GOLDEN_72 = """\
4 nodes (3 alive), 3 devices, coordinator alpha
# leased  ~ local  . lendable  (figures in that order)

* alpha  alive  coordinator  127.0.0.1:7001
  gpu0  gpu sim-gpu  16G
    compute [########~~~......................] 25% / 10% / 65%
    memory  [########~~~~.....................] 4G / 2G / 10G
  gpu1  gpu sim-gpu  16G
    compute [.................................] 0% / 0% / 100%
    memory  [.................................] 0 / 0 / 16G

  bravo  alive  127.0.0.1:7002
  npu0  npu Ascend 910B  64G  UNHEALTHY
    compute [#################~~~~~~~~~~~~~~~~] 50% / 50% / 0%
    memory  [#################~~~~~~~~~~~~~~~~] 32G / 32G / 0

  charlie  dead  127.0.0.1:7003

  delta  alive  127.0.0.1:7004
  (no devices)
"""


def test_golden_picture() -> None:
    assert render(NODES, DEVICES, width=72) == GOLDEN_72


def test_color_only_adds_escapes() -> None:
    painted = render(NODES, DEVICES, width=72, color=True)
    assert "\x1b[" in painted
    assert ANSI.sub("", painted) == GOLDEN_72


def test_devices_of_a_node_not_listed_still_show() -> None:
    text = render([], [device("echo", "gpu0", (0, 0), (1000, 16384))], width=60)
    assert "  echo  ?" in text and "gpu0" in text


def test_empty_mesh() -> None:
    assert render([], []) == ("0 nodes (0 alive), 0 devices, coordinator none\n"
                              "# leased  ~ local  . lendable  (figures in that order)\n\n")


def test_long_names_are_clipped() -> None:
    nodes = [{"name": "n" * 200, "address": "10.0.0.1:7946", "state": "alive",
              "coordinator": True}]
    text = render(nodes, [device("n" * 200, "g" * 100, (1, 1), (2, 2))], width=60)
    assert all(len(line) <= 60 for line in text.splitlines())
    assert "…" in text


def test_formats() -> None:
    assert [fmt_compute(x) for x in (0, 125, 250, 1000)] == ["0%", "12.5%", "25%", "100%"]
    assert [format_mib(x, "short") for x in (0, 512, 1024, 1536, 81920)] == [
        "0", "512M", "1G", "1.5G", "80G"]


def test_shares_local_is_the_rest() -> None:
    assert shares(1000, 250, 650) == (250, 100, 650)
    assert shares(1000, 600, 600) == (600, 0, 600)  # inconsistent input: never negative
    assert shares(1000, -5, 2000) == (0, 0, 2000)


def test_split_bar_cases() -> None:
    assert split_bar(10, [0, 0, 0]) == [0, 0, 10]  # nothing known: all lendable-looking
    assert split_bar(10, [1, 1, 1]) == [4, 3, 3]  # ties go to the earlier part
    assert split_bar(0, [1, 2, 3]) == [0, 0, 0]
    assert bar(8, [250, 100, 650]) == "##~....."


parts = st.lists(st.integers(min_value=0, max_value=10**7), min_size=3, max_size=3)


@given(st.integers(min_value=1, max_value=400), parts)
def test_split_bar_fills_the_bar_exactly(length: int, p: list[int]) -> None:
    widths = split_bar(length, p)
    assert sum(widths) == length and all(w >= 0 for w in widths)
    total = sum(p)
    if total:
        for w, x in zip(widths, p, strict=True):
            assert abs(w - x * length / total) < 1  # each within one cell of its share


@given(st.integers(min_value=1, max_value=200), parts)
def test_bar_characters_match_the_widths(length: int, p: list[int]) -> None:
    text = bar(length, p)
    assert len(text) == length
    assert [text.count(c) for c in (LEASED, LOCAL, LENDABLE)] == split_bar(length, p)
    assert ANSI.sub("", bar(length, p, color=True)) == text


names = st.text(alphabet=st.characters(codec="ascii", categories=("L", "N")), min_size=1,
                max_size=40)


@given(st.integers(min_value=0, max_value=300), names,
       st.integers(min_value=0, max_value=1000), st.integers(min_value=0, max_value=1 << 20),
       st.integers(min_value=0, max_value=1 << 20), st.booleans())
def test_every_line_fits_and_bars_have_one_length(width: int, name: str, leased: int,
                                                  memory: int, lend_m: int,
                                                  color: bool) -> None:
    nodes = [{"name": name, "address": "127.0.0.1:1", "state": "alive", "coordinator": True}]
    devs = [device(name, "gpu0", (leased, memory // 2), (1000 - leased, lend_m), memory=memory),
            device(name, "gpu1", (0, 0), (0, 0))]
    text = ANSI.sub("", render(nodes, devs, width=width, color=color))
    effective = max(width, MIN_WIDTH)
    bars = re.findall(r"\[([#~.]*)\]", text)
    assert len(bars) == 4 and len({len(b) for b in bars}) == 1
    for line in text.splitlines():
        assert len(line) <= effective, line
