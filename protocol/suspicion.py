"""Lifeguard's timing math as plain functions, and the local health (awareness) score.

- A suspicion starts with a long timeout that shrinks, on a log scale, as independent
  peers confirm it (Lifeguard section IV-B): a node that is truly dead is declared so
  quickly once several peers agree; a node wrongly suspected by one slow peer has time to
  refute.
- Awareness (Lifeguard IV-A) is a small integer a node keeps about *itself*: failed probes,
  missed nacks, refutations and event-loop lag raise it; successful probes lower it. The
  node stretches its own probe interval and timeouts by ``score + 1``, so a node that is
  overloaded slows down instead of accusing healthy peers.
"""

from __future__ import annotations

import math


def suspicion_min_timeout(mult: float, n: int, interval: float) -> float:
    """``mult * max(1, log10 n) * interval``, the shortest a suspicion may last."""
    return mult * max(1.0, math.log10(max(n, 1))) * interval


def suspicion_timeout(min_s: float, max_s: float, confirmations: int, expected: int) -> float:
    """Timeout after ``confirmations`` independent confirmations out of ``expected``."""
    if expected <= 0:
        return min_s
    frac = math.log(confirmations + 1.0) / math.log(expected + 1.0)
    return max(min_s, max_s - (max_s - min_s) * min(frac, 1.0))


class Awareness:
    """Lifeguard's local health multiplier; 0 is healthy."""

    def __init__(self, max_score: int = 8) -> None:
        self.max_score = max_score
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(max(self.score + delta, 0), self.max_score - 1)

    def scale(self, seconds: float) -> float:
        return seconds * (self.score + 1)
