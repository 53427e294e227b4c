"""Parsing and printing of the quantities people type: memory sizes and device fractions.

Accounting is integer everywhere (DESIGN.md, principle 6): memory in MiB, compute in
milli-devices (1000 = one whole device). The parsers below turn what a person writes into
those integers with exact rational arithmetic, never through floats.

Size rule: a plain number is MiB. A suffix ``K``, ``M``, ``G`` or ``T``, alone or followed by
``i`` or ``iB`` (``G``, ``Gi``, ``GiB``), is a *binary* unit (1 G = 1024 MiB), as device
memory is reported; followed by ``B`` alone (``KB``, ``MB``, ``GB``, ``TB``) it is the
*decimal* unit those letters mean (1 GB = 10**9 bytes: ``4GB`` is 3815 MiB), never
silently a GiB. Suffixes are case-insensitive. A size that is not a whole number of MiB is
rounded *up*, so a request is never under-served.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Literal

MILLI = 1000  # one whole device
MIB_PER_GIB = 1024
MIB_PER_TIB = 1024 * 1024

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(?:([kmgt])(i?b?))?\s*$", re.IGNORECASE)
_UNIT_MIB = {
    "": Fraction(1),
    "k": Fraction(1, 1024),
    "m": Fraction(1),
    "g": Fraction(MIB_PER_GIB),
    "t": Fraction(MIB_PER_TIB),
}
_DECIMAL_MIB = {k: Fraction(1000**i, 1 << 20) for i, k in enumerate("kmgt", 1)}
_NUMBER_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+|\d+\s*/\s*\d+)\s*$")


def parse_size(text: str) -> int:
    """``"16GiB"`` -> 16384, ``"1.5G"`` -> 1536, ``"4GB"`` -> 3815, ``"2048"`` -> 2048 (MiB)."""
    match = _SIZE_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional unit "
            "K, M, G or T (binary; e.g. 512MiB, 16GiB, 1.5G; KB, MB, GB, TB are decimal); "
            "a plain number means MiB"
        )
    number, unit = match.group(1), (match.group(2) or "").lower()
    decimal = (match.group(3) or "").lower() == "b"
    scale = _DECIMAL_MIB[unit] if decimal else _UNIT_MIB[unit]
    return math.ceil(Fraction(number) * scale)


MibStyle = Literal["long", "table", "short"]


def format_mib(mib: int, style: MibStyle = "long") -> str:
    """Memory for people to read, in one of three notations:

    ``long``   16384 -> ``"16 GiB"``, 1536 -> ``"1.5 GiB"`` (tenths), 512 -> ``"512 MiB"``,
               whole TiB as ``"1 TiB"``
    ``table``  (the CLI's tables) 16384 -> ``"16GiB"``, 1536 -> ``"1.5GiB"``: GiB only for
               whole multiples of 64 MiB (exact below 100 GiB), else MiB: 1100 -> ``"1100MiB"``
    ``short``  (``flexmesh status``) 0 -> ``"0"``, 512 -> ``"512M"``, 1536 -> ``"1.5G"``
    """
    if style == "table":
        return f"{mib / 1024:g}GiB" if mib >= 1024 and mib % 64 == 0 else f"{mib}MiB"
    if style == "short":
        if mib == 0:
            return "0"
        if abs(mib) < 1024:
            return f"{mib}M"
        return f"{round(mib / 1024, 1):g}G"
    sign, size = ("-", -mib) if mib < 0 else ("", mib)
    if size >= MIB_PER_TIB and size % MIB_PER_TIB == 0:
        return f"{sign}{size // MIB_PER_TIB} TiB"
    if size >= MIB_PER_GIB and size % MIB_PER_GIB == 0:
        return f"{sign}{size // MIB_PER_GIB} GiB"
    if size >= MIB_PER_GIB:
        tenths = round(Fraction(size * 10, MIB_PER_GIB))
        return f"{sign}{tenths // 10}.{tenths % 10} GiB"
    return f"{sign}{size} MiB"


def _parse_ratio(text: str, what: str, example: str) -> Fraction:
    match = _NUMBER_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"invalid {what} {text!r}: expected a number such as {example}")
    try:
        return Fraction(match.group(1).replace(" ", ""))
    except ZeroDivisionError:
        raise ValueError(f"invalid {what} {text!r}: division by zero") from None


def _to_milli(value: Fraction, text: str, what: str) -> int:
    milli = math.floor(value * MILLI + Fraction(1, 2))  # round half up, exactly
    if milli < 1:
        raise ValueError(f"{what} {text!r} is smaller than one thousandth of a device")
    return milli


def parse_fraction(text: str) -> int:
    """``--gpu 0.25`` -> 250 milli. Accepts ``0.25``, ``.5``, ``1`` and ``1/4``; 0 < f <= 1."""
    value = _parse_ratio(text, "device fraction", "0.25 or 1/4")
    if not 0 < value <= 1:
        raise ValueError(
            f"device fraction {text!r} is out of range: it must be above 0 and at most 1 "
            "(1 is a whole device)"
        )
    return _to_milli(value, text, "device fraction")


def parse_percent(text: str) -> int:
    """``--compute 25`` (or ``25%``) -> 250 milli; 0 < p <= 100."""
    stripped = text.strip() if isinstance(text, str) else text
    if isinstance(stripped, str) and stripped.endswith("%"):
        stripped = stripped[:-1]
    value = _parse_ratio(stripped, "compute percentage", "25 or 12.5")
    if not 0 < value <= 100:
        raise ValueError(
            f"compute percentage {text!r} is out of range: it must be above 0 and at most 100"
        )
    return _to_milli(value / 100, text, "compute percentage")


def format_milli(milli: int) -> str:
    """250 -> ``"25%"``, 125 -> ``"12.5%"`` (of one device)."""
    whole, tenth = divmod(milli, 10)
    return f"{whole}%" if tenth == 0 else f"{whole}.{tenth}%"


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmg]?)(bit|bps|b/s|ib/s)?\s*$",
                      re.IGNORECASE)


def parse_rate(text: str) -> int:
    """A transfer rate in bytes per second, as ``tc`` writes them: ``"2Mbit"`` -> 250000
    (bits, decimal: also ``kbit``, ``gbit``, ``mbps``), ``"300KB/s"`` -> 300000 (bytes,
    decimal), ``"1MiB/s"`` -> 1048576 (bytes, binary); a plain number is bytes per second,
    ``0`` none (no limit). A rate that is not a whole number of bytes is rounded down."""
    match = _RATE_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"invalid rate {text!r}: expected a number with an optional unit "
                         "such as 2Mbit, 500kbit, 300KB/s or 1MiB/s (a plain number is "
                         "bytes per second; 0: no limit)")
    number, prefix, unit = match.group(1), match.group(2).lower(), (match.group(3) or "").lower()
    if (prefix and not unit) or (unit == "ib/s" and not prefix):
        raise ValueError(f"invalid rate {text!r}: say which unit, such as 2Mbit or 2MB/s")
    scale = (1024 if unit == "ib/s" else 1000) ** ("kmg".index(prefix) + 1) if prefix else 1
    return math.floor(Fraction(number) * scale / (8 if unit in ("bit", "bps") else 1))
