"""Unit tests for flexmesh.policies: filters, scores, the class index, every policy,
gangs, preemption, locality and energy."""

from __future__ import annotations

import dataclasses
import random

import pytest

from flexmesh.policies import (
    DEFAULT_POLICY,
    POLICIES,
    SPECS,
    Candidate,
    Cluster,
    DeviceSpec,
    GangPlacement,
    MultiPlacement,
    NoFit,
    NodeClass,
    NodeSpec,
    Placement,
    Placer,
    Preemption,
    Request,
    RunningJob,
    Workload,
    WorkloadWindow,
    best_fit,
    choose_victims,
    get_policy,
    get_spec,
    make_placer,
    place_gang,
)
from flexmesh.policies import filters as F
from flexmesh.policies import fragplan as FP
from flexmesh.policies import scores as S
from flexmesh.policies.nodes import UNKNOWN
from flexmesh.policies.spec import parse_spec
from flexmesh.policies.workload import PRIOR, Shape, shape_key

# -- helpers ----------------------------------------------------------------------------------


def node(
    name: str,
    free: list[int] | None = None,
    *,
    n: int = 8,
    model: str = "A100",
    kind: str = "gpu",
    mem: int = 40960,
    free_mem: list[int] | None = None,
    cpu: int | None = None,
    cpu_free: int | None = None,
    ram: int | None = None,
    ram_free: int | None = None,
    healthy: bool = True,
    battery: int | None = None,
    floor: int = 0,
) -> NodeSpec:
    free = free if free is not None else [1000] * n
    free_mem = free_mem if free_mem is not None else [mem] * len(free)
    devs = tuple(
        DeviceSpec(f"{kind}{i}", kind, model, 1000, mem, f, fm)
        for i, (f, fm) in enumerate(zip(free, free_mem, strict=True))
    )
    return NodeSpec(
        name,
        devs,
        cpu_milli=cpu,
        memory_mib=ram,
        cpu_free_milli=cpu_free,
        memory_free_mib=ram_free,
        healthy=healthy,
        battery_pct=battery,
        battery_floor_pct=floor,
    )


def cls_of(cluster: Cluster, name: str) -> NodeClass:
    c = cluster.nodes[name].cls
    assert c is not None
    return c


def one_class(spec: NodeSpec) -> NodeClass:
    return cls_of(Cluster([spec]), spec.name)


CTX = S.ScoreContext(PRIOR)

# -- types ------------------------------------------------------------------------------------


def test_request_defaults_and_whole() -> None:
    r = Request(500, 1024)
    assert r.count == 1 and r.cpu_milli == 0 and not r.whole and r.total_compute_milli == 500
    assert Request(1000, 0, count=4).whole
    assert Request(1000, 0, count=4).total_compute_milli == 4000


def test_multi_placement_device_alias() -> None:
    m = MultiPlacement("n", ("g0", "g1"))
    assert m.device == "g0"
    assert MultiPlacement("n", ()).device == ""
    assert Placement("n", "g3").devices == ("g3",)


# -- the index --------------------------------------------------------------------------------


def test_identical_nodes_share_one_class() -> None:
    c = Cluster([node(f"n{i}") for i in range(50)])
    assert len(c.classes) == 1
    assert len(next(iter(c.classes.values())).members) == 50


def test_allocate_moves_node_to_new_class_and_release_returns_it() -> None:
    c = Cluster([node("a"), node("b")])
    before = cls_of(c, "a")
    c.allocate("a", ["gpu3"], 250, 1000)
    assert cls_of(c, "a") is not before
    assert cls_of(c, "b") is before
    assert cls_of(c, "a").free == (1000,) * 7 + (750,)
    c.release("a", ["gpu3"], 250, 1000)
    assert cls_of(c, "a") is cls_of(c, "b")
    assert len(c.classes) == 1


def test_device_order_is_by_free_and_ids_resolve() -> None:
    c = Cluster([node("a", [1000, 200, 600], n=3)])
    cls = cls_of(c, "a")
    assert cls.free == (1000, 600, 200)
    assert c.device_ids("a", (1, 2)) == ("gpu2", "gpu1")


def test_allocate_refuses_overcommit() -> None:
    c = Cluster([node("a", [300], n=1, cpu=1000, ram=1000)])
    with pytest.raises(ValueError):
        c.allocate("a", ["gpu0"], 400, 0)
    with pytest.raises(ValueError):
        c.allocate("a", ["gpu0"], 100, 0, cpu_milli=2000)
    with pytest.raises(ValueError):
        c.allocate("a", ["gpu0"], 100, 0, host_memory_mib=2000)
    with pytest.raises(ValueError):
        c.allocate("a", ["gpu0", "gpu0"], 100, 0)
    c.allocate("a", ["gpu0"], 300, 0, 1000, 1000)
    assert cls_of(c, "a").free == (0,)


def test_release_is_capped_at_capacity() -> None:
    c = Cluster([node("a", n=1)])
    c.release("a", ["gpu0"], 500, 100, 10, 10)
    assert cls_of(c, "a").free == (1000,)
    c.release("nope", ["gpu0"], 1, 1)  # unknown node: ignored


def test_upsert_remove_health_battery_set_free() -> None:
    c = Cluster([node("a"), node("b")])
    v = c.nodes_version
    c.upsert(node("a", [0] * 8))
    assert c.nodes_version == v + 1
    assert cls_of(c, "a").total_free == 0
    c.set_health("b", False)
    assert not cls_of(c, "b").healthy
    c.set_battery("b", 10, 20)
    assert not cls_of(c, "b").battery_ok
    c.set_free("a", "gpu0", 600, 100)
    assert cls_of(c, "a").free[0] == 600
    c.remove("a")
    assert "a" not in c.nodes
    assert all("a" not in k.members for k in c.iter_classes())


def test_from_candidates_and_back() -> None:
    cands = [
        Candidate("a", "g0", "gpu", "T4", 1000, 16000, 400, 8000, node_cpu_free_milli=2000),
        Candidate("a", "g1", "gpu", "T4", 1000, 16000, 1000, 16000, node_cpu_free_milli=2000),
        Candidate("b", "n0", "npu", "910B", 1000, 32000, 1000, 32000, battery_pct=50),
    ]
    c = Cluster.from_candidates(cands)
    assert set(c.nodes) == {"a", "b"}
    assert cls_of(c, "a").cpu_free == 2000
    assert cls_of(c, "b").cpu_free == UNKNOWN
    back = {(x.node, x.device): x for x in c.candidates()}
    assert back[("a", "g0")].free_compute_milli == 400
    assert back[("b", "n0")].battery_pct == 50
    assert c.gpu_capacity_milli == 3000 and c.gpu_free_milli == 2400


def test_refresh_sets_books_in_place_less_what_is_held() -> None:
    c = Cluster([node("a", n=2, mem=16000)])
    cands = [Candidate("a", "gpu0", "gpu", "A100", 1000, 16000, 700, 9000,
                       node_cpu_milli=8000, node_cpu_free_milli=6000, battery_pct=80),
             Candidate("a", "gpu1", "gpu", "A100", 1000, 16000, 1200, 16000)]
    v = c.nodes_version
    assert c.refresh("a", cands, {"gpu0": (200, 1000)})
    rec = c.nodes["a"]
    assert [(d.free_c, d.free_m) for d in rec.devs] == [(500, 8000), (1000, 16000)]
    assert (rec.cpu_cap, rec.cpu_free, rec.battery_pct) == (8000, 6000, 80)
    assert c.nodes_version == v + 1
    kept = cls_of(c, "a")
    kept.cache["probe"] = 1.0
    assert c.refresh("a", cands, {"gpu0": (200, 1000)})  # unchanged: nothing moves
    assert c.nodes_version == v + 1 and cls_of(c, "a") is kept
    assert kept.cache == {"probe": 1.0}  # and its cached scores stay
    # a capacity reported without a free figure (all of it free) is no change either
    cpu_only = [dataclasses.replace(x, node_cpu_free_milli=None) for x in cands]
    assert c.refresh("a", cpu_only, {"gpu0": (200, 1000)})
    assert c.nodes["a"].cpu_free == 8000 and c.nodes_version == v + 2
    assert c.refresh("a", cpu_only, {"gpu0": (200, 1000)})
    assert c.nodes_version == v + 2
    # devices the node does not have as listed: refused, nothing changed
    assert not c.refresh("a", cands[::-1])
    assert not c.refresh("a", [cands[0]])
    assert not c.refresh("b", cands)
    assert [(d.free_c, d.free_m) for d in rec.devs] == [(500, 8000), (1000, 16000)]


def test_duplicate_device_ids_rejected() -> None:
    with pytest.raises(ValueError):
        Cluster([NodeSpec("a", (DeviceSpec("g"), DeviceSpec("g")))])


# -- filters ----------------------------------------------------------------------------------


def test_node_filters_each() -> None:
    r = Request(500, 0, kind="gpu", models=("T4",), cpu_milli=1000, host_memory_mib=1000)
    good = one_class(node("a", model="T4", cpu=4000, ram=4000))
    assert F.node_passes(r, good)
    assert not F.node_healthy(r, one_class(node("a", model="T4", healthy=False)))
    assert not F.node_battery(r, one_class(node("a", model="T4", battery=10, floor=20)))
    assert F.node_battery(r, one_class(node("a", model="T4", battery=30, floor=20)))
    assert F.node_battery(r, one_class(node("a", model="T4")))  # mains power
    assert not F.node_kind(r, one_class(node("a", model="T4", kind="npu")))
    assert F.node_kind(Request(1, 0), one_class(node("a", kind="npu")))
    assert not F.node_model(r, one_class(node("a", model="V100")))
    assert not F.node_cpu(r, one_class(node("a", model="T4", cpu=4000, cpu_free=500)))
    assert F.node_cpu(r, one_class(node("a", model="T4")))  # unknown: not checked
    assert not F.node_memory(r, one_class(node("a", model="T4", ram=4000, ram_free=10)))
    assert F.node_memory(r, one_class(node("a", model="T4")))
    assert not F.node_capacity(r, one_class(node("a", [100, 100], n=2, model="T4")))
    assert not F.node_capacity(Request(1000, 0, count=4), one_class(node("a", n=2)))
    assert F.node_reject_reason(r, one_class(node("a", model="V100"))) == "model"
    assert F.node_reject_reason(r, good) == ""


def test_device_filters_each() -> None:
    d = (600, 8000, 1000, 16000, "gpu", "T4")
    assert F.dev_kind(Request(1, 0, kind="gpu"), d)
    assert not F.dev_kind(Request(1, 0, kind="npu"), d)
    assert F.dev_model(Request(1, 0, models=("T4", "A10")), d)
    assert not F.dev_model(Request(1, 0, models=("A10",)), d)
    assert F.dev_compute(Request(600, 0), d)
    assert not F.dev_compute(Request(601, 0), d)
    assert not F.dev_compute(Request(1000, 0), d)  # whole needs an unused device
    assert F.dev_compute(Request(1000, 0), (1000, 16000, 1000, 16000, "gpu", "T4"))
    assert F.dev_memory(Request(1, 8000), d)
    assert not F.dev_memory(Request(1, 8001), d)
    assert not F.dev_memory(Request(1000, 0), (1000, 100, 1000, 16000, "gpu", "T4"))


def test_battery_exemption_for_own_node() -> None:
    cls = one_class(node("a", battery=5, floor=20))
    assert not F.node_passes(Request(100, 0), cls)
    assert F.node_passes(Request(100, 0), cls, exempt_battery=True)


def test_choices_distinct_whole_and_multi() -> None:
    cls = one_class(node("a", [1000, 1000, 500, 500, 200, 0], n=6))
    assert F.choices(Request(300, 0), cls) == [(0,), (2,)]  # one per distinct state
    assert F.choices(Request(1000, 0), cls) == [(0,)]
    assert F.choices(Request(1000, 0, count=2), cls) == [(0, 1)]
    assert F.choices(Request(1000, 0, count=3), cls) == []
    assert F.choices(Request(400, 0, count=2), cls) == [(2, 3)]  # the tightest that fit
    assert F.choices(Request(0, 0, count=0), cls) == [()]


# -- scores -----------------------------------------------------------------------------------


def test_frag_amount_matches_the_papers_definition() -> None:
    wl = Workload(
        (
            Shape(0, 500, 1, (), 0.5),  # half a GPU
            Shape(0, 1000, 2, (), 0.25),  # two whole GPUs
            Shape(1000, 0, 0, (), 0.25),  # CPU only: all idle GPU is fragment
        )
    )
    plan = FP.FragPlan(wl, ("A",))
    # free 1000, 300: shape 1 fits, fragment = 300 (the GPU below 500); shape 2 does not
    # fit (one whole GPU): all 1300; CPU-only: all 1300
    assert FP.frag_amount((1000, 300), UNKNOWN, plan) == pytest.approx(
        0.5 * 300 + 0.25 * 1300 + 0.25 * 1300
    )
    assert FP.frag_amount((0, 0), UNKNOWN, plan) == 0.0
    # no CPU left for any GPU shape that asks for some
    wl2 = Workload((Shape(500, 500, 1, (), 1.0),))
    assert FP.frag_amount((1000,), 100, FP.FragPlan(wl2, ("A",))) == 1000
    # a shape bound to another model cannot use this node at all
    wl3 = Workload((Shape(0, 500, 1, ("B",), 1.0),))
    assert FP.frag_amount((1000,), UNKNOWN, FP.FragPlan(wl3, ("A",))) == 1000


def test_fgd_prefers_the_gpu_that_leaves_a_usable_remainder() -> None:
    wl = Workload((Shape(0, 500, 1, (), 1.0),))
    ctx = S.ScoreContext(wl)
    cls = one_class(node("a", [1000, 700], n=2))
    req = Request(200, 0)
    on_full = S.fgd(req, cls, (0,), ctx)  # 1000 -> 800: still fits 500
    on_700 = S.fgd(req, cls, (1,), ctx)  # 700 -> 500: still fits 500
    assert on_full == pytest.approx(0.0) and on_700 == pytest.approx(0.0)
    req = Request(300, 0)
    assert S.fgd(req, cls, (1,), ctx) > 0  # 700 -> 400 is a fragment for 500
    assert S.fgd(req, cls, (0,), ctx) == pytest.approx(0.0)


def test_cap_frag_counts_cpu_limited_copies() -> None:
    wl = Workload((Shape(4000, 1000, 1, (), 1.0),))
    plan = FP.CapPlan(wl, ("A",))
    # 4 free GPUs but CPU for only 2 copies: half the idle compute is out of reach
    assert FP.cap_frag_amount((1000,) * 4, 8000, UNKNOWN, plan) == pytest.approx(2000)
    assert FP.cap_frag_amount((1000,) * 4, 16000, UNKNOWN, plan) == pytest.approx(0)


def test_strand_penalises_eating_cpu_a_gpu_needs() -> None:
    wl = Workload((Shape(10_000, 1000, 1, (), 1.0),))  # 10 cores per GPU
    ctx = S.ScoreContext(wl)
    tight = one_class(node("t", n=2, cpu=20_000))
    rich = one_class(node("r", n=2, cpu=200_000))
    cpu_job = Request(0, 0, count=0, cpu_milli=10_000)
    assert S.strand(cpu_job, tight, (), ctx) == pytest.approx(1.0)
    assert S.strand(cpu_job, rich, (), ctx) == pytest.approx(0.0)
    assert S.strand(cpu_job, one_class(node("u", n=2)), (), ctx) == 0.0  # CPU unknown


def test_scarcity_prices_models_bound_requests_depend_on() -> None:
    wl = Workload((Shape(0, 1000, 1, ("T4",), 0.5), Shape(0, 1000, 1, (), 0.5)))
    ctx = S.ScoreContext(wl, {"T4": 1000, "A100": 9000})
    assert ctx.price("T4") == pytest.approx(0.5 / 0.1)
    assert ctx.price("A100") == 0.0
    t4 = one_class(node("t", n=1, model="T4"))
    a100 = one_class(node("a", n=1))
    assert S.scarcity(Request(500, 0), t4, (0,), ctx) > S.scarcity(Request(500, 0), a100, (0,), ctx)


def test_best_fit_spread_packing_orderings() -> None:
    full = one_class(node("f", [1000] * 4, n=4))
    used = one_class(node("u", [1000, 1000, 1000, 400], n=4))
    req = Request(300, 0)
    assert S.best_fit(req, used, (3,), CTX) < S.best_fit(req, full, (0,), CTX)
    assert S.spread(req, full, (0,), CTX) < S.spread(req, used, (3,), CTX)
    # packing: a shared device, then a fresh device of a used node, then a fresh node
    assert S.packing(req, used, (3,), CTX) < S.packing(req, used, (0,), CTX)
    assert S.packing(req, used, (0,), CTX) < S.packing(req, full, (0,), CTX)
    assert S.device_leftover(req, used, (3,), CTX) == pytest.approx(0.1 + 1.0)
    assert S.node_leftover(req, used, (3,), CTX) == pytest.approx(3100 / 4000)
    assert S.idle_after(req, used, (3,), CTX) == pytest.approx(3.1)


# -- policies ---------------------------------------------------------------------------------


def test_registry_and_default() -> None:
    assert DEFAULT_POLICY in POLICIES and DEFAULT_POLICY in SPECS
    for name in ("best-fit", "spread", "packing", "fgd", "fgd-plus"):
        assert name in POLICIES
    with pytest.raises(ValueError, match="unknown placement policy"):
        get_policy("nope")
    with pytest.raises(ValueError, match="unknown score"):
        get_policy("fgd+nope:1")
    with pytest.raises(ValueError, match="bad weight"):
        get_spec("fgd:x")
    spec = get_spec("fgd", {"packing": 0.5, "locality": 0.3})
    assert dict(spec.terms) == {"fgd": 1.0, "packing": 0.5} and spec.locality == 0.3
    assert dict(parse_spec("fgd+packing:0.05", SPECS).terms) == {"fgd": 1.0, "packing": 0.05}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_places_and_respects_constraints(name: str) -> None:
    pol = get_policy(name)
    cands = [
        Candidate("a", "g0", "gpu", "T4", 1000, 16000, 300, 4000),
        Candidate("a", "g1", "gpu", "T4", 1000, 16000, 1000, 16000),
        Candidate("b", "g0", "gpu", "A100", 1000, 40000, 1000, 40000),
        Candidate("c", "n0", "npu", "910B", 1000, 32000, 1000, 32000),
    ]
    r = pol(Request(200, 1000, kind="gpu"), cands)
    assert isinstance(r, Placement) and r.node in ("a", "b")
    r = pol(Request(500, 0, kind="npu"), cands)
    assert r == Placement("c", "n0")
    r = pol(Request(100, 0, models=("A100",)), cands)
    assert isinstance(r, Placement) and r.node == "b"
    assert isinstance(pol(Request(1000, 0, kind="gpu", count=2), cands), NoFit)
    r = pol(Request(1000, 0, kind="gpu", count=1, models=("T4",)), cands)
    assert r == Placement("a", "g1")  # the only unused T4
    assert isinstance(pol(Request(1000, 50000), cands), NoFit)
    nofit = pol(Request(100, 0, kind="tpu"), cands)
    assert isinstance(nofit, NoFit) and "no node can take" in nofit.reason
    assert isinstance(pol(Request(100, 0), []), NoFit)


def test_policies_differ_where_they_should() -> None:
    cands = [
        Candidate("a", "g0", "gpu", "A", 1000, 0, 400, 0),
        Candidate("a", "g1", "gpu", "A", 1000, 0, 1000, 0),
        Candidate("b", "g0", "gpu", "A", 1000, 0, 1000, 0),
        Candidate("b", "g1", "gpu", "A", 1000, 0, 1000, 0),
    ]
    req = Request(300, 0)
    assert POLICIES["best-fit"](req, cands) == Placement("a", "g0")
    assert POLICIES["packing"](req, cands) == Placement("a", "g0")
    assert POLICIES["spread"](req, cands).node == "b"  # type: ignore[union-attr]


def test_multi_device_request_gets_multi_placement() -> None:
    c = Cluster([node("a", [1000, 1000, 300, 1000], n=4), node("b", [0] * 4, n=4)])
    res = make_placer(c, "best-fit").place(Request(1000, 0, count=3))
    assert isinstance(res, MultiPlacement) and res.node == "a"
    assert sorted(res.devices) == ["gpu0", "gpu1", "gpu3"]
    assert cls_of(c, "a").free == (300, 0, 0, 0)


def test_cpu_only_request_places_on_a_node() -> None:
    c = Cluster([node("a", n=1, cpu=1000), node("b", n=1, cpu=8000)])
    res = make_placer(c, "fgd-plus").place(Request(0, 0, count=0, cpu_milli=4000))
    assert isinstance(res, MultiPlacement) and res.node == "b" and res.devices == ()


def test_fgd_plus_keeps_cpu_for_gpus() -> None:
    # a CPU-only job goes to the CPU-rich node, not the one whose GPUs need the CPU
    wl = Workload((Shape(8000, 1000, 1, (), 1.0),))
    c = Cluster([node("tight", n=8, cpu=64_000), node("rich", n=2, cpu=128_000)])
    p = Placer(c, get_spec("fgd-plus"), workload=wl)
    assert p.decide(Request(0, 0, count=0, cpu_milli=16_000)).node == "rich"  # type: ignore[union-attr]


def test_placer_cache_follows_state() -> None:
    c = Cluster([node("a", n=1), node("b", [500], n=1)])
    p = make_placer(c, "best-fit")
    assert p.place(Request(500, 0)) == Placement("b", "gpu0")
    assert p.place(Request(500, 0)) == Placement("a", "gpu0")
    assert p.place(Request(500, 0)) == Placement("a", "gpu0")
    assert isinstance(p.place(Request(500, 0)), NoFit)
    p.release(Request(500, 0), Placement("b", "gpu0"))
    assert p.place(Request(500, 0)) == Placement("b", "gpu0")


def test_random_tie_break_is_seeded() -> None:
    def run(seed: int) -> list[str]:
        c = Cluster([node(f"n{i}", n=1) for i in range(20)])
        p = Placer(c, get_spec("spread"), rng=random.Random(seed))
        out = []
        for _ in range(5):
            r = p.place(Request(1000, 0))
            assert isinstance(r, Placement)
            out.append(r.node)
        return out

    assert run(1) == run(1)
    assert run(1) != run(2) or run(3) != run(4)


def test_explain_counts_rejections() -> None:
    c = Cluster([node("a", n=1, healthy=False), node("b", n=1, model="T4")])
    why = make_placer(c).decide(Request(100, 0, models=("A100",)), explain=True)
    assert isinstance(why, NoFit)
    assert "unhealthy: 1" in why.reason and "no device of an allowed model: 1" in why.reason
    assert "no nodes" in make_placer(Cluster()).explain(Request(1, 0))


def test_negative_request_is_refused() -> None:
    assert isinstance(make_placer(Cluster([node("a")])).decide(Request(-1, 0)), NoFit)


# -- locality and energy ----------------------------------------------------------------------


def test_origin_is_preferred_among_equals() -> None:
    c = Cluster([node(f"n{i}", n=2) for i in range(5)])
    for pol in SPECS:
        r = Placer(c, get_spec(pol)).decide(Request(500, 0, origin="n3"))
        assert isinstance(r, Placement) and r.node == "n3", pol


def test_low_rtt_lender_preferred() -> None:
    c = Cluster([node(f"n{i}", n=2) for i in range(4)])
    p = make_placer(c, "best-fit")
    r = p.decide(Request(500, 0, origin="elsewhere"), {"n0": 200.0, "n2": 5.0, "n3": 80.0})
    assert isinstance(r, Placement) and r.node == "n2"
    # through the stateless contract, from the candidates' rtt_ms
    cands = [
        Candidate(f"n{i}", "g0", "gpu", "A", 1000, 0, 1000, 0, rtt_ms=ms)
        for i, ms in enumerate([90.0, 3.0, None])
    ]
    assert get_policy("fgd-plus")(Request(500, 0), cands) == Placement("n1", "g0")


def test_locality_does_not_override_capacity() -> None:
    c = Cluster([node("home", [100], n=1), node("far", n=1)])
    r = make_placer(c, "best-fit").decide(Request(500, 0, origin="home"))
    assert r == Placement("far", "gpu0")


def test_battery_floor_lends_nothing_but_own_jobs_run() -> None:
    c = Cluster([node("drone", n=1, battery=15, floor=30), node("other", [0], n=1)])
    p = make_placer(c, "best-fit")
    assert isinstance(p.decide(Request(500, 0, origin="ground")), NoFit)
    assert p.decide(Request(500, 0, origin="drone")) == Placement("drone", "gpu0")
    c.set_battery("drone", 80)
    assert p.decide(Request(500, 0, origin="ground")) == Placement("drone", "gpu0")


def test_unhealthy_nodes_never_chosen_even_as_origin() -> None:
    c = Cluster([node("sick", n=1, healthy=False)])
    assert isinstance(make_placer(c).decide(Request(1, 0, origin="sick")), NoFit)


def test_best_fit_function_contract() -> None:
    cands = [
        Candidate("a", "g0", "gpu", "A", 1000, 1000, 600, 600),
        Candidate("b", "g0", "gpu", "A", 1000, 1000, 400, 400),
        Candidate("c", "g0", "gpu", "A", 1000, 1000, 400, 400, battery_pct=1, battery_floor_pct=5),
    ]
    assert best_fit(Request(300, 300), cands) == Placement("b", "g0")
    assert best_fit(Request(300, 300, origin="c"), cands) == Placement("c", "g0")
    assert isinstance(
        best_fit(
            Request(300, 300, cpu_milli=1),
            [Candidate("a", "g0", "gpu", "A", 1000, 1000, 600, 600, node_cpu_free_milli=0)],
        ),
        NoFit,
    )
    assert isinstance(best_fit(Request(1000, 0, count=2), cands), NoFit)


# -- workload ---------------------------------------------------------------------------------


def test_workload_keeps_the_shapes_covering_95_percent() -> None:
    reqs = [Request(500, 0)] * 90 + [Request(1000, 0)] * 6 + [Request(250, 0)] * 4
    wl = Workload.from_requests(reqs)
    assert [s.compute_milli for s in wl.shapes] == [500, 1000]
    assert sum(s.weight for s in wl.shapes) == pytest.approx(1.0)
    assert Workload.from_requests([]).shapes == ()
    assert shape_key(Request(0, 0, count=0, cpu_milli=5)) == (5, 0, 0, ())


def test_workload_window_slides_and_versions() -> None:
    w = WorkloadWindow(size=10, refresh=5)
    for _ in range(10):
        w.observe(Request(500, 0))
    v = w.workload.version
    for _ in range(15):  # the window turns over, and a refresh comes within 5 more
        w.observe(Request(1000, 0))
    assert w.workload.version > v
    assert [s.compute_milli for s in w.workload.shapes] == [1000]
    with pytest.raises(ValueError):
        WorkloadWindow(size=0)


def test_placer_learns_the_mix() -> None:
    c = Cluster([node("a")])
    p = make_placer(c, "fgd")
    assert p.ctx.workload is PRIOR
    p.place(Request(300, 0))
    assert p.ctx.workload is not PRIOR
    assert p.ctx.workload.shapes[0].compute_milli == 300


# -- gangs ------------------------------------------------------------------------------------


def test_gang_all_or_nothing() -> None:
    c = Cluster([node("a", n=2), node("b", n=2)])
    p = make_placer(c, "best-fit")
    gang = [Request(1000, 0, count=2), Request(1000, 0, count=2)]
    res = place_gang(p, gang)
    assert isinstance(res, GangPlacement) and {x.node for x in res.parts} == {"a", "b"}
    assert c.gpu_free_milli == 0
    c2 = Cluster([node("a", n=2), node("b", n=1)])
    p2 = make_placer(c2, "best-fit")
    res2 = place_gang(p2, gang)
    assert isinstance(res2, NoFit) and "nothing of the gang" in res2.reason
    assert c2.gpu_free_milli == 3000  # what the first member took was given back


def test_gang_distinct_nodes_and_dry_run() -> None:
    c = Cluster([node("a", n=4), node("b", n=4)])
    p = make_placer(c, "best-fit")
    gang = [Request(500, 0), Request(500, 0)]
    res = place_gang(p, gang, distinct_nodes=True, commit=False)
    assert isinstance(res, GangPlacement)
    assert len({x.node for x in res.parts}) == 2
    assert c.gpu_free_milli == 8000
    assert isinstance(place_gang(p, [Request(1, 0)] * 3, distinct_nodes=True), NoFit)
    assert isinstance(place_gang(p, []), NoFit)


# -- preemption -------------------------------------------------------------------------------


def _busy() -> tuple[Cluster, list[RunningJob]]:
    c = Cluster([node("a", [0, 0], n=2), node("b", [0, 0], n=2)])
    jobs = [
        RunningJob("a-cheap", "a", ("gpu0",), 1000, priority=0, preemptible=True, work_lost=5),
        RunningJob("a-dear", "a", ("gpu1",), 1000, priority=0, preemptible=True, work_lost=50),
        RunningJob("b-pinned", "b", ("gpu0",), 1000, priority=0, preemptible=False),
        RunningJob("b-cheap", "b", ("gpu1",), 1000, priority=0, preemptible=True, work_lost=1),
        RunningJob("b-high", "b", ("gpu1",), 1, priority=9, preemptible=True, work_lost=0),
    ]
    return c, jobs


def test_preempt_least_work_lost_never_pinned() -> None:
    c, jobs = _busy()
    spec = get_spec("best-fit")
    res = choose_victims(Request(1000, 0, priority=5), c, jobs, spec)
    assert isinstance(res, Preemption)
    assert res.victims == ("b-cheap",) and res.placement == Placement("b", "gpu1")
    # two whole devices: only node a can free two (b's other job is pinned)
    res2 = choose_victims(Request(1000, 0, count=2, priority=5), c, jobs, spec)
    assert isinstance(res2, Preemption)
    assert set(res2.victims) == {"a-cheap", "a-dear"} and res2.work_lost == 55
    assert c.gpu_free_milli == 0  # the cluster is untouched


def test_preempt_needs_higher_priority() -> None:
    c, jobs = _busy()
    assert isinstance(choose_victims(Request(1000, 0, priority=0), c, jobs, get_spec("fgd")), NoFit)


def test_preempt_not_needed_when_it_fits() -> None:
    c = Cluster([node("a", n=1)])
    res = choose_victims(Request(1000, 0, priority=1), c, [], get_spec(DEFAULT_POLICY))
    assert isinstance(res, Preemption) and res.victims == ()
    p = make_placer(c)
    res2 = choose_victims(Request(1000, 0, priority=1), c, [], p.spec, placer=p)
    assert res2 == res


def test_preempt_greedy_path_for_many_jobs() -> None:
    c = Cluster([node("a", [0] * 8, n=8)])
    jobs = [
        RunningJob(
            f"j{i}", "a", (f"gpu{i % 8}",), 125, priority=0, preemptible=True, work_lost=float(i)
        )
        for i in range(64)
    ]
    res = choose_victims(Request(250, 0, priority=3), c, jobs, get_spec("best-fit"))
    assert isinstance(res, Preemption)
    assert sorted(res.victims) == ["j0", "j8"]  # the two cheapest on one device


# -- the two ways of finding the best class agree ---------------------------------------------


@pytest.mark.parametrize("policy", sorted(SPECS))
def test_heap_and_scan_make_the_same_decisions(policy: str) -> None:
    rng = random.Random(7)
    specs = [
        node(
            f"n{i:02d}",
            n=rng.choice((2, 4, 8)),
            model=rng.choice(("A", "B")),
            cpu=rng.choice((16_000, 64_000)),
        )
        for i in range(60)
    ]
    wl = Workload((Shape(4000, 500, 1, (), 0.5), Shape(8000, 1000, 1, ("A",), 0.5)))
    a, b = Cluster(specs), Cluster(specs)
    pa, pb = Placer(a, get_spec(policy), workload=wl), Placer(b, get_spec(policy), workload=wl)
    pa.scan_below, pb.scan_below = 10**9, 0  # a looks at every class, b keeps heaps
    running: list[tuple[Request, Placement | MultiPlacement]] = []
    for _ in range(400):
        if running and rng.random() < 0.3:
            req, res = running.pop(rng.randrange(len(running)))
            pa.release(req, res)
            pb.release(req, res)
            continue
        req = Request(
            rng.choice((100, 250, 500, 1000)),
            0,
            count=rng.choice((1, 1, 1, 2)),
            cpu_milli=rng.choice((0, 2000, 8000)),
            models=rng.choice(((), ("A",))),
        )
        if req.count > 1:
            req = Request(1000, 0, count=req.count, cpu_milli=req.cpu_milli)
        ra, rb = pa.place(req), pb.place(req)
        assert ra == rb
        if not isinstance(ra, NoFit):
            running.append((req, ra))
    assert pb._shapes  # b did go through its heaps


@pytest.mark.parametrize("score", sorted(S.SCORES))
def test_every_score_is_a_finite_number(score: str) -> None:
    wl = Workload((Shape(2000, 500, 1, (), 0.6), Shape(4000, 1000, 2, ("A100",), 0.4)))
    ctx = S.ScoreContext(wl, {"A100": 8000})
    cls = one_class(node("a", [1000, 1000, 700, 200], n=4, cpu=32_000, ram=65_536))
    f = S.SCORES[score]
    for req, ch in ((Request(300, 0, cpu_milli=1000), (2,)), (Request(1000, 0, count=2), (0, 1))):
        v = f(req, cls, ch, ctx)
        assert isinstance(v, float) and v == v and abs(v) < 1e6
    assert get_spec(f"{score}:0.5").terms == ((score, 0.5),)


def test_workload_scores_make_the_placer_learn() -> None:
    for name in ("strand", "scarcity", "fgd", "cfgd"):
        assert get_spec(name).uses_workload
    assert not get_spec("best-fit").uses_workload
