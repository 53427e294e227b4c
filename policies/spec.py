"""A placement policy: named, weighted scores, and the bonuses a placer adds to them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flexmesh.policies.scores import SCORES

_WORKLOAD_SCORES = frozenset({"fgd", "cfgd", "frag-after", "strand", "scarcity"})
CACHE_BONUS = 0.02  # the most the holding bonus is worth (devices of fragmentation)


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A named, weighted sum of scores; ``locality`` is the most the origin bonus is worth,
    ``cache`` the most the bonus of a node holding what the request needs is."""

    name: str
    terms: tuple[tuple[str, float], ...]
    locality: float = 0.0
    cache: float = 0.0

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError(f"policy {self.name!r} has no scores")
        for score, _ in self.terms:
            if score not in SCORES:
                known = ", ".join(sorted(SCORES))
                raise ValueError(
                    f"unknown score {score!r} in policy {self.name!r} (known: {known})"
                )

    @property
    def uses_workload(self) -> bool:
        return any(s in _WORKLOAD_SCORES for s, _ in self.terms)


def parse_spec(
    text: str,
    named: Mapping[str, PolicySpec],
    weights: Mapping[str, float] | None = None,
) -> PolicySpec:
    """``"fgd"`` (a named policy), or scores with optional weights:
    ``"fgd+packing:0.05"``; ``weights`` overrides or adds per-score weights."""
    text = text.strip()
    if text in named and not weights:
        return named[text]
    if text in named:
        terms = dict(named[text].terms)
        locality = named[text].locality
        cache = named[text].cache
    else:
        terms = {}
        locality = 0.1
        cache = CACHE_BONUS
        for part in text.split("+"):
            part = part.strip()
            if not part:
                raise ValueError(f"empty score in policy {text!r}")
            score, _, raw = part.partition(":")
            try:
                terms[score.strip()] = float(raw) if raw else 1.0
            except ValueError:
                raise ValueError(f"bad weight {raw!r} in policy {text!r}") from None
    for score, weight in (weights or {}).items():
        if score == "locality":
            locality = float(weight)
        elif score == "cache":
            cache = float(weight)
        else:
            terms[score] = float(weight)
    return PolicySpec(text, tuple((s, w) for s, w in terms.items() if w != 0.0), locality,
                      cache)
