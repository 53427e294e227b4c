"""The CLI and the README agree: every flag a command takes is in the README's CLI section,
and every flag that section names exists."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from flexmesh.agent import trace_replay
from flexmesh.agent.cliparser import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
UNDOCUMENTED_OK = {"--help", "--output"}  # every client command's; the README says `-o json`


def _cli_section() -> str:
    text = README.read_text()
    return text.split("## The CLI", 1)[1].split("\n## ", 1)[0]


def _flags() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o for a in sp._actions for o in a.option_strings if o.startswith("--")}
            for name, sp in sub.choices.items() if name != "simulate"}


def test_every_flag_of_every_command_is_in_the_readme() -> None:
    section = _cli_section()
    missing = sorted(f"{cmd} {flag}" for cmd, flags in _flags().items()
                     for flag in flags - UNDOCUMENTED_OK
                     if not re.search(rf"{re.escape(flag)}\b", section))
    assert not missing, f"flags missing from README's CLI section: {missing}"


def test_every_flag_the_readme_names_exists() -> None:
    known = set().union(*_flags().values())
    block = _cli_section().split("```", 2)[1]  # the usage block
    named = set(re.findall(r"(--[a-z][a-z0-9-]*)", block))
    simulate = {o for a in trace_replay._parser()._actions  # simulate has a parser of its own
                for o in a.option_strings if o.startswith("--")}
    assert named - known - simulate == set()
