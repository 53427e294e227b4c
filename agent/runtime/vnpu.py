"""vNPUs for NPU fractions in containers, the owner's side: create one before the
container starts, destroy it once the container is gone, and at start destroy those an
earlier instance created whose run is not here any more (see ``devices.vnpu``).

Only vNPUs this agent created are ever destroyed: each is written to ``vnpus.json`` in
the state directory before ``npu-smi`` is asked to create it (a crash in between leaves a
record of one that may exist, never one that exists without a record), and leaves it
once ``npu-smi`` destroyed it or no longer lists it. A destroy that fails (the vNPU still
bound to a container that has not exited) keeps the record: the next start tries again.

Every ``npu-smi`` call blocks (it forks and waits, and ``set`` may ask ``continue
setting?(Y/N)``, answered ``Y``): the async methods run them on a worker thread, one at
a time (ids are chosen from what the chip lists, so two creates must not interleave).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from flexmesh.agent.devices import vnpu
from flexmesh.agent.devices.base import Device

log = logging.getLogger("flexmesh.agent")

STATE_FILE = "vnpus.json"
CREATING, CREATED = "creating", "created"
_TIMEOUT = 30.0
_DAVINCI = re.compile(r"davinci(\d+)")
_NPU = re.compile(r"npu(\d+)")

# (argv) -> (exit status, what it printed, stdout and stderr together)
Runner = Callable[[Sequence[str]], tuple[int, str]]


class VnpuError(Exception):
    """A vNPU could not be made for a run; the message says why, for a person."""


@dataclass(frozen=True, slots=True)
class Record:
    vnpu_id: int
    job: str
    lease: str
    device: str  # the NPU's id on this node (npu<logic id>)
    npu_id: int
    chip_id: int
    phy_id: int
    template: str
    state: str = CREATING


def run_npu_smi(argv: Sequence[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(list(argv), input="Y\n", capture_output=True, text=True,
                              timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, str(exc)
    return done.returncode, f"{done.stdout}{done.stderr}"


class Vnpus:
    """The vNPUs this agent made. ``smi`` is the npu-smi path (None: not found here)."""

    def __init__(self, smi: str | None, state_dir: Path, dev_dir: Path = Path("/dev"),
                 runner: Runner | None = None) -> None:
        self.smi = smi
        self.path = state_dir / STATE_FILE
        self.dev_dir = dev_dir
        self._runner = runner or run_npu_smi
        self._lock = threading.Lock()
        self._chips: dict[int, vnpu.ChipIds] = {}  # logic id -> the chip's ids
        self.records: dict[int, Record] = self._load()
        self._earlier = frozenset(self.records)  # made by an earlier instance

    # --- the state file -------------------------------------------------------------

    def _load(self) -> dict[int, Record]:
        try:
            raw = json.loads(self.path.read_text())
            return {int(r["vnpu_id"]): Record(**r) for r in raw}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            # Kept aside, not overwritten: a person may still read which vNPUs were ours.
            aside = self.path.with_name(f"{STATE_FILE}.unreadable")
            log.error("vnpu: %s is unreadable (%s); moved to %s, its vNPUs are not "
                      "destroyed by this agent", self.path, exc, aside)
            os.replace(self.path, aside)
            return {}

    def _save(self) -> None:
        tmp = self.path.with_name(f".{STATE_FILE}.tmp")
        data = json.dumps([asdict(r) for r in self.records.values()], indent=1)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # --- npu-smi --------------------------------------------------------------------

    def _call(self, argv: list[str]) -> tuple[int, str]:
        rc, out = self._runner(argv)
        log.debug("vnpu: %s -> %d %s", " ".join(argv[1:]), rc, out.strip()[-200:])
        return rc, out

    def _chip(self, device: Device) -> vnpu.ChipIds:
        """The ids of the chip behind ``npu<logic>``: each ``/dev/davinciN`` is physical
        id N, and ``phyid-remap`` names its logic, NPU and chip ids."""
        m = _NPU.fullmatch(device.id)
        if m is None or self.smi is None:
            raise VnpuError(f"cannot tell the chip of NPU {device.id!r}"
                            + ("" if self.smi else ": npu-smi was not found"))
        logic = int(m.group(1))
        if logic not in self._chips:
            for phy in self._physical_ids():
                rc, out = self._call(vnpu.remap_argv(self.smi, phy))
                try:
                    ids = vnpu.parse_remap(out) if rc == 0 else None
                except ValueError as exc:
                    log.warning("vnpu: %s", exc)
                    ids = None
                if ids is not None:
                    self._chips[ids.logic_id] = ids
        if logic not in self._chips:
            raise VnpuError(f"npu-smi phyid-remap names no chip of logic id {logic} "
                            f"among {self.dev_dir}/davinci*")
        return self._chips[logic]

    def _physical_ids(self) -> list[int]:
        try:
            names = os.listdir(self.dev_dir)
        except OSError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _DAVINCI.fullmatch(n)))

    def _listed(self, npu_id: int, chip_id: int) -> list[vnpu.Listed] | None:
        assert self.smi is not None
        rc, out = self._call(vnpu.list_argv(self.smi, npu_id, chip_id))
        return vnpu.parse_list(out) if rc == 0 else None

    # --- blocking: create, destroy, reconcile ---------------------------------------

    def create(self, job: str, lease: str, device: Device, template: str) -> int:
        """Make a vNPU of ``template`` on ``device`` for one run; its id. VnpuError."""
        with self._lock:
            chip = self._chip(device)
            assert self.smi is not None
            listed = self._listed(chip.npu_id, chip.chip_id)
            if listed is None:
                raise VnpuError(f"npu-smi cannot list the vNPUs of NPU {chip.npu_id} chip "
                                f"{chip.chip_id}")
            vid = vnpu.free_id(chip.phy_id, [v.vnpu_id for v in listed] + list(self.records))
            if vid is None:
                raise VnpuError(f"{device.id} has no free vNPU id (16 per chip)")
            rec = Record(vid, job, lease, device.id, chip.npu_id, chip.chip_id, chip.phy_id,
                         template)
            self.records[vid] = rec
            self._save()
            rc, out = self._call(vnpu.create_argv(self.smi, chip.npu_id, chip.chip_id,
                                                  template, vid))
            if rc != 0 or not vnpu.succeeded(out):
                del self.records[vid]
                self._save()
                raise VnpuError(f"npu-smi create-vnpu {template} on {device.id} failed: "
                                f"{_last_line(out)}")
            self.records[vid] = _with_state(rec, CREATED)
            self._save()
            log.info("vnpu: created %d (%s) on %s for job %s", vid, template, device.id, job)
            return vid

    def destroy(self, vid: int) -> bool:
        """Destroy one of ours; True once it is gone (destroyed, or no longer listed)."""
        with self._lock:
            rec = self.records.get(vid)
            if rec is None:
                return True
            if self.smi is None:
                log.warning("vnpu: cannot destroy %d: npu-smi was not found", vid)
                return False
            rc, out = self._call(vnpu.destroy_argv(self.smi, rec.npu_id, rec.chip_id, vid))
            gone = rc == 0 and vnpu.succeeded(out)
            if not gone:
                listed = self._listed(rec.npu_id, rec.chip_id)
                gone = listed is not None and vid not in {v.vnpu_id for v in listed}
            if not gone:
                log.warning("vnpu: destroying %d (job %s) failed: %s", vid, rec.job,
                            _last_line(out))
                return False
            del self.records[vid]
            self._save()
            log.info("vnpu: destroyed %d (job %s)", vid, rec.job)
            return True

    def of_run(self, job: str, lease: str | None = None) -> list[int]:
        return [v for v, r in self.records.items()
                if r.job == job and (lease is None or r.lease == lease)]

    def release(self, job: str, lease: str | None = None) -> list[int]:
        """Destroy the vNPUs of a run that ended; those that would not go."""
        return [v for v in self.of_run(job, lease) if not self.destroy(v)]

    def reconcile(self, keep: Iterable[tuple[str, str]]) -> list[int]:
        """At start: destroy those an earlier instance made whose run (job, lease) is not
        in ``keep``; those that were destroyed (or had gone already). The vNPUs of runs
        started since are not looked at: their run may not be in ``keep`` yet."""
        wanted = set(keep)
        stale = [v for v, r in list(self.records.items())
                 if v in self._earlier and (r.job, r.lease) not in wanted]
        return [v for v in stale if self.destroy(v)]

    # --- async, for the runtime -----------------------------------------------------

    async def acquire(self, job: str, lease: str, devices: Sequence[Device],
                      compute_milli: int, memory_mib: int) -> dict[str, int]:
        """A vNPU for each device of a run in a container that needs one (an NPU
        fraction); device id -> vNPU id. VnpuError, with any made destroyed again."""
        made: dict[str, int] = {}
        try:
            for d in devices:
                if not vnpu.wants_vnpu(d, compute_milli):
                    continue
                fit = vnpu.choose(d.model, compute_milli, memory_mib, d.memory_mib)
                if fit is None:
                    raise VnpuError(f"no vNPU template of {d.model} holds {compute_milli} "
                                    f"milli and {memory_mib} MiB")
                made[d.id] = await asyncio.to_thread(self.create, job, lease, d, fit.template)
        except BaseException:
            await asyncio.to_thread(self.release, job, lease)
            raise
        return made

    async def release_async(self, job: str, lease: str | None = None) -> None:
        if self.of_run(job, lease):
            await asyncio.to_thread(self.release, job, lease)

    async def reconcile_async(self, keep: Mapping[str, str]) -> None:
        if self.records:
            gone = await asyncio.to_thread(self.reconcile, keep.items())
            if gone:
                log.info("vnpu: destroyed %s, whose runs are not here any more",
                         ", ".join(map(str, gone)))


def _with_state(rec: Record, state: str) -> Record:
    return Record(**{**asdict(rec), "state": state})


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"
