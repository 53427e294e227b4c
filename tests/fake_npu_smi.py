#!/usr/bin/env python3
"""A fake ``npu-smi`` for tests: the vNPU commands, with their state kept between calls in
a JSON file (``$FAKE_NPU_SMI_STATE``), each command line checked as the driver would.

State: ``{"chips": [{"npu", "chip", "phy", "logic", "name", "cores", "memory_mib"}],
"vnpus": {"<id>": {"npu", "chip", "template", "bound"}}, "mode": 0, "calls": [argv]}``.
``bound`` marks a vNPU still held by a container (its destroy fails).

Answers ``info`` (910B table), ``info -m``, ``info -t phyid-remap -p PHY``, ``info -t
info-vnpu -i NPU -c CHIP``, ``set -t create-vnpu -i NPU -c CHIP -f TEMPLATE [-v ID]`` and
``set -t destroy-vnpu -i NPU -c CHIP -v ID``. A ``set`` asks ``continue setting?(Y/N)``
and reads the answer from stdin. Wrong syntax exits 2, a refused command 1, each with an
``Error`` line; a vNPU id outside the chip's range (phy*16+100 .. +115) is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

# AI cores per template, by chip name (the cores of the whole chip are in the state).
TEMPLATES: dict[str, dict[str, int]] = {
    "910B3": {"vir05_1c_16g": 5, "vir10_3c_32g": 10},
    "910B4": {"vir05_1c_8g": 5, "vir10_3c_16g": 10},
    "310P3": {"vir01": 1, "vir02": 2, "vir02_1c": 2, "vir04": 4},
}
KEYS = {"create-vnpu": ({"-i", "-c", "-f"}, {"-v"}), "destroy-vnpu": ({"-i", "-c", "-v"}, set()),
        "info-vnpu": ({"-i", "-c"}, set()), "phyid-remap": ({"-p"}, set())}


class Refused(Exception):
    code = 1


class Syntax(Exception):
    code = 2


def _options(args: list[str], kind: str) -> dict[str, str]:
    required, optional = KEYS[kind]
    if len(args) % 2:
        raise Syntax(f"option {args[-1]} has no value")
    opts: dict[str, str] = {}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag not in required | optional or flag in opts:
            raise Syntax(f"invalid option {flag} for {kind}")
        opts[flag] = value
    missing = required - set(opts)
    if missing:
        raise Syntax(f"{kind} needs {' '.join(sorted(missing))}")
    for flag, value in opts.items():
        if flag != "-f" and not (value.isascii() and value.isdigit()):
            raise Syntax(f"{flag} takes a number, not {value!r}")
    return opts


def _chip(state: dict[str, Any], opts: dict[str, str]) -> dict[str, Any]:
    chips: list[dict[str, Any]] = state["chips"]
    for c in chips:
        if c["npu"] == int(opts["-i"]) and c["chip"] == int(opts["-c"]):
            return c
    raise Refused(f"the device {opts['-i']} chip {opts['-c']} does not exist")


def _confirm() -> None:
    print("continue setting?(Y/N)", flush=True)
    if sys.stdin.readline().strip() not in ("Y", "y"):
        raise Refused("the setting was cancelled")


def _used_cores(state: dict[str, Any], chip: dict[str, Any]) -> int:
    table = TEMPLATES[chip["name"]]
    return sum(table[v["template"]] for v in state["vnpus"].values()
               if (v["npu"], v["chip"]) == (chip["npu"], chip["chip"]))


def create(state: dict[str, Any], opts: dict[str, str]) -> str:
    chip = _chip(state, opts)
    table = TEMPLATES.get(chip["name"], {})
    if opts["-f"] not in table:
        raise Refused(f"template {opts['-f']} is not one of {chip['name']}")
    if state.get("mode", 0) != 0:
        raise Refused("the vnpu mode is not container mode")
    first = chip["phy"] * 16 + 100
    if "-v" in opts:
        vid = int(opts["-v"])
        if not first <= vid < first + 16:
            raise Refused(f"vnpu id {vid} is out of range {first}-{first + 15}")
    else:
        vid = next((i for i in range(first, first + 16) if str(i) not in state["vnpus"]), -1)
    if str(vid) in state["vnpus"] or vid < 0:
        raise Refused(f"vnpu id {vid} is in use")
    if _used_cores(state, chip) + table[opts["-f"]] > chip["cores"]:
        raise Refused("the resource is not enough")
    _confirm()
    state["vnpus"][str(vid)] = {"npu": chip["npu"], "chip": chip["chip"],
                                "template": opts["-f"], "bound": False}
    return "       Status                         : OK\n" \
           "       Message                        : Create vnpu success\n"


def destroy(state: dict[str, Any], opts: dict[str, str]) -> str:
    chip = _chip(state, opts)
    v = state["vnpus"].get(opts["-v"])
    if v is None or (v["npu"], v["chip"]) != (chip["npu"], chip["chip"]):
        raise Refused(f"vnpu {opts['-v']} does not exist")
    _confirm()
    if v["bound"]:
        raise Refused(f"vnpu {opts['-v']} is in use by a container")
    del state["vnpus"][opts["-v"]]
    return ("       Status                         : OK\n"
            f"       Message                        : Destroy vnpu {opts['-v']} success\n")


def list_vnpus(state: dict[str, Any], opts: dict[str, str]) -> str:
    chip = _chip(state, opts)
    mine = sorted((int(k), v) for k, v in state["vnpus"].items()
                  if (v["npu"], v["chip"]) == (chip["npu"], chip["chip"]))
    free = chip["cores"] - _used_cores(state, chip)
    rows = [f"| {vid:<9} | NA             | 000000000000 | 0        | {v['template']:<20} |"
            for vid, v in mine]
    return "\n".join([
        "+" + "-" * 79 + "+", "| NPU resource static info as follow:" + " " * 43 + "|",
        "| AICORE    Memory    AICPU    VPC    VENC    VDEC    JPEGD    JPEGE    PNGD    |",
        f"| {free}/{chip['cores']}     NA/NA     NA       NA     NA      NA      NA       NA  |",
        "+" + "-" * 79 + "+", f"| Total number of vnpu: {len(mine)}",
        "|  Vnpu ID  |  Vgroup ID     |  Container ID  |  Status  |  Template Name       |",
        *rows, "+" + "-" * 79 + "+", ""])


def remap(state: dict[str, Any], opts: dict[str, str]) -> str:
    for c in state["chips"]:
        if c["phy"] == int(opts["-p"]):
            return (f"\tChip Physical ID               : {c['phy']}\n"
                    f"\tChip Logic ID                  : {c['logic']}\n"
                    f"\tNPU ID                         : {c['npu']}\n"
                    f"\tChip ID                        : {c['chip']}\n")
    raise Refused(f"the physical id {opts['-p']} is invalid")


def info(state: dict[str, Any]) -> str:
    rule = "+===========================+===============+" + "=" * 52 + "+"
    out = ["| NPU   Name                | Health        | Power(W)    Temp(C)           "
           "Hugepages-Usage(page)|",
           "| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  "
           "HBM-Usage(MB)        |", rule]
    for c in state["chips"]:
        out += [f"| {c['npu']:<5} {c['name']:<19} | OK            | 90.0        40"
                "                0    / 0             |",
                f"| {c['chip']:<25} | 0000:C{c['npu']}:00.0  | 0           0    / 0          "
                f"0    / {c['memory_mib']:<13}|", rule]
    out.append("| NPU     Chip              | Process id    | Process name             | "
               "Process memory(MB)      |")
    out += [f"| No running processes found in NPU {c['npu']} |" for c in state["chips"]]
    return "\n".join(out) + "\n"


def mapping(state: dict[str, Any]) -> str:
    rows = ["\tNPU ID   Chip ID   Chip Logic ID   Chip Name"]
    rows += [f"\t{c['npu']}   {c['chip']}   {c['logic']}   Ascend {c['name']}"
             for c in state["chips"]]
    return "\n".join(rows) + "\n"


def answer(state: dict[str, Any], argv: list[str]) -> str:
    if argv == ["info"]:
        return info(state)
    if argv == ["info", "-m"]:
        return mapping(state)
    if len(argv) < 3 or argv[0] not in ("info", "set") or argv[1] != "-t":
        raise Syntax(f"invalid command: {' '.join(argv)}")
    verb, kind = argv[0], argv[2]
    handlers = {("set", "create-vnpu"): create, ("set", "destroy-vnpu"): destroy,
                ("info", "info-vnpu"): list_vnpus, ("info", "phyid-remap"): remap}
    if (verb, kind) not in handlers:
        raise Syntax(f"invalid command: {verb} -t {kind}")
    return handlers[verb, kind](state, _options(argv[3:], kind))


def main(argv: list[str]) -> int:
    path = Path(os.environ["FAKE_NPU_SMI_STATE"])
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(path.read_text())
        state.setdefault("vnpus", {})
        state.setdefault("calls", []).append(argv)
        code = 0
        try:
            sys.stdout.write(answer(state, argv))
        except (Refused, Syntax) as exc:
            print(f"Error: {exc}")
            code = exc.code
        tmp = path.with_name(f".{path.name}.tmp")  # whole, for readers that take no lock
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
