"""Working directories in a trace replay (``flexmesh simulate --workdirs N``): what the
holding bonus buys in bytes and what it costs in fragmentation.

The openb trace says nothing of what tasks carry, so each task is given one of ``N``
working directories, drawn by the seed: directory ``k`` is drawn with weight ``1/(k+1)``
(a few are run again and again, most rarely), and its size is log-uniform between 10 MiB
and 2 GiB. Each node remembers the last ``MAX_HELD`` directories it ran, as its gossiped
digest would (``protocol.facts``); a task placed on a node that holds its directory saves
its size, anywhere else fetches it.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field

from flexmesh.protocol.facts import MAX_HELD

MIN_BYTES = 10 * 2**20
MAX_BYTES = 2 * 2**30


@dataclass
class HoldSim:
    workdirs: int
    seed: int
    sizes: list[int] = field(default_factory=list)
    fetched_bytes: int = 0
    saved_bytes: int = 0
    _cum: list[float] = field(default_factory=list)
    _rng: random.Random = field(default_factory=random.Random)
    _held: dict[str, OrderedDict[int, None]] = field(default_factory=dict)
    _holders: dict[int, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.workdirs <= 0:
            raise ValueError("workdirs must be at least 1")
        self._rng = random.Random(self.seed * 7907 + 3)  # a stream of its own
        lo, hi = math.log(MIN_BYTES), math.log(MAX_BYTES)
        self.sizes = [int(math.exp(self._rng.uniform(lo, hi))) for _ in range(self.workdirs)]
        self._cum = list(itertools.accumulate(1.0 / (k + 1) for k in range(self.workdirs)))

    def draw(self) -> int:
        """The working directory of the next task."""
        return self._rng.choices(range(self.workdirs), cum_weights=self._cum)[0]

    def saved(self, workdir: int) -> dict[str, int]:
        """Node -> bytes it would not fetch for ``workdir``."""
        size = self.sizes[workdir]
        return dict.fromkeys(self._holders.get(workdir, ()), size)

    def placed(self, node: str, workdir: int) -> None:
        """A task with ``workdir`` runs on ``node``: a hit, or a fetch it then holds."""
        held = self._held.setdefault(node, OrderedDict())
        if workdir in held:
            self.saved_bytes += self.sizes[workdir]
            held.move_to_end(workdir)
            return
        self.fetched_bytes += self.sizes[workdir]
        held[workdir] = None
        self._holders.setdefault(workdir, set()).add(node)
        if len(held) > MAX_HELD:
            old, _ = held.popitem(last=False)
            self._holders[old].discard(node)

    def figures(self) -> dict[str, object]:
        total = self.fetched_bytes + self.saved_bytes
        pct = round(100.0 * self.saved_bytes / total, 2) if total else None
        return {
            "workdirs": self.workdirs,
            "workdir_bytes_fetched": self.fetched_bytes,
            "workdir_bytes_saved": self.saved_bytes,
            "workdir_bytes_saved_pct": pct,
        }


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``flexmesh simulate``'s options for working directories."""
    p.add_argument(
        "--workdirs",
        type=int,
        default=0,
        help="give each task one of N working directories and count the bytes nodes "
        "fetch for them (0: none)",
    )
    p.add_argument(
        "--cache-bonus",
        type=float,
        default=None,
        help="the most a node holding a task's working directory gains (default: the "
        "policy's; 0: no preference)",
    )


def arguments_problem(args: argparse.Namespace) -> str | None:
    if not 0 <= args.workdirs <= 10**6:
        return "--workdirs must be between 0 and 1000000"
    bonus = args.cache_bonus
    if bonus is not None and not (math.isfinite(bonus) and 0 <= bonus <= 100):
        return "--cache-bonus must be between 0 and 100"
    return None
