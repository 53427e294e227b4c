"""What a request may ask for (``request_problem``): one sentence per rule, or None."""

from __future__ import annotations

import pytest

from flexmesh.agent.models import MAX_DEVICES, MAX_GANG, MAX_MEMORY_MIB, request_problem


@pytest.mark.parametrize(
    ("compute", "memory", "count", "gang", "preemptible"),
    [
        (1000, 0, 1, 1, False),  # the defaults: one whole device
        (1, 0, 1, 1, False),  # the smallest fraction
        (250, 4096, 1, 1, True),  # a preemptible fraction
        (1000, MAX_MEMORY_MIB, MAX_DEVICES, 1, False),  # every device a node may give
        (500, 1024, 1, MAX_GANG, False),  # the largest gang of fractions
        (1000, 0, 2, 3, False),  # a gang of two whole devices per member
        (1000, 0, 1, 1, True),  # one node: preemptible is fine
    ],
)
def test_requests_that_may_be_asked_for(compute: int, memory: int, count: int, gang: int,
                                        preemptible: bool) -> None:
    assert request_problem(compute, memory, count, gang, preemptible) is None


@pytest.mark.parametrize(
    ("compute", "memory", "count", "gang", "preemptible", "says"),
    [
        (0, 0, 1, 1, False, "compute_milli 0 must be 1..1000 (1000 = one device)"),
        (-5, 0, 1, 1, False, "compute_milli -5 must be 1..1000"),
        (1001, 0, 1, 1, False, "compute_milli 1001 must be 1..1000"),
        (1000, -1, 1, 1, False, "memory_mib -1 is negative"),
        (1000, MAX_MEMORY_MIB + 1, 1, 1, False, "is larger than any device could be"),
        (1000, 0, 0, 1, False, f"devices must be an integer from 1 to {MAX_DEVICES}"),
        (1000, 0, MAX_DEVICES + 1, 1, False, "devices must be an integer from 1 to"),
        (500, 0, 2, 1, False,
         "2 devices are whole devices: a fraction of each (500 milli) cannot be asked for"),
        (1000, 0, 1, 0, False, f"gang must be an integer from 1 to {MAX_GANG} (nodes, one "
                               "member each)"),
        (1000, 0, 1, MAX_GANG + 1, False, "gang must be an integer from 1 to"),
        (1000, 0, 1, 2, True,
         "a gang cannot be preemptible: stopping one member stops them all"),
    ],
)
def test_each_rule_says_what_is_wrong(compute: int, memory: int, count: int, gang: int,
                                      preemptible: bool, says: str) -> None:
    problem = request_problem(compute, memory, count, gang, preemptible)
    assert problem is not None and says in problem


def test_the_first_problem_is_the_one_told() -> None:
    assert request_problem(-1, -1, 0, 0, True) == (
        "compute_milli -1 must be 1..1000 (1000 = one device), or 0 with memory_mib "
        "(compute in proportion to memory)")
    assert request_problem(0, 0, 1, 1, False) is not None  # nothing named at all
    assert request_problem(0, 4096, 1, 1, False) is None  # compute in proportion
