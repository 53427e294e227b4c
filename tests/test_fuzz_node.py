"""Hostile but well-framed input against one node: see ``fuzz_node``. In CI the examples
are fixed (the ``ci`` profile derandomizes); ``scripts/bench_fuzz`` runs many more."""

from __future__ import annotations

from fuzz_node import INPUT, Input, feed, target_node
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(INPUT, min_size=1, max_size=12))
def test_no_hostile_message_crashes_a_node_or_overcommits_a_device(
        inputs: list[Input]) -> None:
    feed(target_node(), inputs)
