"""Start a mesh of real agent processes on 127.0.0.1: for the demo, tests and benchmarks.

Every agent binds 127.0.0.1 with an ephemeral port, keeps its state and socket in a
directory of its own, and is stopped (SIGTERM, then SIGKILL) when the mesh closes. The
mesh seals its traffic under a key of its own (``cluster.keys`` in its root, mode 0600),
as a real one does; ``plaintext=True`` starts the agents with ``--insecure-plaintext``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class MeshError(Exception):
    pass


@dataclass
class AgentProc:
    name: str
    dir: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    addr: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def socket(self) -> str:
        return str(self.dir / "agent.sock")

    @property
    def log(self) -> Path:
        return self.dir / "agent.log"


class LocalMesh:
    def __init__(self, root: Path, profile: str = "local", plaintext: bool = False) -> None:
        self.root = Path(root)
        self.profile = profile
        self.plaintext = plaintext
        self.agents: dict[str, AgentProc] = {}

    @property
    def key_file(self) -> Path:
        """The mesh's key file, made (mode 0600) the first time it is asked for."""
        path = self.root / "cluster.keys"
        if not path.exists():
            from flexmesh.protocol.crypto import generate_key

            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(generate_key() + "\n")
        return path

    def security_args(self) -> list[str]:
        """What every agent of this mesh is started with: the key, or plaintext by name."""
        return ["--insecure-plaintext"] if self.plaintext else ["--key-file", str(self.key_file)]

    def __enter__(self) -> LocalMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- processes ----------------------------------------------------------------------

    def start(self, name: str, sim: str = "", join: list[str] | None = None,
              extra: list[str] | None = None, wait: bool = True,
              env: dict[str, str] | None = None) -> AgentProc:
        """Start agent ``name``; ``env`` adds to (or overrides) the agent's environment."""
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        seeds = [self.agents[j].addr for j in (join or [])]
        args = [sys.executable, "-m", "flexmesh.agent.cli", "agent", "--name", name,
                "--bind", "127.0.0.1:0", "--socket", str(d / "agent.sock"),
                "--state-dir", str(d / "state"), "--profile", self.profile,
                *self.security_args()]
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

    def _spawn(self, a: AgentProc) -> None:
        env = {**os.environ, **a.extra_env}
        env.pop("FLEXMESH_SOCKET", None)
        with contextlib.suppress(FileNotFoundError):
            (a.dir / "agent.sock").unlink()  # a stale socket from a killed agent
        logf = open(a.log, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            a.proc = subprocess.Popen(a.args, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        finally:
            logf.close()

    def restart(self, name: str) -> AgentProc:
        """Start a stopped agent again on the address it had (as a service restarting on
        its configured port does); on a fresh ephemeral port only if that one was taken."""
        a = self.agents[name]
        i = a.args.index("--bind") + 1
        first = a.args[i]
        if a.addr:
            a.args[i] = a.addr
        try:
            self._spawn(a)
            self.wait_ready(name)
        except MeshError:
            if a.args[i] == first:
                raise
            if a.proc is not None and a.proc.poll() is None:
                a.proc.kill()
                a.proc.wait()
            a.args[i] = first
            self._spawn(a)
            self.wait_ready(name)
        finally:
            a.args[i] = first
        return a

    def wait_ready(self, name: str, timeout: float = 20.0) -> None:
        a = self.agents[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if a.proc is not None and a.proc.poll() is not None:
                raise MeshError(f"agent {name} exited with {a.proc.returncode}:\n"
                                + a.log.read_text(errors="replace")[-3000:])
            if os.path.exists(a.socket):
                res = self.cli(name, "status", "-o", "json", check=False)
                if res.returncode == 0:
                    a.addr = json.loads(res.stdout)["status"]["address"]
                    return
            time.sleep(0.05)
        raise MeshError(f"agent {name} not ready after {timeout:g}s")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        a = self.agents[name]
        if a.proc is not None and a.proc.poll() is None:
            a.proc.send_signal(sig)
            a.proc.wait(timeout=30)

    def close(self) -> None:
        for a in self.agents.values():
            if a.proc is not None and a.proc.poll() is None:
                a.proc.send_signal(signal.SIGTERM)
        for a in self.agents.values():
            if a.proc is None:
                continue
            try:
                a.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()
            # Jobs run in sessions of their own; take down any the agent left behind.
            _kill_jobs(a.dir / "state")

    # --- talking to agents ----------------------------------------------------------------

    def cli(self, name: str, *argv: str, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        a = self.agents[name]
        env = {**os.environ, "FLEXMESH_SOCKET": a.socket}
        res = subprocess.run([sys.executable, "-m", "flexmesh.agent.cli", *argv], env=env,
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise MeshError(f"flexmesh {' '.join(argv)} on {name} failed "
                            f"({res.returncode}): {res.stderr.strip()}")
        return res

    def json(self, name: str, *argv: str) -> Any:
        return json.loads(self.cli(name, *argv, "-o", "json").stdout)

    def wait_for(self, what: str, predicate: Any, timeout: float = 30.0,
                 interval: float = 0.1) -> Any:
        """Poll ``predicate()`` until it returns something truthy; raise after timeout."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise MeshError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")

    def converged(self, names: list[str]) -> bool:
        for n in names:
            rows = self.json(n, "nodes")
            alive = {r["name"] for r in rows if r["state"] == "alive"}
            if alive != set(names):
                return False
        coords = {self.coordinator(n) for n in names}
        return len(coords) == 1 and None not in coords

    def coordinator(self, name: str) -> str | None:
        rows = self.json(name, "nodes")
        found = [r["name"] for r in rows if r["coordinator"]]
        return found[0] if found else None


def _kill_jobs(state: Path) -> None:
    journal = state / "journal.sqlite3"
    if not journal.exists():
        return
    from flexmesh.agent.store import Journal

    j = Journal(journal)
    try:
        pids = [run.pid for run in j.list_runs() if run.pid and not run.terminal]
    finally:
        j.close()
    for pid in pids:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
