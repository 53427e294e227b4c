"""Network coordinates (Vivaldi): every node places itself in a small Euclidean space plus
a height, so that the distance between two nodes' coordinates estimates the round-trip
time between them, without either having measured the other.

Theory of operation
-------------------
A node starts at the origin with a large error estimate. Each time it measures the RTT to
a peer (a probe and its ack) it also has the peer's coordinate and error (gossiped with the
peer's facts), and moves as a spring would: along the line from the peer towards itself
when the estimate is shorter than the measurement, away otherwise, by a step that grows
with its own error relative to the peer's (a confident node moves little because of a
newcomer). The height models the access link (a drone's radio, a laptop's Wi-Fi): it adds
to every distance from that node and is moved by the same force. The error estimate is a
moving average of the relative error of each prediction.

This is the algorithm of Dabek, Cox, Kaashoek and Morris (SIGCOMM 2004) with the height
of their section 5.5, as Serf and Consul run it. Sans-IO: the caller measures and passes
RTTs in seconds; randomness (to separate two nodes at one point) comes from the caller.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

DIMENSIONS = 8
ERROR_MAX = 1.5  # a fresh node's error; errors are never above it
CE = 0.25  # how fast the error estimate follows new samples
CC = 0.25  # the largest step, as a share of the prediction's error
HEIGHT_MIN = 10e-6  # seconds: no access link is faster than this
ZERO = 1e-6  # two coordinates closer than this are the same point
RTT_MAX = 10.0  # seconds: a sample beyond this is not a network round trip; ignored


@dataclass(slots=True)
class Coordinate:
    vec: list[float] = field(default_factory=lambda: [0.0] * DIMENSIONS)
    height: float = HEIGHT_MIN
    error: float = ERROR_MAX

    def distance(self, other: Coordinate) -> float:
        """The RTT this coordinate predicts to ``other``, in seconds."""
        return _norm(_sub(self.vec, other.vec)) + self.height + other.height

    def to_wire(self) -> list[float]:
        """A compact form for gossip: the vector, then height and error."""
        return [round(x, 7) for x in self.vec] + [round(self.height, 7), round(self.error, 4)]

    @classmethod
    def from_wire(cls, data: object) -> Coordinate | None:
        """The coordinate a peer gossiped, or None if it is not a sane one."""
        if not isinstance(data, list) or len(data) != DIMENSIONS + 2:
            return None
        if not all(isinstance(x, int | float) and not isinstance(x, bool)
                   and math.isfinite(x) and abs(x) <= 1e3 for x in data):
            return None
        height, error = float(data[-2]), float(data[-1])
        if height < 0 or error < 0:
            return None
        return cls([float(x) for x in data[:DIMENSIONS]], max(height, HEIGHT_MIN),
                   min(max(error, ZERO), ERROR_MAX))


def update(me: Coordinate, peer: Coordinate, rtt: float, rng: random.Random) -> bool:
    """Move ``me`` for one RTT sample (seconds) to ``peer``; False if the sample was
    refused (not a plausible round trip)."""
    if not (math.isfinite(rtt) and 0 < rtt <= RTT_MAX):
        return False
    weight = me.error / max(me.error + peer.error, ZERO)
    predicted = me.distance(peer)
    relative = abs(predicted - rtt) / rtt
    me.error = min(CE * weight * relative + me.error * (1 - CE * weight), ERROR_MAX)
    force = CC * weight * (rtt - predicted)  # > 0: too close, move away
    direction, length = _unit(_sub(me.vec, peer.vec), rng)
    me.vec = [x + force * d for x, d in zip(me.vec, direction, strict=True)]
    if length > ZERO:  # the height takes its share of the force
        me.height = max(me.height + force * (me.height + peer.height) / length, HEIGHT_MIN)
    return True


def _sub(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _unit(v: list[float], rng: random.Random) -> tuple[list[float], float]:
    """``v`` scaled to length 1, and its length; a random direction when ``v`` is ~0."""
    length = _norm(v)
    if length > ZERO:
        return [x / length for x in v], length
    r = [rng.uniform(-1, 1) for _ in v]
    n = _norm(r) or 1.0
    return [x / n for x in r], 0.0
