"""Names that scripts, tests and other modules import from agent modules that were split
stay importable from where they were: the modules re-export them."""

from __future__ import annotations

import importlib

import pytest

KEPT = {
    "flexmesh.agent.api": ["AGENT_KEY", "MAX_BODY", "MAX_DEVICES", "BadRequest", "gang_view",
                           "job_view", "make_app", "parse_submit", "peer_uid", "serve"],
    "flexmesh.agent.cli": ["CliError", "DEFAULT_SOCKET", "_UnixConnection", "build_parser",
                           "get_json", "main"],
    "flexmesh.agent.jobs": ["ADOPTED_EXIT_REASON", "STREAMS", "VANISHED_REASON", "JobRunner",
                            "JobStartError", "describe_exit", "pid_start_time", "read_at"],
    "flexmesh.agent.store": ["SCHEMA_VERSION", "AsyncJournal", "Journal", "JournalError"],
}


@pytest.mark.parametrize("module", sorted(KEPT))
def test_names_stay_importable(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [name for name in KEPT[module] if not hasattr(mod, name)]
    assert not missing, f"{module} no longer has {missing}"
