"""The agent's life cycle: start, serve until a signal, shut down within a deadline.

SIGHUP reloads the configuration (keys, policy, timing preset, log level) without leaving
the mesh. Signal handlers only set flags (uvicorn's pattern). The first SIGTERM or SIGINT leaves
the mesh gracefully (others see ``left``, not ``dead``), stops answering new work and
closes the journal; running jobs keep running and are adopted by the next agent instance.
A second SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

from aiohttp import web

from flexmesh.agent import api, metrics, ui
from flexmesh.agent.config import ConfigError, Settings, split_hostport
from flexmesh.agent.runtime import Agent, StartError
from flexmesh.agent.runtime.keys import KeysError
from flexmesh.agent.sdnotify import Notifier, watchdog_loop

log = logging.getLogger("flexmesh.agent")

STOP_TIMEOUT = 20.0


async def run_agent(settings: Settings,
                    reload: Callable[[], Settings] | None = None) -> int:
    stop, force = asyncio.Event(), asyncio.Event()
    install_signal_handlers(stop, force)
    notifier = Notifier.from_env(unset_environment=True)  # jobs must not inherit it
    agent = Agent(settings)
    started = await _start(agent, settings)
    if isinstance(started, int):
        return started
    http, extras = started
    log.info("listening socket=%s gossip=%s ui=%s", settings.socket, agent.addr,
             agent.ui_url or "off")
    notifier.ready()  # the socket and the gossip port are bound
    watchdog = asyncio.ensure_future(watchdog_loop(notifier, agent.healthy))
    if reload is not None:
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: _reload(agent, reload, notifier, http))
    await stop.wait()
    log.info("shutting down")
    notifier.stopping()
    watchdog.cancel()
    await _stop_in_time(agent, http, extras, force, settings.socket)
    notifier.close()
    return 0


async def _start(agent: Agent, settings: Settings
                 ) -> tuple[web.AppRunner, list[web.AppRunner]] | int:
    """The agent started and its listeners bound, or the exit code when that failed."""
    try:
        await agent.start()
        http = await api.serve(agent, settings.socket)
    except StartError as exc:
        log.error("cannot start: %s", exc)
        await agent.stop(leave=False)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await agent.stop(leave=False)
        return 1
    try:
        extras = await _start_extras(agent, settings)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await agent.stop(leave=True)
        return 1
    return http, extras


async def _start_extras(agent: Agent, settings: Settings) -> list[web.AppRunner]:
    """The optional TCP listeners: web page and metrics."""
    extras = []
    if settings.ui:
        host, port = split_hostport(settings.ui, "ui")
        runner, agent.ui_url = await ui.start_ui(agent, host, port)
        extras.append(runner)
    if settings.metrics:
        host, port = split_hostport(settings.metrics, "metrics")
        runner, url = await metrics.start_tcp_metrics(agent, host, port)
        extras.append(runner)
        log.info("metrics url=%s", url)
    return extras


async def _stop_in_time(agent: Agent, http: web.AppRunner, extras: list[web.AppRunner],
                        force: asyncio.Event, sock: str) -> None:
    """Close the listeners and stop the agent; a second signal, or STOP_TIMEOUT, exits
    at once."""
    for runner in extras:
        with contextlib.suppress(Exception):
            await runner.cleanup()
    shutdown = asyncio.ensure_future(_shutdown(agent, http, sock))
    done, _ = await asyncio.wait({shutdown, asyncio.ensure_future(force.wait())},
                                 timeout=STOP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    if shutdown not in done:
        log.warning("shutdown did not finish in time; exiting now")
        os._exit(1)


def _reload(agent: Agent, reload: Callable[[], Settings], notifier: Notifier,
            http: web.AppRunner) -> None:
    """SIGHUP: read the configuration again and apply what can change while running; a
    socket file that was deleted is made again."""
    notifier.reloading()
    try:
        new = reload()
        agent.reconfigure(new)
    except (ConfigError, StartError, KeysError) as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
    sock = agent.settings.socket
    if not os.path.exists(sock):
        task = asyncio.ensure_future(api.listen(http, agent, sock))
        task.add_done_callback(lambda t: _relistened(t, sock))
    notifier.ready()


def _relistened(task: asyncio.Future[None], sock: str) -> None:
    exc = task.exception()
    if exc is None:
        log.warning("the socket %s was gone: made it again", sock)
    else:
        log.error("the socket %s is gone and cannot be made again: %s", sock, exc)


async def _shutdown(agent: Agent, http: object, sock: str) -> None:
    await agent.stop(leave=True)
    with contextlib.suppress(Exception):
        await http.cleanup()  # type: ignore[attr-defined]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)


def install_signal_handlers(stop: asyncio.Event, force: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            force.set()  # a second Ctrl-C: exit now
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
