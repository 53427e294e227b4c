"""sd_notify without dependencies: tell systemd that the agent is ready, alive or stopping.

Theory of operation. A ``Type=notify`` service finds in ``NOTIFY_SOCKET`` the address of
an ``AF_UNIX`` datagram socket: a file path, or an abstract name written with a leading
``@`` (sent with a leading NUL byte instead). Each message is one datagram of
``KEY=VALUE`` lines. With ``WatchdogSec=`` systemd also sets ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``, the process it expects the pings from); we ping at half of it, so one
late ping is not yet a missed one.

Two rules for this file: a notifier never raises into the agent (a failed send is logged
and counted, and the agent carries on), and without ``NOTIFY_SOCKET`` every call is a
cheap no-op, so the agent calls it unconditionally, under systemd or not.

The runtime wires it in: ``ready()`` once the Unix socket and the gossip port are bound,
``stopping()`` on SIGTERM, and ``watchdog_loop`` as a task, pinging while healthy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger("flexmesh.sdnotify")

_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")
ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str | None) -> str | None:
    """The ``AF_UNIX`` address for a ``NOTIFY_SOCKET`` value, or None when unusable.

    ``/path`` is used as is; ``@name`` becomes the abstract address ``\\0name``. Anything
    else (empty, relative, ``vsock:...``) is None: not a socket we can send to.
    """
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between pings, half of ``WATCHDOG_USEC``; None when there is no watchdog.

    None also when ``WATCHDOG_PID`` names another process (the watchdog is a parent's or a
    sibling's, inherited through the environment) or when either value is malformed.
    """
    environ = os.environ if env is None else env
    usec_text = environ.get("WATCHDOG_USEC", "").strip()
    if not usec_text.isdecimal():
        return None
    usec = int(usec_text)
    if usec <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID", "").strip()
    if pid_text:
        if not pid_text.isdecimal():
            return None
        if int(pid_text) != (os.getpid() if pid is None else pid):
            return None
    return usec / 2_000_000


def encode(fields: Mapping[str, object]) -> bytes:
    """``KEY=VALUE`` lines; keys in capitals, booleans as 1/0, newlines in values as spaces."""
    lines = []
    for key, value in fields.items():
        name = key.upper()
        if not _KEY.match(name):
            raise ValueError(f"not a notify field name: {key!r}")
        if isinstance(value, bool):
            text = "1" if value else "0"
        else:
            text = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{name}={text}")
    return "\n".join(lines).encode()


class Notifier:
    """Sends state changes to systemd over the notify socket; a no-op without one.

    ``sent`` and ``errors`` count datagrams, so a metrics page can show a broken link to
    systemd. The socket is non-blocking: a full receive queue is an error, not a stall of
    the event loop. It is opened close-on-exec, so jobs never inherit it.
    """

    def __init__(self, notify_socket: str | None = None, interval: float | None = None) -> None:
        """``notify_socket`` as in ``NOTIFY_SOCKET`` (a path or ``@name``); None: no-op."""
        self.address = socket_address(notify_socket)  # for sendto(): abstract as "\0name"
        if notify_socket and self.address is None:
            log.warning("sd_notify: NOTIFY_SOCKET=%r is not a path or @name; not notifying",
                        notify_socket)
        self._interval = interval if self.address else None
        self._sock: socket.socket | None = None
        self._failing = False
        self.sent = 0
        self.errors = 0

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, pid: int | None = None,
        unset_environment: bool = False,
    ) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``/``WATCHDOG_PID``.

        ``unset_environment`` removes those variables from ``os.environ`` afterwards, so
        the jobs the agent starts do not inherit a socket that is not theirs.
        """
        environ = os.environ if env is None else env
        notifier = cls(environ.get("NOTIFY_SOCKET"), watchdog_interval(environ, pid))
        if unset_environment:
            for name in ENV_VARS:
                os.environ.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings, or None: no watchdog, or nowhere to send."""
        return self._interval

    def notify(self, **fields: object) -> bool:
        """Send one datagram of fields (``notify(READY=1, STATUS="...")``); True if sent."""
        if self.address is None or not fields:
            return False
        try:
            data = encode(fields)
        except ValueError as exc:
            return self._failed(exc)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            self.close()  # the next call starts afresh, in case systemd re-created the socket
            return self._failed(exc)
        self.sent += 1
        if self._failing:
            log.info("sd_notify: sending again after %d errors", self.errors)
            self._failing = False
        return True

    def ready(self) -> bool:
        return self.notify(READY=1)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        """Before re-reading the configuration; send ``ready()`` when done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def status(self, text: str) -> bool:
        """A line for ``systemctl status flexmesh``."""
        return self.notify(STATUS=text)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _failed(self, exc: Exception) -> bool:
        self.errors += 1
        # One warning when sending starts to fail, then quiet until it works again.
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(level, "sd_notify: cannot send to %r: %s (errors=%d)",
                self.address, exc, self.errors)
        self._failing = True
        return False


async def watchdog_loop(
    notifier: Notifier,
    healthy: Callable[[], bool],
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Send ``WATCHDOG=1`` every ``notifier.watchdog_interval()`` while ``healthy()``.

    Returns at once when there is no watchdog; otherwise runs until cancelled. While
    ``healthy()`` is False (or raises) no ping goes out, so systemd kills and restarts an
    agent that stays unhealthy for ``WatchdogSec``. ``sleep`` is injectable for tests.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    was_healthy = True
    while True:
        ok = _check(healthy)
        if ok:
            notifier.watchdog()
        if ok != was_healthy:
            if ok:
                log.info("watchdog: healthy again; pinging systemd")
            else:
                log.warning("watchdog: agent unhealthy; not pinging systemd")
            was_healthy = ok
        await sleep(interval)


def _check(healthy: Callable[[], bool]) -> bool:
    try:
        return bool(healthy())
    except Exception:
        log.exception("watchdog: health check raised; counting it as unhealthy")
        return False
