"""sd_notify against a fake notify socket: exact datagrams, abstract names, env parsing."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from flexmesh.agent import sdnotify
from flexmesh.agent.sdnotify import Notifier, watchdog_interval, watchdog_loop


class FakeSystemd:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                return out


@pytest.fixture
def short_dir() -> Iterator[str]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer than that.
    path = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(short_dir: str) -> Iterator[tuple[FakeSystemd, str]]:
    path = os.path.join(short_dir, "notify")
    systemd = FakeSystemd(path)
    yield systemd, path
    systemd.sock.close()


@pytest.fixture
def abstract() -> Iterator[tuple[FakeSystemd, str]]:
    if not sys.platform.startswith("linux"):
        pytest.skip("abstract AF_UNIX names are Linux only")
    name = f"flexmesh-test-{uuid.uuid4().hex}"
    systemd = FakeSystemd("\0" + name)
    yield systemd, "@" + name
    systemd.sock.close()


@pytest.fixture(autouse=True)
def close_notifiers(monkeypatch) -> Iterator[None]:
    """Close every notifier a test made, so no socket is left for the garbage collector."""
    made: list[Notifier] = []
    original = Notifier.__init__

    def init(self: Notifier, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(Notifier, "__init__", init)
    yield
    for notifier in made:
        notifier.close()


# --- datagrams -----------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "expected"), [
    (lambda n: n.ready(), b"READY=1"),
    (lambda n: n.stopping(), b"STOPPING=1"),
    (lambda n: n.watchdog(), b"WATCHDOG=1"),
    (lambda n: n.status("3 jobs running"), b"STATUS=3 jobs running"),
    (lambda n: n.notify(READY=1, STATUS="up"), b"READY=1\nSTATUS=up"),
    (lambda n: n.notify(status="lower case key"), b"STATUS=lower case key"),
    (lambda n: n.notify(READY=True, ERRNO=0), b"READY=1\nERRNO=0"),
    (lambda n: n.status("two\nlines\r"), b"STATUS=two lines "),
])
def test_exact_datagram_on_a_path_socket(fake, call, expected) -> None:
    systemd, path = fake
    notifier = Notifier(path)
    assert call(notifier) is True
    assert systemd.received() == [expected]
    assert (notifier.sent, notifier.errors) == (1, 0)


def test_abstract_name_is_sent_with_a_leading_nul(abstract) -> None:
    systemd, notify_socket = abstract
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket})
    assert notifier.address == "\0" + notify_socket[1:]
    assert notifier.ready() and notifier.watchdog() and notifier.stopping()
    assert systemd.received() == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]


def test_one_datagram_per_call_in_order(fake) -> None:
    systemd, path = fake
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    notifier.status("starting")
    notifier.ready()
    for _ in range(3):
        notifier.watchdog()
    notifier.stopping()
    assert systemd.received() == [b"STATUS=starting", b"READY=1", b"WATCHDOG=1",
                                  b"WATCHDOG=1", b"WATCHDOG=1", b"STOPPING=1"]
    assert notifier.sent == 6


def test_reloading_carries_the_monotonic_clock(fake) -> None:
    systemd, path = fake
    notifier = Notifier(path)
    before = sdnotify.time.clock_gettime_ns(sdnotify.time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = sdnotify.time.clock_gettime_ns(sdnotify.time.CLOCK_MONOTONIC) // 1000
    [datagram] = systemd.received()
    first, second = datagram.decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_nothing_to_send_sends_nothing(fake) -> None:
    systemd, path = fake
    notifier = Notifier(path)
    assert notifier.notify() is False
    assert systemd.received() == [] and notifier.sent == 0


# --- no socket, bad socket, send errors ------------------------------------------------------


@pytest.mark.parametrize("env", [
    {},
    {"NOTIFY_SOCKET": ""},
    {"NOTIFY_SOCKET": "@"},
    {"NOTIFY_SOCKET": "relative/path"},
    {"NOTIFY_SOCKET": "vsock:2:1234"},
])
def test_without_a_usable_socket_every_call_is_a_no_op(env) -> None:
    notifier = Notifier.from_env({**env, "WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None  # nowhere to ping: no watchdog task either
    for result in (notifier.ready(), notifier.watchdog(), notifier.status("x"),
                   notifier.stopping(), notifier.reloading()):
        assert result is False
    assert (notifier.sent, notifier.errors) == (0, 0)


def test_unusable_socket_value_is_logged(caplog) -> None:
    Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert "not a path or @name" in caplog.text


def test_send_errors_are_counted_and_logged_once_not_raised(short_dir, caplog) -> None:
    notifier = Notifier(os.path.join(short_dir, "nobody-listens"))
    with caplog.at_level("DEBUG", logger="flexmesh.sdnotify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    assert (notifier.sent, notifier.errors) == (0, 3)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot send" in warnings[0].getMessage()


def test_sending_recovers_when_the_socket_appears(short_dir, caplog) -> None:
    path = os.path.join(short_dir, "late")
    notifier = Notifier(path)
    assert notifier.ready() is False
    systemd = FakeSystemd(path)
    with caplog.at_level("INFO", logger="flexmesh.sdnotify"):
        assert notifier.ready() is True
    assert systemd.received() == [b"READY=1"]
    assert (notifier.sent, notifier.errors) == (1, 1)
    assert "sending again" in caplog.text
    systemd.sock.close()


def test_a_full_queue_does_not_block(fake) -> None:
    _, path = fake
    notifier = Notifier(path)
    big = "x" * 60_000
    results = [notifier.status(big) for _ in range(200)]  # the receiver never reads
    assert results[0] is True
    assert False in results  # EAGAIN from the full queue: counted, not waited for
    assert notifier.errors == results.count(False)


def test_bad_field_name_is_an_error_not_an_exception(fake) -> None:
    systemd, path = fake
    notifier = Notifier(path)
    assert notifier.notify(**{"BAD KEY": 1}) is False
    assert notifier.errors == 1 and systemd.received() == []


def test_the_socket_is_not_inherited_by_jobs(fake) -> None:
    _, path = fake
    notifier = Notifier(path)
    notifier.ready()
    assert notifier._sock is not None and not notifier._sock.get_inheritable()


def test_unset_environment_hides_the_socket_from_children(fake, monkeypatch) -> None:
    _, path = fake
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env(unset_environment=True)
    assert notifier.enabled and notifier.watchdog_interval() == 15.0
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)


# --- WATCHDOG_USEC / WATCHDOG_PID ------------------------------------------------------------


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
    ({"WATCHDOG_USEC": " 1000000 ", "WATCHDOG_PID": " 4242 "}, 0.5),
    ({"WATCHDOG_USEC": "1"}, 0.0000005),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, 15.0),
    ({}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-30000000"}, None),
    ({"WATCHDOG_USEC": "30s"}, None),
    ({"WATCHDOG_USEC": "3e7"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # a parent's watchdog
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "abc"}, None),
    ({"WATCHDOG_PID": "4242"}, None),
])
def test_watchdog_interval(env, expected) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_defaults_to_our_own_pid(monkeypatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "8000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 4.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


# --- watchdog_loop ----------------------------------------------------------------------------


class Stop(Exception):
    pass


def script(n: int, sleeps: list[float]):
    """A sleep that records its argument and ends the loop after n calls."""

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) >= n:
            raise Stop

    return sleep


async def test_watchdog_loop_pings_at_the_interval_only_while_healthy(fake) -> None:
    systemd, path = fake
    notifier = Notifier(path, interval=15.0)
    pattern = iter([True, True, False, False, True, True])
    sleeps: list[float] = []
    with pytest.raises(Stop):
        await watchdog_loop(notifier, lambda: next(pattern), sleep=script(6, sleeps))
    assert sleeps == [15.0] * 6
    assert systemd.received() == [b"WATCHDOG=1"] * 4


async def test_watchdog_loop_logs_transitions_once(fake, caplog) -> None:
    _, path = fake
    notifier = Notifier(path, interval=1.0)
    pattern = iter([True, False, False, False, True, True])
    with caplog.at_level("INFO", logger="flexmesh.sdnotify"), pytest.raises(Stop):
        await watchdog_loop(notifier, lambda: next(pattern), sleep=script(6, []))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unhealthy" in m for m in messages) == 1
    assert sum("healthy again" in m for m in messages) == 1


async def test_a_raising_health_check_counts_as_unhealthy(fake) -> None:
    systemd, path = fake
    notifier = Notifier(path, interval=1.0)

    def healthy() -> bool:
        raise RuntimeError("scheduler gone")

    with pytest.raises(Stop):
        await watchdog_loop(notifier, healthy, sleep=script(3, []))
    assert systemd.received() == []


async def test_watchdog_loop_returns_without_a_watchdog(fake) -> None:
    systemd, path = fake
    sleeps: list[float] = []
    await watchdog_loop(Notifier(path), lambda: True, sleep=script(1, sleeps))
    await watchdog_loop(Notifier(None, interval=15.0), lambda: True, sleep=script(1, sleeps))
    assert sleeps == [] and systemd.received() == []


async def test_watchdog_loop_stops_when_cancelled(fake) -> None:
    systemd, path = fake
    notifier = Notifier(path, interval=0.001)
    task = asyncio.ensure_future(watchdog_loop(notifier, lambda: True))
    while notifier.sent < 3:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert systemd.received()[:3] == [b"WATCHDOG=1"] * 3


async def test_watchdog_loop_over_an_abstract_socket(abstract) -> None:
    systemd, notify_socket = abstract
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "4000000"})
    sleeps: list[float] = []
    with pytest.raises(Stop):
        await watchdog_loop(notifier, lambda: True, sleep=script(2, sleeps))
    assert sleeps == [2.0, 2.0]
    assert systemd.received() == [b"WATCHDOG=1", b"WATCHDOG=1"]
