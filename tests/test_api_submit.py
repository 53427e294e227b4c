"""The submission body the socket accepts: every bad field gets a 400 that names it."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import pytest

from flexmesh.agent.api import MAX_DEVICES, BadRequest, parse_submit

CMD = {"command": ["true"]}


def test_defaults() -> None:
    assert parse_submit(CMD) == {
        "command": ["true"], "compute_milli": 1000, "memory_mib": 0, "kind": "any",
        "priority": 0, "env": {}, "requeue": True, "count": 1, "preemptible": False,
        "gang_size": 0, "workdir": "", "wait_for_capacity": False, "image": "",
        "image_network": ""}
    assert parse_submit({**CMD, "wait_for_capacity": True})["wait_for_capacity"] is True


def test_a_gang() -> None:
    assert parse_submit({**CMD, "gang": 3, "gpu": 0.5})["gang_size"] == 3
    assert parse_submit({**CMD, "gang": 1})["gang_size"] == 0  # one node: a plain job


def test_several_whole_devices() -> None:
    fields = parse_submit({**CMD, "devices": 4, "memory_mib": 1024})
    assert (fields["count"], fields["compute_milli"]) == (4, 1000)
    assert parse_submit({**CMD, "devices": 2, "gpu": 1})["count"] == 2


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ([], "JSON object"),
        ({"command": []}, "command"),
        ({**CMD, "colour": "red"}, "unknown field(s): colour"),
        ({**CMD, "gpu": 1.5}, "at most 1"),
        ({**CMD, "gpu": 0.5, "compute_milli": 500}, "not both"),
        ({**CMD, "compute_milli": 0}, "1..1000"),
        ({**CMD, "memory_mib": -1}, "negative"),
        ({**CMD, "kind": "tpu"}, "gpu, npu or any"),
        ({**CMD, "priority": 5000}, "priority"),
        ({**CMD, "env": {"A=B": "c"}}, "env"),
        ({**CMD, "requeue": "yes"}, "requeue"),
        ({**CMD, "devices": 0}, "devices must be"),
        ({**CMD, "gang": 0}, "gang must be"),
        ({**CMD, "gang": 65}, "gang must be"),
        ({**CMD, "gang": True}, "gang must be"),
        ({**CMD, "gang": 2, "preemptible": True}, "cannot be preemptible"),
        ({**CMD, "devices": MAX_DEVICES + 1}, "devices must be"),
        ({**CMD, "devices": True}, "devices must be"),
        ({**CMD, "devices": 2, "gpu": 0.5}, "whole devices"),
        ({**CMD, "preemptible": 1}, "preemptible must be"),
        ({**CMD, "wait_for_capacity": "yes"}, "wait_for_capacity must be"),
        ({**CMD, "memory_mib": 100 * 1024 * 1024}, "larger than any device could be"),  # 100TiB
    ],
)
def test_bad_bodies(body: Any, says: str) -> None:
    with pytest.raises(BadRequest, match=None) as info:
        parse_submit(body)
    assert says in str(info.value)


@pytest.mark.parametrize(("body", "says"), [
    ({"command": ["echo", "\udc80"]}, "not valid UTF-8"),
    ({"command": ["a\x00b"]}, "NUL byte"),
    ({**CMD, "env": {"A": "x" * 250_000}}, "exec takes at most"),
    ({**CMD, "env": {f"V{i}": "x" * 100_000 for i in range(12)}}, "bytes together"),
])
def test_what_exec_could_never_take_is_refused(body: dict[str, Any], says: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_submit(body)
    assert says in str(info.value)


async def test_deeply_nested_json_is_a_400_not_a_500(tmp_path: Any) -> None:
    import aiohttp
    from aiohttp import web

    from flexmesh.agent import api

    agent = SimpleNamespace(stopping=False, node=SimpleNamespace(name="n"))
    runner = web.AppRunner(api.make_app(agent))  # type: ignore[arg-type]
    await runner.setup()
    path = str(tmp_path / "agent.sock")
    await web.UnixSite(runner, path).start()
    nested = "[" * 100_000 + "]" * 100_000
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as s, \
                s.post("http://localhost/v1/jobs", data=nested) as resp:
            status, body = resp.status, await resp.json()
    finally:
        await runner.cleanup()
    assert status == 400 and "not JSON" in body["error"]


@pytest.mark.parametrize(
    ("memory", "mib"), [("4GB", 3815), ("4GiB", 4096), ("4G", 4096), ("100TiB", 104857600)])
def test_the_cli_sends_sizes_as_they_are_written(memory: str, mib: int) -> None:
    """GB is 10**9 bytes, never silently a GiB; an absurd size goes to the agent, whose 400
    says what is wrong (``test_bad_bodies``)."""
    from flexmesh.agent.clicommands import _submit_body
    from flexmesh.agent.cliparser import build_parser

    args = build_parser().parse_args(["submit", "--memory", memory, "--", "true"])
    assert _submit_body(args)["memory_mib"] == mib
    with pytest.raises(BadRequest, match="larger than any device") if mib > 2**24 else (
            contextlib.nullcontext()):
        parse_submit(_submit_body(args))


def test_the_cli_asks_to_wait_for_capacity() -> None:
    from flexmesh.agent.clicommands import _submit_body
    from flexmesh.agent.cliparser import build_parser

    args = build_parser().parse_args(["submit", "--wait-for-capacity", "--", "true"])
    assert parse_submit(_submit_body(args))["wait_for_capacity"] is True
