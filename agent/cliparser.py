"""The ``flexmesh`` command line: every subcommand and its flags (the CLI contract in
DESIGN.md; scripts and tests depend on it)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexmesh", description="Pool GPU and NPU fractions "
                                "across machines, peer to peer.")
    sub = p.add_subparsers(dest="cmd", required=True)
    # The order of add_parser calls is the order --help lists the commands in.
    _add_agent(sub)
    _add_submit(_client(sub, "submit", "submit a job"))
    jb = _client(sub, "jobs", "list jobs submitted here")
    jb.add_argument("--here", action="store_true",
                    help="list the jobs running on this node's devices instead, whoever "
                         "submitted them (with their origin and user)")
    for name, help in (("show", "show one job"), ("cancel", "cancel a job")):
        _client(sub, name, help).add_argument("job")
    lg = _client(sub, "logs", "print a job's output")
    lg.add_argument("job")
    lg.add_argument("-f", "--follow", action="store_true")
    rs = _client(sub, "results", "copy a job's results (what it left under $FLEXMESH_OUTPUT) "
                 "out")
    rs.add_argument("job")
    rs.add_argument("dest", nargs="?", help="directory to copy them into (made if missing; "
                    "default: ./JOB-results)")
    rs.add_argument("--attempt", type=int, help="the results of this earlier attempt of a "
                    "requeued job (default: the current one's)")
    _client(sub, "nodes", "list the mesh's nodes")
    _client(sub, "devices", "list the mesh's devices")
    st = _client(sub, "status", "draw the mesh: nodes, devices, leased/local/lendable")
    st.add_argument("-w", "--watch", action="store_true", help="redraw until interrupted")
    st.add_argument("--interval", type=float, default=2.0, help="seconds between redraws")
    _client(sub, "ui", "print the address of the agent's web page")
    kg = sub.add_parser("keygen", help="print a new cluster key (or write it to FILE, 0600)")
    kg.add_argument("file", nargs="?", help="create this file (mode 0600) with the key")
    k = _client(sub, "keys", "list or change the keyring of the running agent")
    k.add_argument("op", choices=["list", "add", "promote", "remove"], nargs="?",
                   default="list")
    k.add_argument("key", nargs="?", help="a key (add) or a key or its fingerprint")
    sub.add_parser("simulate", help="replay a GPU trace through the placement policies",
                   add_help=False)
    return p


def _client(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
            help: str) -> argparse.ArgumentParser:
    """A command that talks to the agent: it takes the socket and the output format."""
    sp = sub.add_parser(name, help=help)
    sp.add_argument("--socket", help="the agent's Unix socket (or FLEXMESH_SOCKET)")
    sp.add_argument("-o", "--output", choices=["text", "json"], default="text")
    return sp


def _add_agent(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    a.add_argument("--election-priority", "--priority", dest="priority", type=int,
                   help="this node's priority in the coordinator election (lower wins; "
                        "--priority is the old name, kept)")
    a.add_argument("--log-format", choices=["text", "json"])
    a.add_argument("--key-file", help="file of base64 cluster keys, the sealing key first")
    a.add_argument("--cluster", help="name of the mesh, bound into every sealed packet")
    a.add_argument("--insecure-plaintext", action="store_true", default=None,
                   help="run without a cluster key: anyone who can reach the port may read "
                        "and forge gossip and calls (throwaway local tests only)")
    a.add_argument("--ui", help="HOST:PORT of the web page (port 0: any; '' turns it off)")
    a.add_argument("--metrics", help="HOST:PORT to serve /metrics over TCP too")


def _add_submit(s: argparse.ArgumentParser) -> None:
    s.add_argument("--gpu", help="fraction of one device (a GPU or an NPU: see --kind), "
                   "e.g. 0.25")
    s.add_argument("--compute", help="percent of one device, e.g. 25")
    s.add_argument("--memory", help="device memory, e.g. 4GiB (per device)")
    s.add_argument("--devices", type=int, default=1,
                   help="N whole devices on one node (for multi-GPU jobs)")
    s.add_argument("--gang", type=int, default=1,
                   help="run on N nodes at once, one member each (all placed or none; "
                        "members are told FLEXMESH_GANG_RANK, _SIZE, _NODES, _ADDRS)")
    s.add_argument("--kind", choices=["gpu", "npu", "any"], default="any",
                   help="the kind of device (default any: a GPU or an NPU)")
    s.add_argument("--priority", type=int, default=0,
                   help="higher goes first, and may preempt lower preemptible jobs")
    s.add_argument("--no-requeue", action="store_true",
                   help="if the node running it dies or it is preempted, fail it rather "
                        "than run it again elsewhere")
    s.add_argument("--preemptible", action="store_true",
                   help="a higher-priority job may stop this one (it is then requeued)")
    s.add_argument("--env", action="append", help="NAME=VALUE for the job (repeatable)")
    s.add_argument("--workdir", help="carry this directory: the job runs in a copy of it "
                   "($FLEXMESH_WORKDIR) wherever it is placed")
    s.add_argument("--image", help="run the command in this OCI image (podman or docker on "
                   "the node running it; only nodes with one are chosen)")
    s.add_argument("--image-network", choices=["none", "host", "bridge"],
                   help="the container's network (default none: no network at all)")
    s.add_argument("--wait-for-capacity", action="store_true",
                   help="where no device of the mesh could ever hold the job, wait for one "
                        "to join (else it fails after the grace, impossible_grace)")
    s.add_argument("--wait", action="store_true", help="wait for the job to end")
    s.add_argument("--timeout", type=float, default=0,
                   help="with --wait: give up after S s (exit 124; the job goes on)")
    s.add_argument("command", nargs=argparse.REMAINDER)
