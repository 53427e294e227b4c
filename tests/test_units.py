from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexmesh.agent.units import (
    format_mib,
    format_milli,
    parse_fraction,
    parse_percent,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("16GiB", 16384),
        ("16GB", 15259),  # B alone: decimal, 16 * 10**9 bytes (see the module docstring)
        ("4GB", 3815),
        ("4gb", 3815),
        ("1TB", 953675),
        ("16G", 16384),
        ("16gi", 16384),
        ("16 gib", 16384),
        ("512MiB", 512),
        ("512M", 512),
        ("512mb", 489),
        ("1KB", 1),
        ("2048KB", 2),
        ("2048", 2048),  # a plain number is MiB
        ("1.5GiB", 1536),
        (".5G", 512),
        ("1TiB", 1024 * 1024),
        ("2T", 2 * 1024 * 1024),
        ("1024KiB", 1),
        ("1K", 1),  # less than a MiB rounds up
        ("1537KiB", 2),
        ("0", 0),
        ("  64 GiB  ", 65536),
    ],
)
def test_parse_size(text: str, mib: int) -> None:
    assert parse_size(text) == mib


@pytest.mark.parametrize(
    "text", ["", "GiB", "-1GiB", "16XB", "16B", "16 G B", "1e3", "nan", "inf", "1,5G", "16GiBs"]
)
def test_parse_size_rejects_with_the_bad_text(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_size(text)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize(
    ("mib", "text"),
    [
        (16384, "16 GiB"),
        (512, "512 MiB"),
        (0, "0 MiB"),
        (1536, "1.5 GiB"),
        (1024 * 1024, "1 TiB"),
        (1024 * 1024 + 1024, "1025 GiB"),
        (15171, "14.8 GiB"),
        (-512, "-512 MiB"),
    ],
)
def test_format_mib(mib: int, text: str) -> None:
    assert format_mib(mib) == text


@pytest.mark.parametrize(
    ("mib", "text"),
    [
        (0, "0MiB"),
        (512, "512MiB"),
        (1024, "1GiB"),
        (1536, "1.5GiB"),
        (1088, "1.0625GiB"),  # a whole number of 64 MiB: in GiB
        (1100, "1100MiB"),  # not one: left in MiB rather than rounded
        (1024 * 1024, "1024GiB"),
        (-1024, "-1024MiB"),
    ],
)
def test_format_mib_table(mib: int, text: str) -> None:
    assert format_mib(mib, "table") == text


@given(st.integers(min_value=0, max_value=100 * 1024 - 1))
def test_format_mib_table_is_not_rounded_below_100_gib(mib: int) -> None:
    assert parse_size(format_mib(mib, "table")) == mib


@pytest.mark.parametrize(
    ("mib", "text"),
    [
        (0, "0"),
        (512, "512M"),
        (1024, "1G"),
        (1025, "1G"),
        (1536, "1.5G"),
        (1100, "1.1G"),
        (81920, "80G"),
        (1024 * 1024, "1024G"),
        (-512, "-512M"),
        (-1536, "-1.5G"),
    ],
)
def test_format_mib_short(mib: int, text: str) -> None:
    assert format_mib(mib, "short") == text


@given(st.integers(min_value=0, max_value=2**40))
def test_format_then_parse_whole_units_round_trips(mib: int) -> None:
    text = format_mib(mib)
    if "." not in text:
        assert parse_size(text.replace(" ", "")) == mib


@pytest.mark.parametrize(
    ("text", "milli"),
    [
        ("0.25", 250),
        ("1", 1000),
        ("1.0", 1000),
        (".5", 500),
        ("1/4", 250),
        ("0.001", 1),
        ("0.3333", 333),
        ("0.0005", 1),
        ("2/3", 667),
    ],
)
def test_parse_fraction(text: str, milli: int) -> None:
    assert parse_fraction(text) == milli


@pytest.mark.parametrize("text", ["0", "0.0", "1.01", "2", "-0.5", "abc", "", "1/0", "0.0004"])
def test_parse_fraction_rejects(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_fraction(text)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize(
    ("text", "milli"), [("25", 250), ("25%", 250), ("100", 1000), ("12.5", 125), ("0.1", 1)]
)
def test_parse_percent(text: str, milli: int) -> None:
    assert parse_percent(text) == milli


@pytest.mark.parametrize("text", ["0", "101", "-5", "x", "", "%", "0.01"])
def test_parse_percent_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_percent(text)


@given(st.integers(min_value=1, max_value=1000))
def test_fraction_and_percent_agree(milli: int) -> None:
    assert parse_fraction(f"{milli}/1000") == milli
    assert parse_percent(format_milli(milli)) == milli
