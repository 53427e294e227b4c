"""Jobs in containers, the owner's side: which runtime this node has, the run's command
line and env file, stopping a container with its job, and cleaning up after a restart.

The container's ``podman run`` (or ``docker run``) client is the job's process: its
output is the job's output, its exit status the job's. Killing a client does not stop its
container (conmon, or dockerd, keeps it), so a stop goes through the runtime too:
``stop -t GRACE NAME`` (SIGTERM, SIGKILL after the grace) beside the runner's own stop of
the client; and once a job's client has ended, ``rm -f NAME`` removes whatever is left.
Every container carries labels naming the job, its lease and this node: at start the
owner removes those of its containers whose run it did not adopt.

Every runtime call blocks (it forks and waits): it runs on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flexmesh.agent.containers import (
    ASCEND_DRIVER_DIRS,
    CDI_GPU_KIND,
    LABEL_JOB,
    LABEL_NODE,
    RUNTIMES,
    ContainerError,
    ContainerRun,
    build,
    container_name,
    env_file_text,
)
from flexmesh.agent.devices.base import Device
from flexmesh.agent.models import RunRecord
from flexmesh.agent.node.holdings import image_refs

if TYPE_CHECKING:
    from flexmesh.agent.runtime.agent import Agent

log = logging.getLogger("flexmesh.agent")

CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
# The runtime client's environment: the operator's settings for it, never the job's (a
# submitter must not point podman at another configuration or docker at another daemon).
_CLIENT_ENV = ("PATH", "HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_HOST",
               "DOCKER_CONFIG", "CONTAINER_HOST", "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF",
               "CONTAINERS_REGISTRIES_CONF", "TMPDIR", "LANG")
_PROBE_TIMEOUT = 30.0  # seconds for `info` at start (a first podman run sets up storage)
_CALL_TIMEOUT = 60.0  # seconds for stop, rm, ps
STOP_SLACK = 5.0  # seconds past the grace the client gets to exit once its container did
RM_RETRIES = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)  # pauses between tries of a failed rm
ENV_FILE = "container.env"
_CDI_NAME = re.compile(r"""["']?name["']?\s*:\s*["']?([^"'\s,}]+)""")


def works(runtime: str) -> bool:
    """The runtime is installed and answers (docker: its daemon runs)."""
    path = shutil.which(runtime)
    if path is None:
        return False
    try:
        done = subprocess.run([path, "info"], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=_PROBE_TIMEOUT, env=client_env(), check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("containers: %s info failed: %s", runtime, exc)
        return False
    if done.returncode != 0:
        log.info("containers: %s is installed but does not answer: %s", runtime,
                 done.stderr.decode(errors="replace").strip()[-300:])
    return done.returncode == 0


def detect(choice: str) -> list[str]:
    """The runtimes that work here, the configured one (or, for auto, podman first)."""
    names: Sequence[str] = RUNTIMES if choice == "auto" else () if choice == "none" else (
        choice,)
    return [n for n in names if works(n)]


def client_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in _CLIENT_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def cdi_gpu_names(dirs: Sequence[str] = CDI_DIRS) -> frozenset[str] | None:
    """The device names of the host's ``nvidia.com/gpu`` CDI specs; None: no such spec."""
    names: set[str] | None = None
    for d in dirs:
        try:
            files = sorted(p for p in Path(d).iterdir() if p.suffix in (".yaml", ".yml", ".json"))
        except OSError:
            continue
        for f in files:
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            if CDI_GPU_KIND in text:
                names = (names or set()) | set(_CDI_NAME.findall(text))
    return None if names is None else frozenset(names)


def _call(argv: list[str]) -> subprocess.CompletedProcess[bytes] | None:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=_CALL_TIMEOUT, env=client_env(), check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("containers: %s failed: %s", " ".join(argv[:3]), exc)
        return None


class Containers:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.runtimes: tuple[str, ...] = ()  # those that work here, the one used first
        self.names: dict[str, str] = {}  # job -> its container, while its run is here

    @property
    def runtime(self) -> str:
        return self.runtimes[0] if self.runtimes else ""

    async def start(self, keep: Callable[[], Sequence[str]]) -> None:
        """Find the runtimes, gossip them, and remove this node's containers whose job is
        not among ``keep()`` (runs adopted after a restart)."""
        found = tuple(await asyncio.to_thread(detect, self.agent.settings.containers_runtime))
        log.info("containers: runtimes %s", ", ".join(found) or "none")
        if found:  # before the node has a runtime (and is given image jobs): a container
            await self.reconcile(set(keep()), found[0])  # started meanwhile is no stray
        self.runtimes = found
        self.agent.node.runtimes = self.runtimes
        self.agent.node.publish_facts()
        if self.runtime:
            await self.refresh_images()

    async def refresh_images(self) -> None:
        """Tell the node which images the runtime holds (at start, and after each run,
        which may have pulled one): a job that needs one prefers a node that holds it."""
        done = await asyncio.to_thread(_call, [
            self.runtime, "images", "--format", "{{.Repository}}:{{.Tag}}"])
        if done is None or done.returncode != 0:
            return
        payload = self.agent.payload
        payload.tell_held(payload.holdings.set_images(image_refs(done.stdout.decode(
            errors="replace"))))

    async def reconcile(self, keep: set[str], runtime: str) -> list[str]:
        """Remove the containers of this node whose job is not in ``keep``."""
        done = await asyncio.to_thread(_call, [
            runtime, "ps", "-a", "--filter", f"label={LABEL_NODE}={self.agent.node.name}",
            "--filter", f"label={LABEL_JOB}", "--format", "{{.Names}}"])
        if done is None or done.returncode != 0:
            return []
        wanted = {self.names[j] for j in keep if j in self.names}
        stale = [n for n in done.stdout.decode().split() if n not in wanted]
        for name in stale:
            log.info("containers: removing %s, whose run is not here any more", name)
            await asyncio.to_thread(_call, [runtime, "rm", "-f", name])
        return stale

    def track(self, job: RunRecord) -> None:
        """A run adopted after a restart: its container is known by name again."""
        self.names[job.id] = container_name(job.id, job.lease_id)

    def command(self, job: RunRecord, devices: Sequence[Device], user: tuple[int, int],
                env: dict[str, str], job_dir: Path, vnpus: Mapping[str, int] | None = None,
                ) -> tuple[list[str], dict[str, str]]:
        """(the argv of the run's client, the client's environment); writes the env file.
        Blocking: call off the loop. Raises ``ContainerError``."""
        if not self.runtime:
            raise ContainerError("this node has no container runtime (podman or docker) "
                                 "that works")
        s = self.agent.settings
        env_file = job_dir / ENV_FILE
        run = ContainerRun(
            self.runtime, job.image, job.command, job.id, job.lease_id, self.agent.node.name,
            user, devices, env, str(env_file), job.image_network or "none", cdi_gpu_names(),
            [d for d in ASCEND_DRIVER_DIRS if os.path.isdir(d)], s.containers_extra_args,
            rootless=os.geteuid() != 0, vnpus=vnpus or {})
        cmd = build(run)
        job_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(env_file_text(cmd.env))
        self.names[job.id] = cmd.name
        return cmd.argv, client_env()

    async def stop(self, job_id: str, grace: float,
                   stop_client: Callable[[float], Awaitable[object]]) -> None:
        """Stop a run: the runtime stops its container (SIGTERM, SIGKILL after ``grace``)
        while the runner stops the client, which ends when its container has."""
        name = self.names.get(job_id)
        if name is None or not self.runtime:
            await stop_client(grace)
            return
        seconds = str(max(0, int(grace)))
        stopping = asyncio.ensure_future(asyncio.to_thread(
            _call, [self.runtime, "stop", "-t", seconds, name]))
        try:
            await stop_client(grace + STOP_SLACK)
        finally:
            await stopping

    async def remove(self, name: str) -> bool:
        """``rm -f NAME``, tried again while the runtime fails (a container left running
        holds the devices its lease gave back); False if it never succeeded."""
        for pause in (*RM_RETRIES, None):
            done = await asyncio.to_thread(_call, [self.runtime, "rm", "-f", name])
            if done is not None and (done.returncode == 0 or b"no such container"
                                     in done.stderr.lower()):
                return True
            why = "no answer" if done is None else done.stderr.decode(errors="replace")
            if pause is None:
                log.error("containers: cannot remove %s, which may still run: %s", name,
                          why.strip()[-300:])
                return False
            log.warning("containers: cannot remove %s (again in %g s): %s", name, pause,
                        why.strip()[-300:])
            await asyncio.sleep(pause)
        return False

    async def ended(self, job_id: str, job_dir: Path) -> None:
        """A run's client has ended: remove what is left of its container, and its env."""
        name = self.names.pop(job_id, None)
        if name is None:
            return
        if self.runtime:
            await self.remove(name)
            await self.refresh_images()
        try:
            (job_dir / ENV_FILE).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("job %s: cannot remove its env file: %s", job_id, exc)


__all__ = ["ContainerError", "Containers", "cdi_gpu_names", "detect"]
