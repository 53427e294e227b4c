"""The command line that runs a job in an OCI container, built without running anything.

``build`` turns a job's run (its image, command, user, leased devices and environment, as
the owner computed them for a plain process) into the ``podman run`` or ``docker run``
argv the owner spawns as the job's process, and the environment that goes inside (written
to an ``--env-file``, never onto the command line, where every local user could read it).

What goes in, and nothing else:

* the leased devices: NVIDIA GPUs by UUID through CDI (``--device nvidia.com/gpu=UUID``)
  where the host's CDI spec names them, otherwise docker's own ``--gpus device=UUID``
  (podman has no such flag: without a CDI spec it refuses, saying how to make one); Ascend
  NPUs as ``/dev/davinciN`` (a fraction: its vNPU, ``/dev/vdavinciV`` as ``/dev/davinciV``)
  plus the manager devices, and the driver directories read-only;
  simulated devices only as their environment;
* the job's working directory at ``/flexmesh/work`` (its ``--workdir``) and an output
  directory, where the job has one, at ``/flexmesh/output``; the HAMi-core library and
  the MPS pipe directory where the enforcement uses them;
* the job's user (``--user uid:gid``), no capabilities (``--cap-drop all``, no new
  privileges), a network only if the submitter asked for one (``--network none``), an
  init that forwards signals (``--init``: a stop reaches the command, not a PID 1 that
  ignores it), labels naming the job, its lease and the node (the owner finds its
  containers again after a restart), and the operator's ``extra_args``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flexmesh.agent.devices.base import Device

RUNTIMES = ("podman", "docker")
NETWORKS = ("none", "host", "bridge")
DEFAULT_NETWORK = "none"
LABEL_JOB, LABEL_LEASE, LABEL_NODE = "flexmesh.job", "flexmesh.lease", "flexmesh.node"
WORK_MOUNT, OUTPUT_MOUNT = "/flexmesh/work", "/flexmesh/output"
ASCEND_MANAGERS = ("/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc")
ASCEND_DRIVER_DIRS = ("/usr/local/Ascend/driver", "/usr/local/dcmi")
CDI_GPU_KIND = "nvidia.com/gpu"
# An image reference: registry/name:tag@digest characters only (no spaces, no option).
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*")
MAX_IMAGE = 512
# containers/image transports other than a registry's: podman takes "dir:/path",
# "oci-archive:/path", "docker-archive:/path" ... as an image to read from the host, as the
# agent's user (root), so a submitter could make it open any path of the owner.
HOST_TRANSPORTS = frozenset({"containers-storage", "dir", "docker-archive", "docker-daemon",
                             "oci", "oci-archive", "ostree", "sif", "tarball"})
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_NPU = re.compile(r"npu(\d+)")


class ContainerError(Exception):
    """The job cannot run in a container here; the message says why, for a person."""


@dataclass(frozen=True, slots=True)
class ContainerRun:
    """What the owner knows of one run, as it would start a plain process."""

    runtime: str  # "podman" | "docker"
    image: str
    command: Sequence[str]
    job_id: str
    lease_id: str
    node: str
    user: tuple[int, int]  # uid, gid inside (and of the files it writes in its mounts)
    devices: Sequence[Device]
    env: Mapping[str, str]  # the job's (submitter's and owner's layers), host paths
    env_file: str  # where the runtime reads the environment from
    network: str = DEFAULT_NETWORK
    cdi_gpus: frozenset[str] | None = None  # names in the host's nvidia.com/gpu CDI spec
    ascend_dirs: Sequence[str] = ()  # driver directories present on the host
    extra_args: Sequence[str] = ()
    rootless: bool = False  # the agent is not root: podman maps its user in (keep-id)
    vnpus: Mapping[str, int] = field(default_factory=dict)  # NPU id -> its run's vNPU id


@dataclass(frozen=True, slots=True)
class ContainerCommand:
    argv: list[str]
    name: str
    env: dict[str, str] = field(default_factory=dict)  # what the command sees inside


def image_problem(image: str) -> str | None:
    """Why ``image`` is not an image reference, or None."""
    if not image or len(image) > MAX_IMAGE or not _IMAGE.fullmatch(image):
        return (f"image must be an image reference (letters, digits and ._/:@+-, at most "
                f"{MAX_IMAGE} characters, not starting with '-'): {image[:60]!r}")
    transport, colon, _ = image.partition(":")
    if colon and transport in HOST_TRANSPORTS:
        return (f"image must name an image of a registry or of the runtime's store, not a "
                f"{transport}: source on the node: {image[:60]!r}")
    return None


def network_problem(network: str) -> str | None:
    if network not in NETWORKS:
        return f"image_network must be one of {', '.join(NETWORKS)}, not {network[:20]!r}"
    return None


def container_name(job_id: str, lease_id: str) -> str:
    """One name per run: a later run of the job (requeued) never meets an earlier one. The
    whole lease id (``NODE/TOKEN``): a prefix of it is the same for every lease of a node
    whose name is that long."""
    return _NAME_UNSAFE.sub("_", f"flexmesh-{job_id}-{lease_id}")


def build(run: ContainerRun) -> ContainerCommand:
    """The argv to spawn and the environment inside; ``ContainerError`` if it cannot be."""
    if run.runtime not in RUNTIMES:
        raise ContainerError(f"unknown container runtime {run.runtime!r}")
    for problem in (image_problem(run.image), network_problem(run.network)):
        if problem:
            raise ContainerError(problem)
    name = container_name(run.job_id, run.lease_id)
    env = dict(run.env)
    argv = [run.runtime, "run", "--rm", "--name", name, "--init",
            "--label", f"{LABEL_JOB}={run.job_id}", "--label", f"{LABEL_LEASE}={run.lease_id}",
            "--label", f"{LABEL_NODE}={run.node}",
            *_identity(run), "--cap-drop", "all", "--security-opt", "no-new-privileges",
            "--network", run.network]
    argv += device_args(run, env)
    argv += mount_args(env)
    argv += ["--env-file", run.env_file, *run.extra_args, run.image, *run.command]
    return ContainerCommand(argv, name, env)


def _identity(run: ContainerRun) -> list[str]:
    uid, gid = run.user
    keep = ["--userns", "keep-id"] if run.rootless and run.runtime == "podman" else []
    return [*keep, "--user", f"{uid}:{gid}"]


def device_args(run: ContainerRun, env: dict[str, str]) -> list[str]:
    """The arguments that pass the leased devices in (and ``env`` fixed to match)."""
    gpus = [d for d in run.devices if d.backend == "nvml"]
    npus = [d for d in run.devices if d.backend == "ascend"]
    out: list[str] = []
    # An image that sets NVIDIA_VISIBLE_DEVICES=all (the CUDA images do) must not widen
    # what a host whose default runtime is NVIDIA's passes in.
    env["NVIDIA_VISIBLE_DEVICES"] = ",".join(d.id for d in gpus) if gpus else "void"
    if gpus:
        out += _nvidia_args(run, [d.id for d in gpus])
    if npus:
        out += _ascend_args(run, npus, env)
    else:  # (nor may an image's own ASCEND_VISIBLE_DEVICES, on an Ascend-runtime host)
        env["ASCEND_VISIBLE_DEVICES"] = ""
    return out


def _nvidia_args(run: ContainerRun, uuids: list[str]) -> list[str]:
    if run.cdi_gpus is not None:
        missing = [u for u in uuids if u not in run.cdi_gpus]
        if not missing:
            return [a for u in uuids for a in ("--device", f"{CDI_GPU_KIND}={u}")]
        if run.runtime == "podman":
            raise ContainerError(
                f"the CDI spec does not name GPU {missing[0]}: regenerate it with "
                "nvidia-ctk cdi generate --device-name-strategy=uuid "
                "--output=/etc/cdi/nvidia.yaml")
    if run.runtime == "podman":
        raise ContainerError(
            "podman passes NVIDIA GPUs only through CDI and this node has no CDI spec: "
            "nvidia-ctk cdi generate --device-name-strategy=uuid --output=/etc/cdi/nvidia.yaml")
    spec = f"device={','.join(uuids)}"
    return ["--gpus", spec if len(uuids) == 1 else f'"{spec}"']  # (docker reads it as CSV)


def _ascend_args(run: ContainerRun, npus: list[Device], env: dict[str, str]) -> list[str]:
    out: list[str] = []
    ids: list[str] = []
    for d in npus:
        m = _NPU.fullmatch(d.id)
        if m is None:
            raise ContainerError(f"cannot tell the /dev/davinci node of NPU {d.id!r}")
        vid = run.vnpus.get(d.id)  # a fraction: its vNPU, at the name the driver wants
        out += ["--device", f"/dev/vdavinci{vid}:/dev/davinci{vid}" if vid is not None
                else f"/dev/davinci{m.group(1)}"]
        ids.append(m.group(1) if vid is None else str(vid))
    for path in ASCEND_MANAGERS:
        out += ["--device", path]
    for path in run.ascend_dirs:
        out += ["--volume", f"{path}:{path}:ro"]
    # Inside, the NPUs passed in are numbered from 0, in the order given.
    env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(npus)))
    env["ASCEND_VISIBLE_DEVICES"] = ",".join(ids)
    return out


def mount_args(env: dict[str, str]) -> list[str]:
    """Bind mounts for what ``env`` names on the host (the work and output directories,
    HAMi-core's library, MPS's pipes), ``env`` rewritten to the paths inside."""
    out: list[str] = []
    work = env.get("FLEXMESH_WORKDIR")
    if work:
        out += ["--volume", f"{_path(work)}:{WORK_MOUNT}", "--workdir", WORK_MOUNT]
        env["FLEXMESH_WORKDIR"] = WORK_MOUNT
    output = env.get("FLEXMESH_OUTPUT")
    if output:
        out += ["--volume", f"{_path(output)}:{OUTPUT_MOUNT}"]
        env["FLEXMESH_OUTPUT"] = OUTPUT_MOUNT
    preload = env.get("LD_PRELOAD")
    if preload:  # HAMi-core's libvgpu.so, at the same path inside
        out += ["--volume", f"{_path(preload)}:{preload}:ro"]
    if any(k.startswith("CUDA_MPS_") for k in env):
        pipes = env.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps"
        env["CUDA_MPS_PIPE_DIRECTORY"] = pipes
        out += ["--volume", f"{_path(pipes)}:{pipes}", "--ipc", "host"]  # MPS needs both
    return out


def _path(path: str) -> str:
    if not path.startswith("/") or ":" in path or "," in path:
        raise ContainerError(f"cannot mount {path!r} into a container")
    return path


def env_file_text(env: Mapping[str, str]) -> str:
    """``NAME=VALUE`` lines, as podman and docker read an ``--env-file``: a value on more
    than one line cannot be written so, and is refused, as is a name that the runtime
    would read as another (blanks, '=')."""
    lines = []
    for k, v in env.items():
        # The runtime strips a name's leading blanks ("\tASCEND_VISIBLE_DEVICES" would set
        # a name the owner keeps for itself, which a peer's start request may not).
        if not k or "=" in k or not k.isprintable() or any(c.isspace() for c in k):
            raise ContainerError(f"env name {k[:40]!r} is not a plain name (no '=', blanks "
                                 "or control characters)")
        if "\n" in v or "\r" in v:
            raise ContainerError(f"env {k} holds a line break, which a container's "
                                 "env file cannot carry")
        lines.append(f"{k}={v}\n")
    return "".join(lines)


def config_problem(runtime: str, extra_args: Sequence[str]) -> str | None:
    """What is wrong with the ``[containers]`` settings, or None."""
    if runtime not in ("auto", "none", *RUNTIMES):
        return f"runtime must be auto, none, {' or '.join(RUNTIMES)}, not {runtime!r}"
    if any("\0" in a for a in extra_args):
        return "extra_args may not hold a NUL byte"
    return None


# What podman and docker exit with when the container could not be run (else the command's
# own code): say so, since a host's runtime may need [containers] extra_args.
_RUNTIME_CODES = {125: "the runtime could not run the container",
                  126: "the runtime or the image could not invoke the command",
                  127: "the command was not found in the image"}


def exit_hint(exit_code: int | None) -> str:
    """A note for a container run's exit code that may be its runtime's, or ""."""
    what = _RUNTIME_CODES.get(exit_code or 0)
    return (f" ({what}, or the command's own code; see the job's stderr, and "
            "[containers] extra_args in the README)") if what else ""
