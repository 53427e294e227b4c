"""What people read: no Python reprs in the CLI's text, and job ids by unique prefix."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from aiohttp import web

from flexmesh.agent.apicommon import AGENT_KEY
from flexmesh.agent.apijobs import _full_id
from flexmesh.agent.clicommands import _human
from flexmesh.agent.models import JobRecord, gang_members


def test_values_read_as_text_not_python() -> None:
    assert _human("devices", ["gpu0", "gpu1"]) == "gpu0, gpu1"
    assert _human("exit_code", None) == "-" and _human("devices", []) == "-"
    assert _human("preemptible", False) == "no"
    assert _human("command", ["sh", "-c", "echo hi"]) == "sh -c 'echo hi'"
    stamp = 1_700_000_000.25
    assert _human("created_at", stamp) == time.strftime("%Y-%m-%d %H:%M:%S",
                                                        time.localtime(stamp))
    members = _human("members", [{"id": "g.0", "devices": ["gpu0"], "exit_code": None}])
    assert members.strip() == "id=g.0 devices=gpu0 exit_code=-"
    for text in (members, _human("devices", ["a"])):
        assert "[" not in text and "{" not in text and "None" not in text


def _request(given: str, *jobs: JobRecord) -> web.Request:
    node = SimpleNamespace(origin=SimpleNamespace(jobs={j.id: j for j in jobs}))
    return SimpleNamespace(app={AGENT_KEY: SimpleNamespace(node=node)},  # type: ignore
                           match_info={"id": given})


def _job(job_id: str) -> JobRecord:
    return JobRecord(id=job_id, origin="o", command=["true"], compute_milli=1000,
                     memory_mib=0)


def test_a_job_is_named_by_a_unique_prefix() -> None:
    a, b = _job("ab12cd34ef56"), _job("ab99cd34ef56")
    gang = gang_members("c0ffee000000", 2, origin="o", command=["true"],
                        compute_milli=1000, memory_mib=0)
    assert _full_id(_request("ab1", a, b, *gang)) == a.id
    assert _full_id(_request("c0f", a, b, *gang)) == "c0ffee000000"  # the gang
    assert _full_id(_request(gang[1].id, a, b, *gang)) == gang[1].id  # a member, exactly
    assert _full_id(_request("zz", a, b)) == "zz"  # unknown: the caller's 404
    with pytest.raises(web.HTTPBadRequest) as info:
        _full_id(_request("ab", a, b))
    error = json.loads(info.value.text or "{}")["error"]
    assert "start of 2 job ids" in error and a.id in error and b.id in error
