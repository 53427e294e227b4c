"""Battery: the sources (a fake /sys/class/power_supply tree, a file a bridge writes), the
lending rule with its hysteresis, what the node gossips and refuses, the [power] settings
and how `flexmesh status` shows a battery."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from flexmesh.agent import power
from flexmesh.agent.config import ConfigError, Settings, load
from flexmesh.agent.devices.base import Device
from flexmesh.agent.node import Node, NodeConfig, StopJob
from flexmesh.agent.node.power import MAINS, PowerPolicy, PowerReading
from flexmesh.agent.statusview import battery_text
from flexmesh.protocol import facts, wire

NOW = 1_000_000.0


def supply(root: Path, name: str, **attrs: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for key, value in attrs.items():
        (d / key).write_text(value + "\n")
    return d


# --- sysfs ------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "charging"), [
    ("Charging", True), ("Full", True), ("Discharging", False), ("Not charging", False),
    ("Unknown", False)])
def test_sysfs_capacity_and_status(tmp_path: Path, status: str, charging: bool) -> None:
    supply(tmp_path, "AC", type="Mains", online="0")
    supply(tmp_path, "BAT0", type="Battery", capacity="57", status=status)
    assert power.read_sysfs(tmp_path) == (57, charging)


def test_sysfs_not_charging_on_mains_is_on_the_charger(tmp_path: Path) -> None:
    supply(tmp_path, "AC", type="Mains", online="1")
    supply(tmp_path, "BAT0", type="Battery", capacity="80", status="Not charging")
    assert power.read_sysfs(tmp_path) == (80, True)


def test_sysfs_lowest_battery_counts_and_one_supply_may_be_named(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="90", status="Discharging")
    supply(tmp_path, "BAT1", type="Battery", capacity="31", status="Discharging")
    supply(tmp_path, "hid-mouse", type="Battery", capacity="5", status="Discharging")
    assert power.read_sysfs(tmp_path) == (5, False)
    assert power.read_sysfs(tmp_path / "BAT0") == (90, False)


def test_sysfs_energy_or_charge_without_capacity(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", energy_now="30000000", energy_full="40000000",
           status="Discharging")
    assert power.read_sysfs(tmp_path) == (75, False)
    other = tmp_path / "other"
    supply(other, "battery", type="Battery", charge_now="500", charge_full="2000",
           status="Charging")
    assert power.read_sysfs(other) == (25, True)


@pytest.mark.parametrize(("attrs", "why"), [
    ({"type": "Mains", "online": "1"}, "no battery"),
    ({"type": "Battery", "capacity": "lots"}, "is not a level"),
    ({"type": "Battery", "capacity": "140"}, "not between 0 and 100"),
    ({"type": "Battery", "status": "Discharging"}, "no capacity"),
    ({"type": "Battery", "energy_now": "x", "energy_full": "0"}, "are not counts"),
])
def test_sysfs_problems(tmp_path: Path, attrs: dict[str, str], why: str) -> None:
    supply(tmp_path, "PS0", **attrs)
    with pytest.raises(power.PowerError, match=why):
        power.read_sysfs(tmp_path)


def test_sysfs_tree_missing(tmp_path: Path) -> None:
    with pytest.raises(power.PowerError, match="cannot list"):
        power.read_sysfs(tmp_path / "nope")


# --- a file a bridge writes -------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ('{"level": 57, "charging": false}', (57, False)),
    ('{"level": 99.6, "charging": true}', (100, True)),
    ('{"level": 12}', (12, False)),
    ("57", (57, False)),
    ("57 charging\n", (57, True)),
    ("57% Full", (57, True)),
    ("8 discharging", (8, False)),
    ("40 not-charging", (40, False)),
    ("0", (0, False)),
])
def test_file_formats(tmp_path: Path, text: str, expected: tuple[int, bool]) -> None:
    path = tmp_path / "battery"
    path.write_text(text)
    assert power.read_file(path, 60, os.stat(path).st_mtime + 1) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("", "is empty"),
    ("lots", "is not a level"),
    ("57 flying", "is not charging"),
    ("101", "not between 0 and 100"),
    ("nan", "not between 0 and 100"),
    ('{"level": "57"', "not valid JSON"),
    ("[57]", "is not a level"),
    ('{"level": true}', "must be a number"),
    ('{"charging": true}', "must be a number"),
    ('{"level": 50, "charging": "yes"}', "true or false"),
    ("x" * 5000, "longer than"),
])
def test_file_garbage(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "battery"
    path.write_text(text)
    with pytest.raises(power.PowerError, match=why):
        power.read_file(path, 60, os.stat(path).st_mtime)


def test_file_not_text_missing_or_stale(tmp_path: Path) -> None:
    path = tmp_path / "battery"
    path.write_bytes(b"\xff\xfe57")
    with pytest.raises(power.PowerError, match="not text"):
        power.read_file(path, 0, NOW)
    with pytest.raises(power.PowerError, match="cannot read"):
        power.read_file(tmp_path / "missing", 0, NOW)
    path.write_text("57")
    written = os.stat(path).st_mtime
    assert power.read_file(path, 60, written + 59) == (57, False)
    with pytest.raises(power.PowerError, match="stale"):
        power.read_file(path, 60, written + 61)
    assert power.read_file(path, 0, written + 10**6) == (57, False)  # 0: never stale


def test_read_never_raises_and_names_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "battery"
    s = Settings(power_source="file", power_path=str(path))
    got = power.read(s, NOW)
    assert got.level is None and got.source == "file" and "cannot read" in got.problem
    path.write_text("33 charging")
    assert power.read(s, os.stat(path).st_mtime) == PowerReading("file", 33, True)
    assert power.read(Settings(), NOW) == MAINS
    tree = tmp_path / "sys"
    supply(tree, "BAT0", type="Battery", capacity="64", status="Discharging")
    s = Settings(power_source="sysfs", power_path=str(tree))
    assert power.read(s, NOW) == PowerReading("sysfs", 64, False)


# --- the lending rule -------------------------------------------------------------------


def test_floor_and_hysteresis() -> None:
    p = PowerPolicy(lend_floor=20, charging_lend_floor=10, hysteresis=5)
    assert (p.floor(False, True), p.floor(False, False)) == (20, 25)
    assert (p.floor(True, True), p.floor(True, False)) == (10, 15)
    assert PowerPolicy(lend_floor=98).floor(False, False) == 100  # a full battery lends


def gpu() -> Device:
    return Device("gpu0", "gpu", "sim-gpu", 16384, "sim")


def owner() -> Node:
    node = Node(NodeConfig("a", "127.0.0.1:7946"), random.Random(1), 0.0)
    node.set_devices([gpu()], {}, 0.0)
    return node


def ask(node: Node, job: str, origin: str, now: float = 1.0) -> wire.LeaseReply:
    reply = node.handle_request(
        wire.LeaseRequest(job, origin, "gpu0", 250, 1024, 1, "coord"), now)
    assert isinstance(reply, wire.LeaseReply)
    return reply


def test_below_the_floor_others_are_refused_and_handed_back_own_jobs_are_not() -> None:
    node = owner()
    assert ask(node, "theirs", "z").granted and ask(node, "mine", "a").granted
    node.drain()
    node.set_power(PowerReading("file", 18, False), PowerPolicy(), 2.0)
    assert [x.job_id for x in node.leases.active()] == ["mine"]  # reserved: released
    refused = ask(node, "next", "z", 3.0)
    assert not refused.granted
    assert refused.reason == "battery 18% below lend floor 20% (lends again at 25%)"
    assert ask(node, "mine2", "a", 3.0).granted  # its own jobs still get leases
    node.set_power(PowerReading("file", 22, False), PowerPolicy(), 4.0)
    assert "not yet back to 25%" in ask(node, "next", "z", 4.0).reason
    node.set_power(PowerReading("file", 25, False), PowerPolicy(), 5.0)
    assert ask(node, "next", "z", 5.0).granted
    assert node.counters["lending_stopped"] == node.counters["lending_resumed"] == 1


def test_an_unknown_level_lends_as_on_mains() -> None:
    node = owner()
    node.set_power(PowerReading("file", 10, False), PowerPolicy(), 1.0)
    assert not node.power.lending
    node.set_power(PowerReading("file", None, False, "stale"), PowerPolicy(), 2.0)
    assert node.power.lending and ask(node, "theirs", "z", 2.0).granted
    assert node.views.nodes()[0]["battery"] == {
        "level": None, "charging": False, "floor": None, "lending": True, "source": "file",
        "problem": "stale"}


def test_a_running_borrowed_job_is_preempted_with_the_reason() -> None:
    node = owner()
    granted = ask(node, "theirs", "z")
    node.handle_request(wire.StartJob("theirs", granted.lease_id, granted.token, "z",
                                      ["sleep", "9"], {}, 250, 1024), 1.5)
    node.job_started("theirs", 4242, None, 1.6, granted.lease_id)
    node.drain()
    node.set_power(PowerReading("sysfs", 5, True), PowerPolicy(charging_lend_floor=10), 2.0)
    stops = [e for e in node.drain() if isinstance(e, StopJob)]
    assert len(stops) == 1 and stops[0].state == "preempted"
    assert "battery 5% on its charger below lend floor 10%" in stops[0].reason
    node.job_exited("theirs", None, "killed", 3.0)
    assert node.owner.runs["theirs"].state == "preempted"
    assert not node.leases.active()


# --- gossip -----------------------------------------------------------------------------


def test_facts_carry_the_battery_and_leave_it_out_on_mains() -> None:
    plain = facts.NodeFacts(priority=3)
    assert "bat" not in plain.encode()
    low = facts.NodeFacts(priority=3, battery=facts.BatteryFact(18, False, 25))
    assert low.encode() == {**plain.encode(), "bat": [18, False, 25]}
    assert facts.decode(low.encode()) == low and not low.battery.lending  # type: ignore[union-attr]
    node = owner()
    before = dict(node.membership.me.facts)
    node.set_power(PowerReading("file", 57, True), PowerPolicy(), 1.0)
    assert node.membership.me.facts == {**before, "bat": [57, True, 10]}
    node.set_power(MAINS, PowerPolicy(), 2.0)
    assert node.membership.me.facts == before


@pytest.mark.parametrize("row", [
    [101, False, 20], [-1, False, 20], [50, 1, 20], [50, False, 200], ["50", False, 20],
    [True, False, 20], [50, False], "50", None, {"level": 50}])
def test_a_malformed_battery_reads_as_mains(row: object) -> None:
    data = {**facts.NodeFacts().encode(), "bat": row}
    assert facts.decode(data).battery is None


# --- settings and the views -------------------------------------------------------------


def test_power_settings(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[power]\nsource = "file"\npath = "/run/battery"\nlend_floor = 30\n'
                    'charging_lend_floor = 0\nstale_after = 10\n')
    s = load(str(path), {}, env={})
    assert (s.power_source, s.power_path, s.lend_floor, s.charging_lend_floor,
            s.power_stale_after) == ("file", "/run/battery", 30, 0, 10.0)
    assert power.policy(s) == PowerPolicy(30, 0)
    for text, why in [('source = "ups"', "source must be none, sysfs or file"),
                      ('source = "file"', 'source "file" needs a path'),
                      ("lend_floor = 101", "lend_floor must be a percentage"),
                      ("charging_lend_floor = -1", "charging_lend_floor must be"),
                      ("stale_after = -5", "stale_after must be")]:
        path.write_text(f"[power]\n{text}\n")
        with pytest.raises(ConfigError, match=why):
            load(str(path), {}, env={})


def test_status_shows_the_battery() -> None:
    assert battery_text(None) == ""
    assert battery_text({"level": 57, "charging": True, "lending": True}) == \
        "  battery 57% charging"
    assert battery_text({"level": 18, "charging": False, "lending": False}) == \
        "  battery 18% not lending"
    assert battery_text({"level": None, "problem": "stale"}) == "  battery ?"


# --- the sampler: read every second, told to the node on change, a problem logged once --


async def test_the_sampler_tells_changes_and_logs_a_problem_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    from types import SimpleNamespace

    from flexmesh.agent.runtime.sampling import Sampler

    path = tmp_path / "battery"
    told: list[tuple[PowerReading, PowerPolicy]] = []
    counters: dict[str, int] = {}
    agent = SimpleNamespace(
        settings=Settings(power_source="file", power_path=str(path), lend_floor=30),
        loop=asyncio.get_running_loop(),
        node=SimpleNamespace(set_power=lambda r, p, now: told.append((r, p))),
        count=lambda key: counters.__setitem__(key, counters.get(key, 0) + 1))
    sampler = Sampler(agent)  # type: ignore[arg-type]
    results = []
    for text in (None, None, "garbage", "57", "57", "40 charging", None):
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
        results.append(await sampler.read_power())
    assert results == [True, False, True, True, False, True, True]
    assert [r.level for r, _ in told] == [None, None, 57, 40, None]
    assert all(p == PowerPolicy(30, 10) for _, p in told)
    assert counters == {"battery_unreadable": 2}  # once per spell, not once per reading
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "cannot read" in warnings[0]
