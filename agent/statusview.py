"""The mesh drawn for a terminal: nodes, their devices, and bars of what each device holds.

Pure: ``render(nodes, devices)`` takes the rows of ``/v1/nodes`` and ``/v1/devices`` (the
shapes ``flexmesh nodes -o json`` and ``flexmesh devices -o json`` print) and returns text;
``flexmesh status`` prints it and ``--watch`` prints it again. Every bar splits a device's
capacity three ways::

    #  leased    held by flexmesh leases
    ~  local     the owner's own use and reserve: capacity - leased - lendable
    .  lendable  what the owner can still lend to the mesh

Bars are drawn with characters, so they read without colour; ``color=True`` only adds
ANSI colours around the same text (stripping them gives the plain picture back). Every
line fits in ``width`` columns. A node on battery shows its level after its state
(``battery 57% charging``, ``battery 18% not lending``, ``battery ?`` where its own source
cannot be read).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flexmesh.agent.units import format_mib

LEASED, LOCAL, LENDABLE = "#", "~", "."
MIN_BAR = 10
NUMBERS = 25  # columns kept right of a bar for "leased / local / lendable"
_LABEL = "    compute ["  # what comes before each bar (memory's label is padded to match)
MIN_WIDTH = len(_LABEL) + MIN_BAR + 1 + NUMBERS  # narrower widths are drawn at this one

_RESET = "\x1b[0m"
_SEGMENT_COLORS = {LEASED: "\x1b[35m", LOCAL: "\x1b[33m", LENDABLE: "\x1b[32m"}
_STATE_COLORS = {"alive": "\x1b[32m", "suspect": "\x1b[33m", "dead": "\x1b[31m",
                 "left": "\x1b[2m"}
_BOLD = "\x1b[1m"


def split_bar(length: int, parts: Sequence[int]) -> list[int]:
    """Widths of ``parts`` in a bar of ``length`` cells, summing to ``length`` exactly.

    Largest remainder: each part gets its floor share, the cells left over go to the
    largest remainders (ties to the earlier part). An all-zero bar is all the last part.
    """
    clean = [max(int(p), 0) for p in parts]
    total = sum(clean)
    if length <= 0 or not clean:
        return [0] * len(clean)
    if total == 0:
        return [0] * (len(clean) - 1) + [length]
    widths = [p * length // total for p in clean]
    remainders = sorted(range(len(clean)), key=lambda i: (-(clean[i] * length % total), i))
    for i in remainders[: length - sum(widths)]:
        widths[i] += 1
    return widths


def shares(capacity: int, leased: int, lendable: int) -> tuple[int, int, int]:
    """(leased, local, lendable); local is what the other two leave of the capacity."""
    leased, lendable = max(leased, 0), max(lendable, 0)
    return leased, max(capacity - leased - lendable, 0), lendable


def bar(length: int, parts: Sequence[int], color: bool = False) -> str:
    cells = [ch * w for ch, w in zip((LEASED, LOCAL, LENDABLE), split_bar(length, parts),
                                     strict=True)]
    if color:
        cells = [_paint(c, _SEGMENT_COLORS[c[0]]) if c else c for c in cells]
    return "".join(cells)


def fmt_compute(milli: int) -> str:
    """Compute as a share of one device: 250 -> '25%', 125 -> '12.5%'."""
    return f"{milli / 10:g}%"


def render(nodes: list[dict[str, Any]], devices: list[dict[str, Any]], width: int = 80,
           color: bool = False) -> str:
    """The mesh as text, one node after another, each followed by its devices."""
    width = max(width, MIN_WIDTH)
    bar_len = width - len(_LABEL) - 1 - NUMBERS
    by_node: dict[str, list[Mapping[str, Any]]] = {}
    for d in devices:
        by_node.setdefault(str(d.get("node", "")), []).append(d)
    known = [str(n.get("name", "")) for n in nodes]
    rows: list[Mapping[str, Any]] = list(nodes)
    rows += [{"name": name, "state": "?"} for name in by_node if name not in known]
    lines = _header(nodes, devices, width, color)
    for i, n in enumerate(rows):
        name = str(n.get("name", ""))
        if i:
            lines.append("")
        lines.append(_node_line(n, width, color))
        node_devices = sorted(by_node.get(name, []), key=lambda d: str(d.get("id", "")))
        if not node_devices and n.get("state") == "alive":
            lines.append("  (no devices)")
        for dev in node_devices:
            lines.extend(_device_lines(dev, width, bar_len, color))
    return "\n".join(lines) + "\n"


def _header(nodes: list[dict[str, Any]], devices: list[dict[str, Any]], width: int,
            color: bool) -> list[str]:
    alive = sum(1 for n in nodes if n.get("state") == "alive")
    coordinator = next((str(n.get("name")) for n in nodes if n.get("coordinator")), "none")
    summary = (f"{len(nodes)} node{'s' * (len(nodes) != 1)} ({alive} alive), "
               f"{len(devices)} device{'s' * (len(devices) != 1)}, "
               f"coordinator {coordinator}")
    legend = _clip(f"{LEASED} leased  {LOCAL} local  {LENDABLE} lendable  "
                   "(figures in that order)", width)
    if color:  # paint after clipping, so escapes never count as columns
        for ch in (LEASED, LOCAL, LENDABLE):
            legend = legend.replace(f"{ch} ", _paint(ch, _SEGMENT_COLORS[ch]) + " ", 1)
    return [_clip(summary, width), legend, ""]


def _node_line(n: Mapping[str, Any], width: int, color: bool) -> str:
    name, state = str(n.get("name", "")), str(n.get("state", "?"))
    coord = bool(n.get("coordinator"))
    mark = "*" if coord else " "
    tail = f"  {state}" + ("  coordinator" if coord else "") + battery_text(n.get("battery"))
    address = str(n.get("address", ""))
    if address:
        tail += f"  {address}"
    name = _clip(name, max(width - 2 - len(tail), 8))
    line = _clip(f"{mark} {name}{tail}", width)
    if not color:
        return line
    # Colour only the parts that fit: the state word and the name.
    head, rest = line[:2 + len(name)], line[2 + len(name):]
    head = head[:2] + (_paint(name, _BOLD) if coord else name)
    if rest.startswith(f"  {state}"):
        rest = "  " + _paint(state, _STATE_COLORS.get(state, "")) + rest[2 + len(state):]
    return head + rest


def battery_text(b: Any) -> str:
    """``  battery 57% charging`` for a node's battery row (nodes -o json); "" on mains."""
    if not isinstance(b, Mapping):
        return ""
    level = b.get("level")
    if not isinstance(level, int) or isinstance(level, bool):
        return "  battery ?"
    return (f"  battery {level}%" + (" charging" if b.get("charging") is True else "")
            + (" not lending" if b.get("lending") is False else ""))


def _device_lines(d: Mapping[str, Any], width: int, bar_len: int, color: bool) -> list[str]:
    cap_c, cap_m = _int(d.get("compute_milli")), _int(d.get("memory_mib"))
    compute = shares(cap_c, _int(d.get("leased_compute_milli")),
                     _int(d.get("lendable_compute_milli")))
    memory = shares(cap_m, _int(d.get("leased_memory_mib")),
                    _int(d.get("lendable_memory_mib")))
    size = format_mib(cap_m, "short")
    title = _clip(f"  {d.get('id', '')}  {d.get('kind', '')} {d.get('model', '')}  {size}", width)
    if d.get("healthy") is False:
        title = _clip(title + "  UNHEALTHY", width)
        if color and title.endswith("UNHEALTHY"):
            title = title.removesuffix("UNHEALTHY") + _paint("UNHEALTHY", _STATE_COLORS["dead"])
    return [
        title,
        _bar_line("compute", compute, [fmt_compute(x) for x in compute], bar_len, color),
        _bar_line("memory", memory, [format_mib(x, "short") for x in memory], bar_len, color),
    ]


def _bar_line(label: str, parts: Iterable[int], numbers: list[str], bar_len: int,
              color: bool) -> str:
    text = " / ".join(numbers)
    if len(text) > NUMBERS - 1:
        text = _clip(text, NUMBERS - 1)
    return f"    {label:<7} [{bar(bar_len, list(parts), color)}] {text}".rstrip()


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _paint(text: str, code: str) -> str:
    return f"{code}{text}{_RESET}" if code else text
