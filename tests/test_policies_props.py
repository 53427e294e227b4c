"""Property tests: no policy ever places beyond a device's (or node's) capacity or outside
a constraint, and none says "no fit" when a brute-force search finds room."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexmesh.policies import (
    POLICIES,
    SPECS,
    Cluster,
    DeviceSpec,
    MultiPlacement,
    NoFit,
    NodeSpec,
    Placement,
    Request,
    get_spec,
    place_gang,
)
from flexmesh.policies.engine import Placer

KINDS = ("gpu", "npu")
MODELS = ("A", "B", "C")


@dataclass
class Dev:
    id: str
    kind: str
    model: str
    cap_c: int
    cap_m: int
    free_c: int
    free_m: int


@dataclass
class Book:
    """An independent copy of a node's books, kept by the test."""

    name: str
    devs: dict[str, Dev]
    cpu: int | None
    mem: int | None
    healthy: bool
    battery: int | None
    floor: int

    def spec(self) -> NodeSpec:
        return NodeSpec(
            self.name,
            tuple(
                DeviceSpec(d.id, d.kind, d.model, d.cap_c, d.cap_m, d.free_c, d.free_m)
                for d in self.devs.values()
            ),
            cpu_milli=None if self.cpu is None else 64_000,
            memory_mib=None if self.mem is None else 256_000,
            cpu_free_milli=self.cpu,
            memory_free_mib=self.mem,
            healthy=self.healthy,
            battery_pct=self.battery,
            battery_floor_pct=self.floor,
        )


@st.composite
def books(draw: st.DrawFn) -> list[Book]:
    out = []
    for n in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(KINDS))
        model = draw(st.sampled_from(MODELS))
        cap_m = draw(st.sampled_from((0, 8000, 16000)))
        devs = {}
        for i in range(draw(st.integers(1, 4))):
            free_c = draw(st.integers(0, 20)) * 50
            free_m = draw(st.integers(0, cap_m)) if cap_m else 0
            devs[f"d{i}"] = Dev(f"d{i}", kind, model, 1000, cap_m, free_c, free_m)
        out.append(
            Book(
                f"n{n}",
                devs,
                cpu=draw(st.one_of(st.none(), st.integers(0, 8).map(lambda x: x * 1000))),
                mem=draw(st.one_of(st.none(), st.integers(0, 8).map(lambda x: x * 4096))),
                healthy=draw(st.booleans()),
                battery=draw(st.one_of(st.none(), st.integers(0, 100))),
                floor=draw(st.integers(0, 50)),
            )
        )
    return out


@st.composite
def requests(draw: st.DrawFn) -> Request:
    count = draw(st.sampled_from((0, 1, 1, 1, 2, 3)))
    compute = 0 if count == 0 else draw(st.sampled_from((50, 100, 250, 300, 500, 750, 1000)))
    return Request(
        compute_milli=compute,
        memory_mib=0 if count == 0 else draw(st.sampled_from((0, 0, 1000, 6000, 12000))),
        kind=draw(st.sampled_from(("any", "any", "gpu", "npu"))),
        origin=draw(st.sampled_from(("", "n0", "n1", "elsewhere"))),
        models=draw(st.sampled_from(((), (), ("A",), ("A", "B")))),
        count=count,
        cpu_milli=draw(st.sampled_from((0, 0, 1000, 3000))),
        host_memory_mib=draw(st.sampled_from((0, 0, 4096, 10000))),
        priority=draw(st.integers(0, 3)),
    )


def dev_ok(req: Request, d: Dev) -> bool:
    if req.kind != "any" and d.kind != req.kind:
        return False
    if req.models and d.model not in req.models:
        return False
    if req.compute_milli >= d.cap_c:
        return d.free_c >= d.cap_c and d.free_m >= d.cap_m and d.free_m >= req.memory_mib
    return d.free_c >= req.compute_milli and d.free_m >= req.memory_mib


def node_ok(req: Request, b: Book) -> bool:
    if not b.healthy:
        return False
    if b.battery is not None and b.battery < b.floor and b.name != req.origin:
        return False
    if b.cpu is not None and b.cpu < req.cpu_milli:
        return False
    if b.mem is not None and b.mem < req.host_memory_mib:
        return False
    if req.count > 0 and req.kind != "any" and all(d.kind != req.kind for d in b.devs.values()):
        return False
    return not (
        req.count > 0 and req.models and all(d.model not in req.models for d in b.devs.values())
    )


def feasible(req: Request, bs: list[Book]) -> bool:
    return any(
        node_ok(req, b) and sum(dev_ok(req, d) for d in b.devs.values()) >= req.count for b in bs
    )


def check(req: Request, res: Placement | MultiPlacement, bs: list[Book]) -> None:
    """The placement is inside every constraint and every capacity of the books."""
    b = {x.name: x for x in bs}[res.node]
    assert node_ok(req, b), (req, res)
    devs = res.devices
    assert len(devs) == req.count
    assert len(set(devs)) == len(devs)
    for dev in devs:
        assert dev in b.devs
        assert dev_ok(req, b.devs[dev]), (req, res, b.devs[dev])


def take(req: Request, res: Placement | MultiPlacement, bs: list[Book]) -> None:
    b = {x.name: x for x in bs}[res.node]
    for dev in res.devices:
        d = b.devs[dev]
        d.free_c -= min(req.compute_milli, d.cap_c)
        d.free_m -= req.memory_mib
        assert d.free_c >= 0 and d.free_m >= 0
    if b.cpu is not None:
        b.cpu -= req.cpu_milli
        assert b.cpu >= 0
    if b.mem is not None:
        b.mem -= req.host_memory_mib
        assert b.mem >= 0


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(bs=books(), reqs=st.lists(requests(), min_size=1, max_size=12))
def test_stateless_policies_stay_inside_constraints(bs: list[Book], reqs: list[Request]) -> None:
    cands = Cluster([b.spec() for b in bs]).candidates()
    for req in reqs:
        ok = feasible(req, bs)
        for name, pol in POLICIES.items():
            res = pol(req, cands)
            if isinstance(res, NoFit):
                assert not ok, (name, req, "said no fit where a node had room")
            else:
                assert ok
                check(req, res, bs)


@SETTINGS
@given(
    bs=books(),
    reqs=st.lists(requests(), min_size=1, max_size=25),
    scan_below=st.sampled_from((0, 10**9)),  # the heaps, or a look at every class
)
def test_placer_sequences_never_overcommit(
    bs: list[Book], reqs: list[Request], scan_below: int
) -> None:
    for name in SPECS:
        mine = [
            Book(
                b.name,
                {k: Dev(**vars(d)) for k, d in b.devs.items()},
                b.cpu,
                b.mem,
                b.healthy,
                b.battery,
                b.floor,
            )
            for b in bs
        ]
        cluster = Cluster([b.spec() for b in mine])
        placer = Placer(cluster, get_spec(name))
        placer.scan_below = scan_below
        for req in reqs:
            ok = feasible(req, mine)
            res = placer.place(req)  # Cluster.allocate itself refuses any over-commit
            if isinstance(res, NoFit):
                assert not ok, (name, req)
                continue
            check(req, res, mine)
            take(req, res, mine)


@SETTINGS
@given(bs=books(), gang=st.lists(requests(), min_size=1, max_size=4), distinct=st.booleans())
def test_gangs_are_all_or_nothing(bs: list[Book], gang: list[Request], distinct: bool) -> None:
    cluster = Cluster([b.spec() for b in bs])
    before = {(c.node, c.device): c for c in cluster.candidates()}
    placer = Placer(cluster, get_spec("fgd-plus"))
    res = place_gang(placer, gang, distinct_nodes=distinct)
    after = {(c.node, c.device): c for c in cluster.candidates()}
    if isinstance(res, NoFit):
        assert after == before
        return
    assert len(res.parts) == len(gang)
    if distinct:
        assert len({p.node for p in res.parts}) == len(gang)
    # members go biggest first; each must fit the books left by those placed before it
    order = sorted(
        range(len(gang)), key=lambda i: (-gang[i].total_compute_milli, -gang[i].cpu_milli, i)
    )
    for i in order:
        check(gang[i], res.parts[i], bs)
        take(gang[i], res.parts[i], bs)
