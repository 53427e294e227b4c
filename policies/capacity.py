"""What the mesh could ever hold: requests that no device of it could take, even empty.

Capacity, not what is free now: a request is impossible when it asks for more memory per
device than any device of its kind has, for a kind no node has, for more devices of one
model than any node has, or is a gang of more members than there are nodes with a device
that suits one. A request in proportion (``memory_mib`` 0) asks for no memory of its own,
so only its compute counts; one that names only memory is impossible only if that memory
is more than every device of its kind has.

``Capacity`` is ``Sizes`` (the sizes of device in the view, for requests in proportion)
that also keeps how many devices of each size every node has, updated node by node; its
answers are cached until a node's devices change.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from flexmesh.policies.proportional import Size, Sizes
from flexmesh.policies.types import Candidate, Request

_CACHE_MAX = 4096  # answers kept between two changes of the mesh's devices


class Capacity(Sizes):
    def __init__(self) -> None:
        super().__init__()
        self._devices: dict[str, Counter[Size]] = {}
        self._answers: dict[tuple[object, ...], str | None] = {}

    def set(self, node: str, cands: Sequence[Candidate]) -> None:
        counts = Counter((c.kind, c.model, c.compute_milli, c.memory_mib) for c in cands)
        if self._devices.get(node, Counter()) != counts:
            if counts:
                self._devices[node] = counts
            else:
                self._devices.pop(node, None)
            self._answers.clear()
        super().set(node, cands)

    def never(self, req: Request, nodes: int = 1) -> str | None:
        """Why no device of the mesh could ever take ``req`` (on ``nodes`` distinct nodes,
        for a gang), for a person to read; None if some could, once free."""
        key = (req.kind, req.models, req.compute_milli, req.memory_mib, req.count, nodes)
        if key not in self._answers:
            if len(self._answers) >= _CACHE_MAX:
                self._answers.clear()
            self._answers[key] = self._never(req, nodes)
        return self._answers[key]

    def _never(self, req: Request, nodes: int) -> str | None:
        what = "device" if req.kind == "any" else f"{req.kind} device"
        of_kind = [s for s in self if _of_kind(req, s)]
        if not of_kind:
            return f"no {what} in the mesh"
        largest = max(s[3] for s in of_kind)
        if req.memory_mib > largest:
            return (f"{_size(req.memory_mib)} of memory asked per device; the largest "
                    f"{what} in the mesh has {_size(largest)}")
        most = [self._alike(req, counts) for counts in self._devices.values()]
        if max(most, default=0) == 0:
            return f"no {what} in the mesh has {req.compute_milli} milli of compute"
        if req.count > max(most):
            return (f"{req.count} {what}s asked on one node; no node has more than "
                    f"{max(most)} of one model that suit it")
        enough = sum(1 for n in most if n >= req.count)
        if nodes > enough:
            return (f"a gang of {nodes} needs as many nodes; {enough} node(s) of the mesh "
                    f"have the {what}s one member asks for")
        return None

    @staticmethod
    def _alike(req: Request, counts: Counter[Size]) -> int:
        """The most devices of one model on a node that could each take ``req``."""
        by_model: Counter[tuple[str, str]] = Counter()
        for size, n in counts.items():
            if _of_kind(req, size) and size[2] >= req.compute_milli and size[3] >= req.memory_mib:
                by_model[size[0], size[1]] += n
        return max(by_model.values(), default=0)


def _of_kind(req: Request, size: Size) -> bool:
    return req.kind in ("any", size[0]) and (not req.models or size[1] in req.models)


def _size(mib: int) -> str:
    return f"{mib / 1024:g} GiB" if mib >= 1024 else f"{mib} MiB"
