"""``flexmesh simulate``: replay a GPU-sharing trace through the real placement policies.

The protocol is the FGD paper's (Weng et al., USENIX ATC '23) on Alibaba's openb trace:

1. The cluster is the node list, each GPU 1000 milli. A task fits a node if its CPU and
   memory fit, its GPU model is one of ``gpu_spec`` when that is given, and either one GPU
   has ``gpu_milli`` left (a sharing task) or ``num_gpu`` GPUs are completely free.
2. The tasks are shuffled by the seed, then tasks sampled with replacement from the trace
   are appended until the total GPU request reaches ``--inflate`` (130%) of the capacity.
3. Each task is tried once; one that does not fit is dropped. Tasks never leave.
4. After every task: *arrived* is the GPU request of all tasks tried so far, *allocated*
   the GPU milli placed. Unallocated GPU % at arrival a% = 100 - the mean, over the events
   whose arrived share rounds to a%, of allocated / capacity x 100.

The placement is made by :class:`flexmesh.policies.Placer`, the same code the agent's
coordinator runs; the fragmentation target workload is the trace's own task mix, as in the
paper. ``--no-sharing`` rounds every fractional request up to a whole GPU (the world
without pooling); the task sequence is the same, so ``gpu_tasks_placed_100`` (GPU tasks
placed among those that arrived by the time the trace's own request reached 100% of the
capacity) compares the two directly.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexmesh.agent.holdsim import HoldSim, add_arguments, arguments_problem
from flexmesh.policies import DEFAULT_POLICY, SPECS, get_spec
from flexmesh.policies.cluster import Cluster
from flexmesh.policies.engine import Placer
from flexmesh.policies.nodes import DeviceSpec, NodeSpec
from flexmesh.policies.types import WHOLE, NoFit, Request
from flexmesh.policies.workload import Workload

NODE_COLUMNS = ("sn", "cpu_milli", "memory_mib", "gpu", "model")
TASK_COLUMNS = ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli")


class TraceError(Exception):
    """A malformed input file; the message names the file, the line and the problem."""


@dataclass(frozen=True, slots=True)
class Task:
    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    models: tuple[str, ...] = ()

    @property
    def gpu_request(self) -> int:
        return self.num_gpu * self.gpu_milli

    def request(self, sharing: bool = True) -> Request:
        milli = self.gpu_milli if self.num_gpu > 0 else 0
        if not sharing and 0 < milli < WHOLE:
            milli = WHOLE
        return Request(
            compute_milli=milli,
            memory_mib=0,
            kind="gpu" if self.num_gpu > 0 else "any",
            models=self.models,
            count=self.num_gpu,
            cpu_milli=self.cpu_milli,
            host_memory_mib=self.memory_mib,
        )


def _int(
    path: Path, line: int, row: dict[str, str], col: str, lo: int = 0, hi: int | None = None
) -> int:
    raw = (row.get(col) or "").strip()
    if raw == "":
        raise TraceError(f"{path}:{line}: column {col!r} is empty")
    try:
        v = int(raw)
    except ValueError:
        try:
            f = float(raw)
        except ValueError:
            raise TraceError(f"{path}:{line}: column {col!r} is not a number: {raw!r}") from None
        if not f.is_integer():
            raise TraceError(
                f"{path}:{line}: column {col!r} is not a whole number: {raw!r}"
            ) from None
        v = int(f)
    if v < lo or (hi is not None and v > hi):
        bound = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise TraceError(f"{path}:{line}: column {col!r} must be {bound}, got {v}")
    return v


def _rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames
            if not header:
                raise TraceError(f"{path}:1: empty file (expected a header: {','.join(required)})")
            missing = [c for c in required if c not in header]
            if missing:
                raise TraceError(
                    f"{path}:1: header lacks column(s) {', '.join(missing)} "
                    f"(expected {','.join(required)})"
                )
            out: list[tuple[int, dict[str, str]]] = []
            for row in reader:
                line = reader.line_num
                if None in row:
                    raise TraceError(f"{path}:{line}: more fields than the header has")
                if any(row.get(c) is None for c in required):
                    raise TraceError(f"{path}:{line}: fewer fields than the header has")
                out.append((line, row))
            return out
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise TraceError(f"{path}: {e}") from None


def load_nodes(path: Path) -> list[NodeSpec]:
    nodes: list[NodeSpec] = []
    seen: set[str] = set()
    for line, row in _rows(path, NODE_COLUMNS):
        name = row["sn"].strip()
        if not name:
            raise TraceError(f"{path}:{line}: column 'sn' is empty")
        if name in seen:
            raise TraceError(f"{path}:{line}: node {name!r} is listed twice")
        seen.add(name)
        cpu = _int(path, line, row, "cpu_milli")
        mem = _int(path, line, row, "memory_mib")
        gpus = _int(path, line, row, "gpu", 0, 1024)
        model = row["model"].strip()
        # a node without GPUs (openb_node_list_all_node.csv) can still take CPU-only tasks
        devices = tuple(DeviceSpec(id=f"gpu{i}", kind="gpu", model=model) for i in range(gpus))
        nodes.append(NodeSpec(name=name, devices=devices, cpu_milli=cpu, memory_mib=mem))
    if not nodes:
        raise TraceError(f"{path}: no node with a GPU")
    return nodes


def load_tasks(path: Path) -> list[Task]:
    tasks: list[Task] = []
    for line, row in _rows(path, TASK_COLUMNS):
        num = _int(path, line, row, "num_gpu", 0, 1024)
        milli = _int(path, line, row, "gpu_milli", 0, WHOLE)
        if num > 0 and milli == 0:
            raise TraceError(f"{path}:{line}: num_gpu is {num} but gpu_milli is 0")
        spec = (row.get("gpu_spec") or "").strip()
        models = tuple(sorted(m.strip() for m in spec.split("|") if m.strip())) if spec else ()
        tasks.append(
            Task(
                name=row["name"].strip(),
                cpu_milli=_int(path, line, row, "cpu_milli"),
                memory_mib=_int(path, line, row, "memory_mib"),
                num_gpu=num,
                gpu_milli=milli if num > 0 else 0,
                models=models,
            )
        )
    if not tasks:
        raise TraceError(f"{path}: no tasks")
    return tasks


def arrival_order(tasks: Sequence[Task], capacity: int, seed: int, inflate: float) -> list[Task]:
    """Shuffle by the seed, then sample with replacement up to ``inflate`` x capacity."""
    rng = random.Random(seed)
    order = list(tasks)
    rng.shuffle(order)
    total = sum(t.gpu_request for t in order)
    if any(t.gpu_request > 0 for t in tasks):
        target = inflate * capacity
        while total < target:
            t = tasks[rng.randrange(len(tasks))]
            order.append(t)
            total += t.gpu_request
    return order


def unallocated_at(events: Sequence[tuple[float, float]], level: int) -> float | None:
    """100 - mean allocated % over the events whose arrived % rounds to ``level``; where
    none does (a small cluster and a big task), over those within 1 of it, as the paper's
    analysis script does; None if there are none either."""
    vals = [alloc for arr, alloc in events if math.floor(arr + 0.5) == level]
    if not vals:
        vals = [alloc for arr, alloc in events if abs(math.floor(arr + 0.5) - level) <= 1]
    if not vals:
        return None
    return 100.0 - sum(vals) / len(vals)


@dataclass(slots=True)
class _Tally:
    """What one replay counts as the tasks arrive, in GPU milli and in tasks.

    ``arrived`` and ``allocated`` are in the run's own (possibly rounded) requests;
    ``orig_arrived`` is as the trace asks, the same with and without sharing, so that the
    "within 100%" counts compare the two modes task for task.
    """

    capacity: int
    events: list[tuple[float, float]] = field(default_factory=list)
    arrived: int = 0
    allocated: int = 0
    orig_arrived: int = 0
    placed: int = 0
    gpu_tasks: int = 0
    gpu_placed: int = 0
    tasks_100: int = 0
    gpu_tasks_100: int = 0
    gpu_placed_100: int = 0

    def add(self, task: Task, gpu: int, ok: bool) -> None:
        self.orig_arrived += task.gpu_request
        within_100 = self.orig_arrived <= self.capacity
        self.arrived += gpu
        if ok:
            self.placed += 1
            self.allocated += gpu
        if task.num_gpu > 0:
            self.gpu_tasks += 1
            self.gpu_placed += ok
            if within_100:
                self.gpu_tasks_100 += 1
                self.gpu_placed_100 += ok
        if within_100:
            self.tasks_100 += 1
        self.events.append((self.arrived * 100.0 / self.capacity,
                            self.allocated * 100.0 / self.capacity))


def replay(
    nodes: Sequence[NodeSpec],
    tasks: Sequence[Task],
    policy: str = DEFAULT_POLICY,
    seed: int = 42,
    inflate: float = 1.3,
    sharing: bool = True,
    workdirs: int = 0,
    cache_bonus: float | None = None,
) -> dict[str, Any]:
    """One run of the protocol; returns the figures ``-o json`` prints. With
    ``workdirs``, tasks carry working directories (``holdsim``); ``cache_bonus``
    overrides the policy's holding bonus."""
    spec = get_spec(policy, None if cache_bonus is None else {"cache": cache_bonus})
    cluster = Cluster(nodes)
    capacity = cluster.gpu_capacity_milli
    order = arrival_order(tasks, capacity, seed, inflate)
    workload = Workload.from_requests(t.request(sharing) for t in tasks)
    # equally good nodes are chosen between at random (as the paper's Kubernetes does),
    # from a stream of its own so the arrival order does not depend on the policy
    placer = Placer(cluster, spec, workload=workload, rng=random.Random(seed * 7919 + 1))

    started = time.perf_counter()
    tally = _Tally(capacity)
    decide = placer.decide
    commit = placer.commit
    hold = HoldSim(workdirs, seed) if workdirs else None
    for task in order:
        req = task.request(sharing)
        wd = hold.draw() if hold else 0
        res = decide(req, saved=hold.saved(wd) if hold else None)
        ok = not isinstance(res, NoFit)
        if not isinstance(res, NoFit):
            commit(req, res)
            if hold:
                hold.placed(res.node, wd)
        tally.add(task, req.compute_milli * req.count, ok)
    seconds = time.perf_counter() - started
    return {"policy": spec.name, "seed": seed, "inflate": inflate, "sharing": sharing,
            "nodes": len(nodes), **_figures(tally, len(order), inflate),
            **(hold.figures() if hold else {}), "seconds": round(seconds, 3)}


def _figures(tally: _Tally, tasks: int, inflate: float) -> dict[str, Any]:
    def rnd(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return {
        "capacity_gpu_milli": tally.capacity,
        "tasks": tasks,
        "placed": tally.placed,
        "failed": tasks - tally.placed,
        "gpu_tasks": tally.gpu_tasks,
        "gpu_tasks_placed": tally.gpu_placed,
        "tasks_100": tally.tasks_100,
        "gpu_tasks_100": tally.gpu_tasks_100,
        "gpu_tasks_placed_100": tally.gpu_placed_100,
        "allocated_gpu_pct": round(tally.allocated * 100.0 / tally.capacity, 4),
        "unallocated_gpu_pct_100": rnd(unallocated_at(tally.events, 100)),
        "unallocated_gpu_pct_130": rnd(unallocated_at(tally.events, round(inflate * 100))),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexmesh simulate",
        description="Replay a GPU-sharing trace through flexmesh's placement policies "
        "(the FGD paper's protocol).",
    )
    p.add_argument("--trace", required=True, type=Path, help="pods CSV (openb_pod_list_*.csv)")
    p.add_argument("--nodes", required=True, type=Path, help="nodes CSV (openb_node_list_*.csv)")
    p.add_argument(
        "--policy",
        default=DEFAULT_POLICY,
        help=f"placement policy (default {DEFAULT_POLICY}; known: {', '.join(sorted(SPECS))};"
        " or scores with weights, e.g. 'fgd+packing:0.05')",
    )
    p.add_argument("--seed", type=int, default=42, help="shuffle and sampling seed (default 42)")
    p.add_argument(
        "--inflate",
        type=float,
        default=1.3,
        help="append sampled tasks until the GPU request is this share of capacity (1.3)",
    )
    p.add_argument(
        "--no-sharing",
        action="store_true",
        help="round every fractional GPU request up to a whole GPU",
    )
    add_arguments(p)
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    return p


def main(argv: list[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error
        return int(e.code) if isinstance(e.code, int) else 2
    if not math.isfinite(args.inflate) or args.inflate <= 0 or args.inflate > 100:
        print("flexmesh simulate: --inflate must be a positive number", file=sys.stderr)
        return 2
    if (problem := arguments_problem(args)) is not None:
        print(f"flexmesh simulate: {problem}", file=sys.stderr)
        return 2
    try:
        get_spec(args.policy)
    except ValueError as e:
        print(f"flexmesh simulate: {e}", file=sys.stderr)
        return 2
    try:
        nodes = load_nodes(args.nodes)
        tasks = load_tasks(args.trace)
    except TraceError as e:
        print(f"flexmesh simulate: {e}", file=sys.stderr)
        return 2
    out = replay(nodes, tasks, args.policy, args.seed, args.inflate, not args.no_sharing,
                 args.workdirs, args.cache_bonus)
    out["trace"] = args.trace.name
    if args.output == "json":
        print(json.dumps(out, sort_keys=False))
    else:

        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.2f}%"

        print(
            f"trace      {args.trace.name} on {out['nodes']} nodes "
            f"({out['capacity_gpu_milli'] / 1000:.0f} GPUs)"
        )
        print(
            f"policy     {out['policy']}  seed {out['seed']}  inflate {out['inflate']}"
            f"{'' if out['sharing'] else '  (no sharing)'}"
        )
        print(f"tasks      {out['tasks']}: {out['placed']} placed, {out['failed']} failed")
        print(
            f"unallocated GPU at 100% arrival {pct(out['unallocated_gpu_pct_100'])}, "
            f"at {round(out['inflate'] * 100)}% {pct(out['unallocated_gpu_pct_130'])}"
        )
        if args.workdirs:
            print(f"workdirs   {args.workdirs}: {out['workdir_bytes_saved_pct']}% not fetched")
        print(f"seconds    {out['seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
