"""A fleet of real agents, each in a network namespace of its own on one bridge, with
per-node link faults (loss, rate limit, partitions): for tests and the fleet bench.

It is a ``LocalMesh`` whose agents run under ``ip netns exec``: they bind their
namespace's address with a cluster key (non-loopback binds need one), and keep their
socket and state in the shared file system, so ``cli``, ``json``, ``wait_for`` and
``converged`` work as on loopback (a Unix socket crosses network namespaces).

    with FleetLab(tmp, profile="edge") as lab:
        lab.start("a", sim="gpu:1x16GiB")
        lab.start("b", join=["a"])
        lab.net.set_loss("a", 20)
        lab.net.partition(["a"], ["b"])

Closing the lab stops the agents (SIGTERM, then SIGKILL of their process groups and the
jobs they left) and removes every namespace, link, bridge and nft table it made; a lab
killed before it could close is removed by the next one (``netlab.cleanup_leftovers``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from flexmesh.agent.localmesh import AgentProc, LocalMesh
from flexmesh.agent.netlab import Netlab, available

__all__ = ["FleetLab", "available"]

PORT = 7946


class FleetLab(LocalMesh):
    def __init__(self, root: Path, profile: str = "lan") -> None:
        super().__init__(root, profile)
        self.net = Netlab()  # (the mesh's key is LocalMesh's key_file, made when first used)
        self.config = self.root / "agent.toml"

    def __enter__(self) -> FleetLab:
        self.open()
        return self

    def open(self) -> None:
        why = available()
        if why is not None:
            raise RuntimeError(why)
        self.root.mkdir(parents=True, exist_ok=True)
        # No web page (it would only bind loopback in each namespace); JSON logs to read.
        self.config.write_text('ui = ""\n[log]\nformat = "json"\n')
        try:
            self.net.open()
        except BaseException:
            self.net.close()
            raise

    def start(self, name: str, sim: str = "", join: list[str] | None = None,
              extra: list[str] | None = None, wait: bool = True,
              env: dict[str, str] | None = None) -> AgentProc:
        host = self.net.add_host(name)
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        seeds = [self.agents[j].addr or f"{self.net.hosts[j].addr}:{PORT}"
                 for j in (join or [])]
        args = ["ip", "netns", "exec", host.ns, sys.executable, "-m", "flexmesh.agent.cli",
                "agent", "--name", name, "--bind", f"{host.addr}:{PORT}",
                "--key-file", str(self.key_file), "--config", str(self.config),
                "--socket", str(d / "agent.sock"), "--state-dir", str(d / "state"),
                "--profile", self.profile]
        if sim:
            args += ["--sim-devices", sim]
        if seeds:
            args += ["--join", *seeds]
        args += extra or []
        a = AgentProc(name, d, args, extra_env=dict(env or {}))
        self.agents[name] = a
        self._spawn(a)
        if wait:
            self.wait_ready(name)
        return a

    def close(self) -> None:
        try:
            super().close()
            for a in self.agents.values():
                if a.proc is not None:  # anything left in the agent's process group
                    with contextlib.suppress(OSError):
                        os.killpg(a.proc.pid, signal.SIGKILL)
        finally:
            self.net.close()
