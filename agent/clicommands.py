"""The ``flexmesh`` commands that talk to a running agent, and how they print: a table
for people, or with ``-o json`` JSON only on stdout.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shlex
import stat
import sys
import time
from typing import Any

from flexmesh.agent.cliclient import CliError, client
from flexmesh.agent.cliwait import wait_for_job
from flexmesh.agent.units import format_mib
from flexmesh.client import Job, StreamEnded, StreamError
from flexmesh.client.common import submit_body


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
    # 0 of one dimension: in proportion to the other, on the device the job lands on.
    gpu = _frac(j["compute_milli"]) if j["compute_milli"] else "~"
    if j.get("count", 1) > 1:
        gpu = f"{j['count']}x{gpu}"
    mem = format_mib(j["memory_mib"], "table") if j["memory_mib"] else "~"
    return {**j, "where": where, "gpu": gpu, "mem": mem,
            "cmd": " ".join(j.get("command", []))[:40]}


def cmd_submit(args: argparse.Namespace) -> int:
    job = client(args).submit(**_submit_args(args))
    if not args.wait:
        _emit(args, job.info, job.id)
        return 0
    return wait_for_job(args, job)  # its output as it comes, then the job's exit code


def _submit_body(args: argparse.Namespace) -> dict[str, Any]:
    """The body of the request ``submit`` sends."""
    return submit_body(**_submit_args(args))


def _submit_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as ``Client.submit`` takes them; usage errors raised as CliError (2)."""
    from flexmesh.agent.units import parse_fraction, parse_percent, parse_size

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError("submit needs a command after --", 2)
    try:
        compute = None  # the agent's default: in proportion to --memory, or a whole device
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
    return {"command": command, "gpu": None, "compute_milli": compute, "memory": memory,
            "kind": args.kind, "priority": args.priority, "env": env,
            "requeue": not args.no_requeue, "devices": args.devices,
            "preemptible": args.preemptible,
            "wait_for_capacity": args.wait_for_capacity, "gang": args.gang,
            "workdir": args.workdir or None, "image": args.image or None,
            "image_network": args.image_network or None}


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = client(args).jobs(here=args.here)
    if args.here:  # the runs on this node's devices, whoever submitted them
        columns = ["id", "state", "origin", "user", "where", "gpu", "mem", "cmd"]
    else:
        columns = ["id", "state", "where", "gpu", "mem", "exit_code", "cmd"]
    _emit(args, jobs, _table([_job_line(j) for j in jobs], columns))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    job = client(args).job(args.job).info
    text = "\n".join(f"{k:>14}: {_human(k, v)}" for k, v in job.items())
    _emit(args, job, text)
    return 0


def _human(key: str, value: Any) -> str:
    """A value for people: no Python reprs (lists, None, dicts, epoch seconds)."""
    if key == "results" and isinstance(value, dict):
        return _results_text(value)
    if key in ("compute_milli", "memory_mib") and value == 0:
        return "in proportion, on the device it lands on"
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_at") and isinstance(value, int | float):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if key == "command" and isinstance(value, list):
        return shlex.join(str(a) for a in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={_human(k, v)}" for k, v in value.items())
    if isinstance(value, list):
        if all(isinstance(v, dict) for v in value):  # a gang's members: one line each
            return "".join(f"\n{'':>16}{_human('', v)}" for v in value)
        return ", ".join(_human(key, v) for v in value)
    return str(value)


def cmd_results(args: argparse.Namespace) -> int:
    job = Job(client(args), args.job)
    if not args.dest:  # (named by the whole id, not the prefix typed)
        job.id = str(job.refresh().get("id") or args.job)
    dest = args.dest or f"{job.id}-results"
    try:
        files = job.results(dest, attempt=args.attempt)
    except OSError as exc:  # (the destination; the agent's errors are ClientErrors)
        raise CliError(f"cannot write the results into {dest}: "
                       f"{exc.strerror or exc}", 1) from None
    _emit(args, [str(f) for f in files],
          "\n".join(str(f) for f in files) or f"{args.job}: no files in its results")
    return 0


def _results_text(r: dict[str, Any]) -> str:
    """``here, 10240 bytes (attempt 0)``, a note, then each file and its size."""
    head = str(r.get("state", "?")) + (f", {r['size']} bytes" if r.get("size") else "")
    head += f" (attempt {r.get('attempt', 0)})" + (f": {r['note']}" if r.get("note") else "")
    files = "".join(f"\n{'':>16}{f.get('name')}  {f.get('size')}"
                    for f in r.get("files") or [])
    return head + files


def cmd_cancel(args: argparse.Namespace) -> int:
    result = Job(client(args), args.job).cancel()
    _emit(args, result, f"{result.get('id', args.job)}: {result['result']}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    records = Job(client(args), args.job).log_records(follow=args.follow)
    try:
        for rec in records:
            if args.output == "json":  # the records as they come, one JSON line each
                print(json.dumps(rec), flush=True)
            if rec.get("end"):
                if rec.get("forgotten"):
                    raise CliError(rec["reason"], 1)
                return 0
            if args.output == "json":
                continue
            out = sys.stdout if rec["stream"] == "stdout" else sys.stderr
            out.buffer.write(base64.b64decode(rec["b64"]))
            out.flush()
    except StreamEnded:
        pass
    except StreamError as exc:
        raise CliError(f"reading the output of {args.job} failed: {exc.cause}", 3) from None
    except (OSError, ValueError) as exc:  # (writing the output)
        raise CliError(f"reading the output of {args.job} failed: {exc}", 3) from None
    finally:
        records.close()
    raise CliError(f"the output of {args.job} ended early: the agent closed the stream "
                   "(stopped or restarted?); run the command again for the rest", 3)


def cmd_nodes(args: argparse.Namespace) -> int:
    rows = client(args).nodes()
    from flexmesh.agent.statusview import battery_text

    view = [{**r, "coordinator": "*" if r["coordinator"] else "",
             "battery": battery_text(r.get("battery")).removeprefix("  battery ") or "-"}
            for r in rows]
    _emit(args, rows, _table(view, ["name", "address", "state", "coordinator", "devices",
                                    "battery"]))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    rows = client(args).devices()
    view = [{**r, "memory": format_mib(r["memory_mib"], "table"),
             "leased": f"{_frac(r['leased_compute_milli'])} / "
                       f"{format_mib(r['leased_memory_mib'], 'table')}",
             "lendable": f"{_frac(r['lendable_compute_milli'])} / "
                         f"{format_mib(r['lendable_memory_mib'], 'table')}"} for r in rows]
    for r in view:  # this node's devices name the jobs that lease them (and how a job is
        # held to its share, where not as the device says: an NPU fraction outside a
        # container on a device whose fractions in containers get a vNPU)
        modes = r.get("job_enforcement") or {}
        r["jobs"] = "-" if r.get("jobs") is None else ",".join(
            j if modes.get(j, r["enforcement"]) == r["enforcement"] else f"{j}({modes[j]})"
            for j in r["jobs"]) or "-"
    _emit(args, rows, _table(view, ["node", "id", "kind", "model", "memory", "leased",
                                    "lendable", "backend", "enforcement", "jobs"]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The mesh drawn in the terminal: nodes, devices, bars of leased/local/lendable."""
    import shutil

    from flexmesh.agent.statusview import render

    agent = client(args)
    while True:
        st = agent.status()
        nodes = agent.nodes()
        devices = agent.devices()
        if args.output == "json":
            print(json.dumps({"status": st, "nodes": nodes, "devices": devices}))
        else:
            width = shutil.get_terminal_size().columns
            color = sys.stdout.isatty()
            text = render(nodes, devices, width=width, color=color)
            head = (f"{st['name']} at {st['address']}: coordinator {st['coordinator'] or '-'}"
                    f" (term {st['term']}), queue {st['queue']}") + journal_warning(st)
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[2J", end="")
            print(head + "\n" + text, flush=True)
        if not args.watch:
            return 0
        time.sleep(args.interval)


def journal_warning(st: dict[str, Any]) -> str:
    """A line under the header when the agent's journal writes fail (a full disk): the
    jobs it takes and changes are not recorded until they succeed again."""
    j = st.get("journal")
    if not isinstance(j, dict) or j.get("ok", True):
        return ""
    return (f"\nWARNING: journal writes failing for {j.get('failing_for_s')} s "
            f"({j.get('error') or 'unknown error'}): submissions are refused and changes "
            "wait until it is written")


def cmd_ui(args: argparse.Namespace) -> int:
    st = client(args).status()
    if not st.get("ui"):
        raise CliError("the web page is off on this agent (set ui = \"127.0.0.1:PORT\")", 1)
    _emit(args, {"url": st["ui"]}, st["ui"])
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """A new key on stdout, or into FILE (created 0600, never over an existing file). When
    stdout is a file others could read (``keygen > FILE``), it is made private first."""
    from flexmesh.protocol.crypto import generate_key

    key = generate_key() + "\n"
    if args.file:
        try:
            fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise CliError(f"{args.file} exists: remove it first, or add the key to it with "
                           "`flexmesh keygen >> FILE`", 1) from None
        except OSError as exc:
            raise CliError(f"cannot create {args.file}: {exc.strerror or exc}", 1) from None
        with os.fdopen(fd, "w") as f:
            f.write(key)
        return 0
    with contextlib.suppress(OSError):
        st = os.fstat(sys.stdout.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
            os.fchmod(sys.stdout.fileno(), st.st_mode & 0o700)
    sys.stdout.write(key)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    if args.op != "list" and not args.key:
        raise CliError(f"keys {args.op} needs a KEY (or its fingerprint)", 2)
    view = client(args).keys(args.op, args.key or "")
    lines = [f"cluster {view['cluster']}: "
             + ("sealed" if view["encrypted"] else "PLAINTEXT (no key)")]
    lines += [f"{fp}{'  (primary: seals)' if fp == view['primary'] else ''}"
              for fp in view["keys"]]
    _emit(args, view, "\n".join(lines))
    return 0
