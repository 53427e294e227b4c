"""What a job's environment is made of, and which names in it are the owner's alone.

A job starts with a clean environment, never the agent's, built in three layers:

1. ``base_env``: a sane ``PATH`` and the ``HOME``, ``USER``, ``LOGNAME`` and ``SHELL`` of
   the user the job runs as, and the locale from the configuration (``[jobs] locale``);
2. the submitter's variables (``submit --env``), none of them reserved;
3. the owner's: flexmesh's own ``FLEXMESH_*`` names and whatever makes the leased devices
   (and only them) visible and holds the job to its fraction.

The owner's layer always wins. A reserved name (device visibility, MPS and HAMi-core
limits, the dynamic loader's preload and audit hooks, ``FLEXMESH_*``) is refused at submit
(``reserved_problem``) and dropped again by the owner (``user_layer``), so a job submitted
through an older or hostile origin cannot set one either.
"""

from __future__ import annotations

import pwd
from collections.abc import Mapping

# Names only the owner sets. Exact names, then prefixes (a family of per-device variables).
RESERVED_NAMES = frozenset({
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    "ASCEND_RT_VISIBLE_DEVICES", "ASCEND_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "CUDA_DEVICE_SM_LIMIT", "CUDA_OVERSUBSCRIBE", "GPU_CORE_UTILIZATION_POLICY",
    "ACTIVE_OOM_KILLER",
    "LD_PRELOAD", "LD_AUDIT",
})
RESERVED_PREFIXES = ("FLEXMESH_", "CUDA_MPS_", "CUDA_DEVICE_MEMORY_")
GANG_PREFIX = "FLEXMESH_GANG"  # set by a gang's origin, never taken from the user

ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_LOCALE = "C.UTF-8"


def is_reserved(name: str) -> bool:
    return name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES)


def reserved_problem(env: Mapping[str, str]) -> str | None:
    """Why a submitted environment is refused (it names a reserved variable), or None."""
    taken = sorted(k for k in env if is_reserved(k))
    if not taken:
        return None
    return (f"env may not set {', '.join(taken)}: the node running the job sets "
            "its devices, their visibility and its limits")


def user_layer(env: Mapping[str, str]) -> dict[str, str]:
    """The submitter's variables a run takes: none reserved, but the gang's, which the
    job's origin sets itself."""
    return {k: v for k, v in env.items() if not is_reserved(k) or k.startswith(GANG_PREFIX)}


def base_env(uid: int, locale: str = DEFAULT_LOCALE) -> dict[str, str]:
    """The first layer for a job running as ``uid`` (may block on NSS: call off-loop)."""
    try:
        entry = pwd.getpwuid(uid)
        name, home, shell = entry.pw_name, entry.pw_dir or "/", entry.pw_shell or "/bin/sh"
    except KeyError:  # no passwd entry: a number, and nowhere of its own
        name, home, shell = str(uid), "/", "/bin/sh"
    env = {"PATH": ROOT_PATH if uid == 0 else USER_PATH, "HOME": home, "USER": name,
           "LOGNAME": name, "SHELL": shell}
    if locale:
        env["LANG"] = locale
    return env


def job_environment(base: Mapping[str, str], submitted: Mapping[str, str],
                    owner: Mapping[str, str]) -> dict[str, str]:
    """The three layers, later ones winning."""
    return {**base, **user_layer(submitted), **owner}
