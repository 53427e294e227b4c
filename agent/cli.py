"""The ``flexmesh`` command: run the agent, or talk to the local one over its Unix socket.

Exit codes: 0 success; 1 the request failed (or ``submit --wait`` saw the job fail: then
the job's own exit code when it has one); 2 bad usage or configuration; 3 the agent is not
reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import logging
import os
import socket
import sys
import time
from typing import Any

from flexmesh.agent.units import format_mib

DEFAULT_SOCKET = "/run/flexmesh/agent.sock"


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --- talking to the agent -----------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def get_json(sock: str, path: str, timeout: float = 5.0) -> Any:
    """``GET path`` on an agent's socket: the decoded body, or None when the agent cannot
    be reached or does not answer 200 (for scripts that poll agents)."""
    conn = _UnixConnection(sock, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read()
        return json.loads(data) if resp.status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def socket_path(args: argparse.Namespace) -> str:
    return str(args.socket or os.environ.get("FLEXMESH_SOCKET") or DEFAULT_SOCKET)


def request(args: argparse.Namespace, method: str, path: str, body: Any = None,
            timeout: float = 30.0, stream: bool = False) -> Any:
    sock = socket_path(args)
    conn = _UnixConnection(sock, timeout)
    payload = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    try:
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
    except (FileNotFoundError, ConnectionRefusedError):
        raise CliError(f"no flexmesh agent at {sock} (is it running? set --socket or "
                       "FLEXMESH_SOCKET)", 3) from None
    except PermissionError:
        raise CliError(f"permission denied on {sock} (are you in the flexmesh group?)",
                       3) from None
    except (OSError, http.client.HTTPException) as exc:
        raise CliError(f"talking to the agent at {sock} failed: {exc}", 3) from None
    if stream and resp.status == 200:
        return resp
    data = resp.read()
    conn.close()
    try:
        decoded = json.loads(data) if data else None
    except ValueError:
        decoded = data.decode(errors="replace")
    if resp.status >= 400:
        msg = decoded.get("error") if isinstance(decoded, dict) else decoded
        raise CliError(f"{msg}", 1 if resp.status != 400 else 2)
    return decoded


# --- output -------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _frac(milli: int) -> str:
    return f"{milli / 1000:g}"


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.output == "json":
        print(json.dumps(data, indent=None))
    else:
        print(text)


def _job_line(j: dict[str, Any]) -> dict[str, Any]:
    where = f"{j['node']}/{','.join(j.get('devices') or [j['device']])}" if j.get("node") else "-"
    gpu = _frac(j["compute_milli"])
    if j.get("count", 1) > 1:
        gpu = f"{j['count']}x{gpu}"
    return {**j, "where": where, "gpu": gpu, "mem": format_mib(j["memory_mib"], "table"),
            "cmd": " ".join(j.get("command", []))[:40]}


# --- commands -----------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    from flexmesh.agent.units import parse_fraction, parse_percent, parse_size

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError("submit needs a command after --", 2)
    try:
        compute = 1000
        if args.gpu is not None and args.compute is not None:
            raise ValueError("give --gpu or --compute, not both")
        if args.gpu is not None:
            compute = parse_fraction(args.gpu)
        elif args.compute is not None:
            compute = parse_percent(args.compute)
        memory = parse_size(args.memory) if args.memory else 0
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    env = {}
    for item in args.env or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(f"--env {item!r} is not NAME=VALUE", 2)
        env[name] = value
    # What the request may ask for is the agent's to check: its 400 says what is wrong.
    body = {"command": command, "compute_milli": compute, "memory_mib": memory,
            "kind": args.kind, "priority": args.priority, "env": env}
    if args.devices != 1:
        body["devices"] = args.devices
    if args.preemptible:
        body["preemptible"] = True
    if args.gang != 1:
        body["gang"] = args.gang
    job = request(args, "POST", "/v1/jobs", body)
    if not args.wait:
        _emit(args, job, job["id"])
        return 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while job["state"] not in ("succeeded", "failed", "cancelled", "preempted", "lost"):
        if deadline is not None and time.monotonic() > deadline:
            raise CliError(f"job {job['id']} still {job['state']} after {args.timeout:g}s", 1)
        job = request(args, "GET", f"/v1/jobs/{job['id']}?wait=30", timeout=60)
    if job.get("members"):  # a gang: a line for each member
        lines = [f"{job['id']} {job['state']}" + (f": {job['reason']}" if job["reason"] else "")]
        for m in job["members"]:
            where = ",".join(m.get("devices") or [m["device"] or "-"])
            lines.append(f"  {m['id']} {m['state']} on {m['node'] or '-'}/{where}: "
                         f"{m['reason']}")
        _emit(args, job, "\n".join(lines))
    else:
        where = ",".join(job.get("devices") or [job["device"] or "-"])
        _emit(args, job, f"{job['id']} {job['state']} on {job['node'] or '-'}/{where}: "
                         f"{job['reason']}")
    if job["state"] == "succeeded":
        return 0
    code = job.get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = request(args, "GET", "/v1/jobs")
    _emit(args, jobs, _table([_job_line(j) for j in jobs],
                             ["id", "state", "where", "gpu", "mem", "exit_code", "cmd"]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    job = request(args, "GET", f"/v1/jobs/{args.job}")
    text = "\n".join(f"{k:>14}: {v}" for k, v in job.items())
    _emit(args, job, text)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    result = request(args, "DELETE", f"/v1/jobs/{args.job}")
    _emit(args, result, f"{args.job}: {result['result']}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    follow = "&follow=1" if args.follow else ""
    resp = request(args, "GET", f"/v1/jobs/{args.job}/logs?format=ndjson{follow}",
                   timeout=None if args.follow else 60, stream=True)  # type: ignore[arg-type]
    for line in resp:
        rec = json.loads(line)
        if rec.get("end"):
            break
        out = sys.stdout if rec["stream"] == "stdout" else sys.stderr
        out.buffer.write(base64.b64decode(rec["b64"]))
        out.flush()
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    rows = request(args, "GET", "/v1/nodes")
    view = [{**r, "coordinator": "*" if r["coordinator"] else ""} for r in rows]
    _emit(args, rows, _table(view, ["name", "address", "state", "coordinator", "devices"]))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    rows = request(args, "GET", "/v1/devices")
    view = [{**r, "memory": format_mib(r["memory_mib"], "table"),
             "leased": f"{_frac(r['leased_compute_milli'])} / "
                       f"{format_mib(r['leased_memory_mib'], 'table')}",
             "lendable": f"{_frac(r['lendable_compute_milli'])} / "
                         f"{format_mib(r['lendable_memory_mib'], 'table')}"} for r in rows]
    _emit(args, rows, _table(view, ["node", "id", "kind", "model", "memory", "leased",
                                    "lendable", "backend", "enforcement"]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The mesh drawn in the terminal: nodes, devices, bars of leased/local/lendable."""
    import shutil

    from flexmesh.agent.statusview import render

    while True:
        st = request(args, "GET", "/v1/status")
        nodes = request(args, "GET", "/v1/nodes")
        devices = request(args, "GET", "/v1/devices")
        if args.output == "json":
            print(json.dumps({"status": st, "nodes": nodes, "devices": devices}))
        else:
            width = shutil.get_terminal_size().columns
            color = sys.stdout.isatty()
            text = render(nodes, devices, width=width, color=color)
            head = (f"{st['name']} at {st['address']}: coordinator {st['coordinator'] or '-'}"
                    f" (term {st['term']}), queue {st['queue']}")
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[2J", end="")
            print(head + "\n" + text, flush=True)
        if not args.watch:
            return 0
        time.sleep(args.interval)


def cmd_ui(args: argparse.Namespace) -> int:
    st = request(args, "GET", "/v1/status")
    if not st.get("ui"):
        raise CliError("the web page is off on this agent (set ui = \"127.0.0.1:PORT\")", 1)
    _emit(args, {"url": st["ui"]}, st["ui"])
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from flexmesh.protocol.crypto import generate_key

    print(generate_key())
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    if args.op == "list":
        view = request(args, "GET", "/v1/keys")
    else:
        if not args.key:
            raise CliError(f"keys {args.op} needs a KEY (or its fingerprint)", 2)
        view = request(args, "POST", "/v1/keys", {"op": args.op, "key": args.key})
    lines = [f"cluster {view['cluster']}: "
             + ("sealed" if view["encrypted"] else "PLAINTEXT (no key)")]
    lines += [f"{fp}{'  (primary: seals)' if fp == view['primary'] else ''}"
              for fp in view["keys"]]
    _emit(args, view, "\n".join(lines))
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from flexmesh.agent.config import ConfigError, Settings, load

    flags = {
        "name": args.name, "bind": args.bind, "join": args.join, "socket": args.socket,
        "state_dir": args.state_dir, "profile": args.profile, "sim_devices": args.sim_devices,
        "sim_load_file": args.sim_load_file, "policy": args.policy,
        "log_format": args.log_format, "priority": args.priority,
        "key_file": args.key_file, "cluster": args.cluster, "ui": args.ui,
        "metrics": args.metrics,
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexmesh", description="Pool GPU and NPU fractions "
                                "across machines, peer to peer.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--socket", help="the agent's Unix socket (or FLEXMESH_SOCKET)")
        sp.add_argument("-o", "--output", choices=["text", "json"], default="text")
        return sp

    a = sub.add_parser("agent", help="run the node agent")
    a.add_argument("--config", help="TOML file (default: none)")
    a.add_argument("--name")
    a.add_argument("--bind", help="HOST:PORT for gossip (UDP) and calls (TCP); port 0 = any")
    a.add_argument("--join", nargs="+", action="extend", help="HOST:PORT of seed agents")
    a.add_argument("--socket")
    a.add_argument("--state-dir")
    a.add_argument("--profile", choices=["local", "lan", "wan", "edge"])
    a.add_argument("--sim-devices", help="simulated devices, e.g. gpu:2x16GiB,npu:1x32GiB")
    a.add_argument("--sim-load-file", help="JSON file with foreign load on sim devices")
    a.add_argument("--policy")
    a.add_argument("--priority", type=int, help="election priority (lower wins)")
    a.add_argument("--log-format", choices=["text", "json"])
    a.add_argument("--key-file", help="file of base64 cluster keys, the sealing key first")
    a.add_argument("--cluster", help="name of the mesh, bound into every sealed packet")
    a.add_argument("--ui", help="HOST:PORT of the web page (port 0: any; '' turns it off)")
    a.add_argument("--metrics", help="HOST:PORT to serve /metrics over TCP too")

    s = client("submit", "submit a job")
    s.add_argument("--gpu", help="fraction of one device, e.g. 0.25")
    s.add_argument("--compute", help="percent of one device, e.g. 25")
    s.add_argument("--memory", help="device memory, e.g. 4GiB (per device)")
    s.add_argument("--devices", type=int, default=1,
                   help="N whole devices on one node (for multi-GPU jobs)")
    s.add_argument("--gang", type=int, default=1,
                   help="run on N nodes at once, one member each (all placed or none; "
                        "members are told FLEXMESH_GANG_RANK, _SIZE, _NODES, _ADDRS)")
    s.add_argument("--kind", choices=["gpu", "npu", "any"], default="any")
    s.add_argument("--priority", type=int, default=0,
                   help="higher goes first, and may preempt lower preemptible jobs")
    s.add_argument("--preemptible", action="store_true",
                   help="a higher-priority job may stop this one (it is then requeued)")
    s.add_argument("--env", action="append", help="NAME=VALUE for the job (repeatable)")
    s.add_argument("--wait", action="store_true", help="wait for the job to end")
    s.add_argument("--timeout", type=float, default=0, help="with --wait: give up after S s")
    s.add_argument("command", nargs=argparse.REMAINDER)

    client("jobs", "list jobs submitted here")
    for name, help in (("show", "show one job"), ("cancel", "cancel a job")):
        client(name, help).add_argument("job")
    lg = client("logs", "print a job's output")
    lg.add_argument("job")
    lg.add_argument("-f", "--follow", action="store_true")
    client("nodes", "list the mesh's nodes")
    client("devices", "list the mesh's devices")
    st = client("status", "draw the mesh: nodes, devices, leased/local/lendable")
    st.add_argument("-w", "--watch", action="store_true", help="redraw until interrupted")
    st.add_argument("--interval", type=float, default=2.0, help="seconds between redraws")
    client("ui", "print the address of the agent's web page")
    sub.add_parser("keygen", help="print a new cluster key")
    k = client("keys", "list or change the keyring of the running agent")
    k.add_argument("op", choices=["list", "add", "promote", "remove"], nargs="?",
                   default="list")
    k.add_argument("key", nargs="?", help="a key (add) or a key or its fingerprint")
    sub.add_parser("simulate", help="replay a GPU trace through the placement policies",
                   add_help=False)
    return p


COMMANDS = {"submit": cmd_submit, "jobs": cmd_jobs, "show": cmd_show, "cancel": cmd_cancel,
            "logs": cmd_logs, "nodes": cmd_nodes, "devices": cmd_devices, "status": cmd_status,
            "agent": cmd_agent, "keygen": cmd_keygen, "keys": cmd_keys, "ui": cmd_ui}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        from flexmesh.agent import trace_replay
        return int(trace_replay.main(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
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
