"""The ``flexmesh`` command: run the agent, or talk to the local one over its Unix socket.

Exit codes: 0 success; 1 the request failed (or ``submit --wait`` saw the job fail: then
the job's own exit code when it has one); 2 bad usage or configuration; 3 the agent is not
reachable; 124 ``submit --wait --timeout`` gave up with the job still queued or running
(``cliwait``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from flexmesh.agent.cliclient import (
    DEFAULT_SOCKET,
    CliError,
    cli_error,
    get_json,
    request,
    socket_path,
)
from flexmesh.agent.cliclient import UnixConnection as _UnixConnection
from flexmesh.agent.clicommands import (
    cmd_cancel,
    cmd_devices,
    cmd_jobs,
    cmd_keygen,
    cmd_keys,
    cmd_logs,
    cmd_nodes,
    cmd_results,
    cmd_show,
    cmd_status,
    cmd_submit,
    cmd_ui,
)
from flexmesh.agent.cliparser import build_parser
from flexmesh.client import ClientError

# Still importable from here: scripts and tests import these from cli.
__all__ = [
    "COMMANDS",
    "DEFAULT_SOCKET",
    "CliError",
    "_UnixConnection",
    "build_parser",
    "get_json",
    "main",
    "request",
    "socket_path",
]


def cmd_agent(args: argparse.Namespace) -> int:
    from flexmesh.agent.config import ConfigError, Settings, load

    flags = {
        "name": args.name, "bind": args.bind, "join": args.join, "socket": args.socket,
        "state_dir": args.state_dir, "profile": args.profile, "sim_devices": args.sim_devices,
        "sim_load_file": args.sim_load_file, "policy": args.policy,
        "log_format": args.log_format, "priority": args.priority,
        "key_file": args.key_file, "cluster": args.cluster, "ui": args.ui,
        "metrics": args.metrics, "insecure_plaintext": args.insecure_plaintext,
    }
    try:
        settings = load(args.config, flags)
    except ConfigError as exc:
        print(f"flexmesh agent: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_format, settings.log_level, settings.name)
    from flexmesh.agent.main import run_agent

    def reload() -> Settings:
        return load(args.config, flags)

    try:
        import uvloop
    except ImportError:  # plain asyncio where uvloop does not build
        return int(asyncio.run(run_agent(settings, reload)))
    return int(uvloop.run(run_agent(settings, reload)))


def _setup_logging(fmt: str, level: str, name: str) -> None:
    class KV(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            msg = record.getMessage()
            if fmt == "json":
                return json.dumps({"ts": round(record.created, 3), "level": record.levelname
                                   .lower(), "node": name, "logger": record.name, "msg": msg})
            return f"level={record.levelname.lower()} node={name} {msg}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KV())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


COMMANDS = {"submit": cmd_submit, "jobs": cmd_jobs, "show": cmd_show, "cancel": cmd_cancel,
            "logs": cmd_logs, "results": cmd_results, "nodes": cmd_nodes,
            "devices": cmd_devices, "status": cmd_status, "agent": cmd_agent,
            "keygen": cmd_keygen, "keys": cmd_keys, "ui": cmd_ui}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        from flexmesh.agent import trace_replay
        return int(trace_replay.main(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        try:
            return COMMANDS[args.cmd](args)
        except ClientError as exc:  # (the agent's words, with the command's exit code)
            raise cli_error(exc) from None
    except CliError as exc:
        if getattr(args, "output", "text") == "json":
            print(json.dumps({"error": str(exc)}))
        print(f"flexmesh: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
