"""Filters, then weighted scores, over classes of identical nodes.

A :class:`PolicySpec` names weighted scores; :class:`Placer` applies one to a
:class:`~flexmesh.policies.cluster.Cluster`. For each live class it asks, once per request
shape, whether the class passes the filters and which way of laying the request on its
devices scores best; the answer is cached on the class, which is immutable (a node that
changes state moves to another class). A decision is therefore one cached lookup per live
class, independent of how many requests are waiting.

The bonuses a few nodes get (near the submitter, holding what it needs): see ``bonuses``.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from flexmesh.policies.bonuses import holding_bonuses, locality_bonuses
from flexmesh.policies.cluster import Cluster
from flexmesh.policies.filters import Choice, choices, node_passes, node_reject_reason
from flexmesh.policies.nodes import NodeClass
from flexmesh.policies.scores import SCORES, Score, ScoreContext
from flexmesh.policies.shapes import (
    TIE_EPS,
    ShapeState,
    best_not_excluded,
    draw_tied_with_top,
)
from flexmesh.policies.spec import PolicySpec
from flexmesh.policies.types import (
    REASONS,
    MultiPlacement,
    NoFit,
    PlaceResult,
    Placement,
    Request,
    describe,
)
from flexmesh.policies.workload import PRIOR, Workload, WorkloadWindow

SCAN_BELOW = 48  # with fewer live classes than this a decision looks at each of them
MAX_SHAPES = 512  # request shapes a placer keeps a heap for (least recently used go)
_SHAPE_IDS = itertools.count(1)  # unique across placers: cached scores never collide
_MISSING: Any = object()


class Placer:
    """Places requests on a :class:`Cluster` with one policy.

    ``workload`` fixes the target mix for fragmentation scores (the trace replay passes the
    trace's); without it the placer learns the recent mix from the requests it is asked
    to place (:class:`WorkloadWindow`). ``decide`` only reads the cluster; ``place``
    also takes the placement off the cluster's books. With ``rng`` (an injected
    ``random.Random``), equally good nodes are chosen between at random, as Kubernetes
    does; without it the first in index order is taken.
    """

    def __init__(
        self,
        cluster: Cluster,
        spec: PolicySpec,
        workload: Workload | None = None,
        window: WorkloadWindow | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cluster = cluster
        self.rng = rng
        self.spec = spec
        self.window = window if window is not None or workload is not None else WorkloadWindow()
        self.ctx = ScoreContext(workload if workload is not None else PRIOR)
        self._supply_version = -1
        self._scores: tuple[tuple[Score, float], ...] = tuple((SCORES[s], w) for s, w in spec.terms)
        self._epoch = self.ctx.workload.version
        self._bucket_memo: dict[tuple[str, tuple[str, ...], int], list[dict[int, NodeClass]]] = {}
        self._shape_ids: dict[tuple[Any, ...], int] = {}
        self._shapes: OrderedDict[int, ShapeState] = OrderedDict()
        self._token_seen = self.ctx.token
        self.scan_below = SCAN_BELOW
        self._bucket_version = -1

    # -- workload -------------------------------------------------------------------------

    def observe(self, req: Request) -> None:
        """Count a request in the recent mix (no-op with a fixed workload)."""
        if self.window is None or not self.spec.uses_workload:
            return
        self.window.observe(req)
        wl = self.window.workload
        if wl.version != self._epoch:
            self._epoch = wl.version
            self.ctx.set_workload(wl)

    # -- evaluation -----------------------------------------------------------------------

    def _shape_id(self, req: Request) -> int:
        """A small int naming (this placer, workload version, request shape): the key of
        the scores cached on classes (ints hash at once; tuples hash every time)."""
        token = self.ctx.token
        if token != self._token_seen:  # workload or supply changed: every score is stale
            self._token_seen = token
            self._shapes.clear()
            self._shape_ids.clear()
        key = (
            req.compute_milli,
            req.memory_mib,
            req.count,
            req.cpu_milli,
            req.host_memory_mib,
            req.kind,
            req.models,
        )
        sid = self._shape_ids.get(key)
        if sid is None:
            if len(self._shape_ids) > 100_000:
                self._shape_ids.clear()
            sid = self._shape_ids[key] = next(_SHAPE_IDS)
        return sid

    def evaluate(
        self, req: Request, cls: NodeClass, *, exempt_battery: bool = False
    ) -> tuple[float, Choice] | None:
        """The best score and device choice for the request on a node of this class."""
        if not node_passes(req, cls, exempt_battery=exempt_battery):
            return None
        best: tuple[float, Choice] | None = None
        ctx = self.ctx
        for ch in choices(req, cls):
            s = 0.0
            for f, w in self._scores:
                s += w * f(req, cls, ch, ctx)
            if best is None or s < best[0]:
                best = (s, ch)
        return best

    def refresh_supply(self) -> None:
        """Recount device compute per model (for the scarcity score) from the cluster."""
        self.ctx.set_supply(self.cluster.supply)  # kept up to date by the cluster
        self._supply_version = self.cluster.supply_version

    def _buckets(self, req: Request) -> list[dict[int, NodeClass]]:
        """The buckets that may hold a class able to take the request."""
        if self._supply_version != self.cluster.supply_version:
            self.refresh_supply()
        if self._bucket_version != self.cluster.bucket_version:
            self._bucket_memo.clear()
            self._bucket_version = self.cluster.bucket_version
        # a CPU-only request may go anywhere; a whole device needs level 2; a fraction 1+
        need = 0 if req.count <= 0 or req.compute_milli <= 0 else (2 if req.whole else 1)
        key = (req.kind, req.models, need)
        hit = self._bucket_memo.get(key)
        if hit is None:
            hit = []
            for (km, level), bucket in self.cluster.buckets.items():
                if level < need:
                    continue
                if need and not (
                    (req.kind == "any" or any(k == req.kind for k, _ in km))
                    and (not req.models or any(m in req.models for _, m in km))
                ):
                    continue
                hit.append(bucket)
            self._bucket_memo[key] = hit
        return hit

    def decide(
        self,
        req: Request,
        rtt: Mapping[str, float] | None = None,
        *,
        explain: bool = False,
        exclude: frozenset[str] = frozenset(),
        saved: Mapping[str, int] | None = None,
    ) -> PlaceResult:
        """Choose where the request goes (the cluster is not changed). Nodes named in
        ``exclude`` are passed over (a gang that wants its members on distinct nodes);
        ``saved`` gives the bytes a node would not fetch (it holds them already)."""
        if req.count < 0 or req.compute_milli < 0 or req.memory_mib < 0:
            return NoFit("a request cannot ask for a negative amount")
        if self._supply_version != self.cluster.supply_version:
            self.refresh_supply()  # before the shape id: it may make every score stale
        sid = self._shape_id(req)
        best = self._best_node(req, sid, exclude)
        bonuses = locality_bonuses(self.spec.locality, req, rtt) if self.spec.locality > 0.0 else {}
        if saved and self.spec.cache > 0.0:
            bonuses = holding_bonuses(self.spec.cache, saved, bonuses)
        if bonuses:
            best = self._with_bonuses(req, bonuses, sid, exclude, best)
        if best is None:
            return NoFit(self.explain(req) if explain else "no node can take the request")
        _, choice, node = best
        devices = self.cluster.device_ids(node, choice)
        if req.count == 1 and devices:
            return Placement(node=node, device=devices[0])
        return MultiPlacement(node=node, devices=devices)

    def _best_node(
        self, req: Request, sid: int, exclude: frozenset[str]
    ) -> tuple[float, Choice, str] | None:
        """The best class's score and device choice, and the node of that class to use."""
        if len(self.cluster.classes) < self.scan_below:
            found = self._best_by_scan(req, sid, exclude)
        else:
            found = self._best_by_heap(req, sid, exclude)
        if found is None:
            return None
        score, choice, cls = found
        members = cls.members
        if self.rng is not None and len(members) > 1:
            names = [m for m in members if m not in exclude]
            return score, choice, names[self.rng.randrange(len(names))]
        return score, choice, next(m for m in members if m not in exclude)

    # -- locality -------------------------------------------------------------------------

    def _with_bonuses(
        self,
        req: Request,
        bonuses: Mapping[str, float],
        sid: int,
        exclude: frozenset[str],
        best: tuple[float, Choice, str] | None,
    ) -> tuple[float, Choice, str] | None:
        """The best node once nodes near the submitter, or holding what it needs, have
        their bonus off the score. The classes were scored without one, so only these few
        nodes are scored again; on a tie the origin wins."""
        if best is not None:
            score, choice, node = best
            best = (score - bonuses.get(node, 0.0), choice, node)
        for name, bonus in bonuses.items():
            rec = self.cluster.nodes.get(name)
            if rec is None or rec.cls is None or name in exclude:
                continue
            own = name == req.origin
            r = self._node_score(req, rec.cls, sid, own)
            if r is None:
                continue
            total = r[0] - bonus
            if best is None or total < best[0] or (total == best[0] and own):
                best = (total, r[1], name)
        return best

    def _node_score(
        self, req: Request, cls: NodeClass, sid: int, own: bool
    ) -> tuple[float, Choice] | None:
        """The class's score for the request. The submitter's own node may take its job
        below its battery floor: that score is not cached, as the class's other nodes may
        not."""
        if own and not cls.battery_ok:
            return self.evaluate(req, cls, exempt_battery=True)
        r: tuple[float, Choice] | None = cls.cache.get(sid, _MISSING)
        if r is _MISSING:
            r = cls.cache[sid] = self.evaluate(req, cls)
        return r

    # -- finding the best class -----------------------------------------------------------

    def _best_by_scan(
        self, req: Request, sid: int, exclude: frozenset[str]
    ) -> tuple[float, Choice, NodeClass] | None:
        """Look at every live class (its cached score for the shape): for small meshes."""
        best: tuple[float, Choice, NodeClass] | None = None
        evaluate = self.evaluate
        rng = self.rng
        tied = 0
        for bucket in self._buckets(req):
            for cls in bucket.values():
                cache = cls.cache
                r = cache.get(sid, _MISSING)
                if r is _MISSING:
                    r = cache[sid] = evaluate(req, cls)
                if r is None or (best is not None and r[0] > best[0] + TIE_EPS):
                    continue
                n = len(cls.members)
                if exclude:
                    n -= sum(1 for m in cls.members if m in exclude)
                    if n <= 0:
                        continue
                if rng is None:  # the lowest score, then the oldest class (as the heap)
                    if best is None or (r[0], cls.seq) < (best[0], best[2].seq):
                        best = (r[0], r[1], cls)
                elif best is None or r[0] < best[0] - TIE_EPS:
                    best = (r[0], r[1], cls)
                    tied = n
                else:  # equally good: each tied node equally likely
                    tied += n
                    if rng.random() * tied < n:
                        best = (r[0], r[1], cls)
        return best

    def _shape_state(self, req: Request, sid: int) -> ShapeState:
        """The heap of classes scored for this request shape, caught up with the classes
        created since it was last used (built from all live classes the first time)."""
        cl = self.cluster
        st = self._shapes.get(sid)
        if st is not None and st.cursor >= cl.created_base:
            self._shapes.move_to_end(sid)
            new = cl.created[st.cursor - cl.created_base :]
        else:
            if st is not None:
                del self._shapes[sid]
            while len(self._shapes) >= MAX_SHAPES:
                self._shapes.popitem(last=False)
            st = ShapeState()
            self._shapes[sid] = st
            new = [c for b in self._buckets(req) for c in b.values()]
        st.cursor = cl.created_base + len(cl.created)
        need = 0 if req.count <= 0 or req.compute_milli <= 0 else (2 if req.whole else 1)
        heap = st.heap
        evaluate = self.evaluate
        rel = st.relevant
        for cls in new:
            if not cls.members or cls.level < need:
                continue
            ok = rel.get(cls.km)
            if ok is None:
                ok = rel[cls.km] = not need or (
                    (req.kind == "any" or any(k == req.kind for k, _ in cls.km))
                    and (not req.models or any(m in req.models for _, m in cls.km))
                )
            if not ok:
                continue
            r = cls.cache.get(sid, _MISSING)
            if r is _MISSING:
                r = cls.cache[sid] = evaluate(req, cls)
            if r is not None:
                heapq.heappush(heap, (r[0], cls.seq, cls, r[1]))
        if len(heap) > 2 * len(cl.classes) + 64:  # mostly dead entries: compact
            st.compact()
        return st

    def _best_by_heap(
        self, req: Request, sid: int, exclude: frozenset[str]
    ) -> tuple[float, Choice, NodeClass] | None:
        """The best live class from the shape's heap (dead classes are dropped on the way;
        ties, within TIE_EPS, are broken at random when the placer has an rng)."""
        st = self._shape_state(req, sid)
        heap = st.heap
        while heap and not heap[0][2].members:
            heapq.heappop(heap)
        if not heap:
            return None
        if exclude:
            e = best_not_excluded(heap, exclude, self.rng)
            if e is None:
                return None
        elif self.rng is None:
            e = heap[0]
        else:
            e = draw_tied_with_top(st, self.rng)
        return (e[0], e[3], e[2])

    def place(self, req: Request, rtt: Mapping[str, float] | None = None) -> PlaceResult:
        """Decide, and on success take the placement off the cluster's books."""
        self.observe(req)
        res = self.decide(req, rtt)
        if not isinstance(res, NoFit):
            self.commit(req, res)
        return res

    def commit(self, req: Request, res: Placement | MultiPlacement) -> None:
        self.cluster.allocate(
            res.node,
            res.devices,
            req.compute_milli,
            req.memory_mib,
            req.cpu_milli,
            req.host_memory_mib,
        )

    def release(self, req: Request, res: Placement | MultiPlacement) -> None:
        self.cluster.release(
            res.node,
            res.devices,
            req.compute_milli,
            req.memory_mib,
            req.cpu_milli,
            req.host_memory_mib,
        )

    # -- explanations ---------------------------------------------------------------------

    def explain(self, req: Request) -> str:
        """Why nothing fits, for a person: how many nodes each filter turned away."""
        if not self.cluster.nodes:
            return "no nodes in the mesh"
        rejected: dict[str, int] = {}
        for cls in self.cluster.iter_classes():
            n = len(cls.members)
            reason = node_reject_reason(req, cls) or "devices"
            if reason == "devices" and choices(req, cls):
                reason = "?"
            rejected[reason] = rejected.get(reason, 0) + n
        what = describe(req)
        parts = ", ".join(f"{REASONS.get(k, k)}: {v}" for k, v in sorted(rejected.items()))
        return f"no node can take {what} ({parts})"
