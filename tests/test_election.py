"""The coordinator as a pure function of the membership view, and its terms."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmesh.protocol.election import (
    Belief,
    Voter,
    choose_coordinator,
    decide,
    highest_term,
)

STATES = ["alive", "suspect", "dead", "left"]


def v(name: str, state: str = "alive", **kw: object) -> Voter:
    return Voter(name, state, **kw)  # type: ignore[arg-type]


# --- choose_coordinator --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("voters", "current", "chosen"),
    [
        ([], None, None),
        ([v("a")], None, "a"),
        ([v("b"), v("a"), v("c")], None, "a"),  # lowest name
        ([v("a", priority=1), v("b"), v("c")], None, "b"),  # lowest priority first
        ([v("a", priority=-1), v("b")], None, "a"),
        ([v("a", priority=2), v("b", priority=2), v("c", priority=3)], None, "a"),
        ([v("a", "suspect"), v("b")], None, "b"),  # a suspect is never newly chosen
        ([v("a", "dead"), v("b", "left"), v("c")], None, "c"),
        ([v("a", "dead"), v("b", "left")], None, None),
        ([v("a", eligible=False), v("b")], None, "b"),
        ([v("a", eligible=False)], None, None),
        ([v("a", eligible=False), v("b", eligible=False)], "a", None),
    ],
)
def test_choose_the_lowest_priority_then_name_among_alive_eligible(
    voters: list[Voter], current: str | None, chosen: str | None
) -> None:
    assert choose_coordinator(voters, current) == chosen


@pytest.mark.parametrize(
    ("voters", "current", "chosen"),
    [
        # hysteresis: a suspect coordinator keeps the role...
        ([v("a"), v("b", "suspect")], "b", "b"),
        ([v("a", "suspect"), v("b")], "a", "a"),
        ([v("b", "suspect")], "b", "b"),
        # ...until it is dead or gone
        ([v("a"), v("b", "dead")], "b", "a"),
        ([v("a"), v("b", "left")], "b", "a"),
        ([v("b", "dead")], "b", None),
        ([v("a"), v("c")], "b", "a"),  # forgotten entirely
        # an alive current coordinator yields to a better alive one (e.g. after a merge)
        ([v("a"), v("b")], "b", "a"),
        ([v("a", priority=5), v("b")], "a", "b"),
        # an ineligible coordinator is never kept, suspect or not
        ([v("a"), v("b", eligible=False)], "b", "a"),
        ([v("a"), v("b", "suspect", eligible=False)], "b", "a"),
    ],
)
def test_hysteresis(voters: list[Voter], current: str | None, chosen: str | None) -> None:
    assert choose_coordinator(voters, current) == chosen


def test_the_answer_does_not_depend_on_the_order_of_the_view() -> None:
    voters = [v("c"), v("a", "suspect"), v("b", priority=1), v("d", eligible=False), v("e")]
    for current in (None, "a", "b", "c", "d", "e"):
        answers = {
            choose_coordinator(order, current)
            for order in (voters, voters[::-1], voters[2:] + voters[:2])
        }
        assert len(answers) == 1, current


VOTERS = st.lists(
    st.builds(
        Voter,
        name=st.sampled_from("abcdefgh"),
        state=st.sampled_from(STATES),
        priority=st.integers(-2, 2),
        eligible=st.booleans(),
        claim=st.integers(0, 20),
        max_term=st.integers(0, 20),
    ),
    max_size=8,
    unique_by=lambda x: x.name,
)


def reference_choice(voters: list[Voter], current: str | None) -> str | None:
    """The rule stated in the module docstring, written independently."""
    alive = sorted((x.priority, x.name) for x in voters if x.eligible and x.state == "alive")
    best = alive[0][1] if alive else None
    cur = next((x for x in voters if x.name == current and x.eligible), None)
    if cur is not None and cur.state == "suspect":
        return cur.name
    return best


@settings(max_examples=300)
@given(VOTERS, st.none() | st.sampled_from("abcdefghz"))
def test_choice_matches_the_rule(voters: list[Voter], current: str | None) -> None:
    chosen = choose_coordinator(voters, current)
    assert chosen == reference_choice(voters, current)
    if chosen is not None:
        (winner,) = [x for x in voters if x.name == chosen]
        assert winner.eligible
        assert winner.state in ("alive", "suspect")
        if winner.state == "suspect":
            assert chosen == current
    # the choice is stable: asking again with the answer as current gives the same answer
    assert choose_coordinator(voters, chosen) == chosen


# --- decide: terms -------------------------------------------------------------------------


def test_a_node_that_becomes_coordinator_claims_above_the_highest_term_seen() -> None:
    voters = [v("a", max_term=4), v("b", max_term=7), v("c", "dead", claim=9)]
    belief, claim = decide(voters, "a", Belief(None, 0), 0)
    assert claim == 10  # above the dead coordinator's old claim too
    assert belief == Belief("a", 10)


def test_the_first_coordinator_of_a_fresh_cluster_claims_term_one() -> None:
    belief, claim = decide([v("a"), v("b")], "a", Belief(None, 0), 0)
    assert (belief, claim) == (Belief("a", 1), 1)


def test_a_coordinator_keeps_its_claim_while_nothing_changes() -> None:
    voters = [v("a", claim=5, max_term=5), v("b", max_term=5), v("c", max_term=3)]
    belief, claim = decide(voters, "a", Belief("a", 5), 5)
    assert (belief, claim) == (Belief("a", 5), 5)


@pytest.mark.parametrize("rival_claim", [5, 6, 9])
@pytest.mark.parametrize("rival_state", ["alive", "suspect"])
def test_a_rival_claim_forces_a_claim_above_it(rival_claim: int, rival_state: str) -> None:
    """After a partition heals, two nodes claim; the chosen one must out-term the other."""
    voters = [v("a", claim=5, max_term=5), v("b", rival_state, claim=rival_claim)]
    belief, claim = decide(voters, "a", Belief("a", 5), 5)
    assert claim == max(5, rival_claim) + 1
    assert belief == Belief("a", claim)


def test_a_dead_rivals_claim_below_ours_is_ignored() -> None:
    voters = [v("a", claim=5, max_term=5), v("b", "dead", claim=4)]
    assert decide(voters, "a", Belief("a", 5), 5) == (Belief("a", 5), 5)


def test_a_higher_term_seen_anywhere_forces_a_new_claim() -> None:
    voters = [v("a", claim=5, max_term=5), v("b", max_term=8)]
    assert decide(voters, "a", Belief("a", 5), 5) == (Belief("a", 9), 9)


def test_non_coordinators_report_the_coordinators_claim() -> None:
    voters = [v("a", claim=12, max_term=12), v("b", max_term=12), v("c", max_term=3)]
    assert decide(voters, "b", Belief(None, 0), 0) == (Belief("a", 12), 0)
    assert decide(voters, "c", Belief("a", 11), 0) == (Belief("a", 12), 0)


def test_a_non_coordinator_gives_up_its_claim() -> None:
    voters = [v("a", claim=3), v("b", claim=2, max_term=3)]
    assert decide(voters, "b", Belief("b", 2), 2) == (Belief("a", 3), 0)


def test_a_coordinator_that_has_not_claimed_yet_has_unknown_term() -> None:
    assert decide([v("a"), v("b")], "b", Belief(None, 0), 0) == (Belief("a", 0), 0)


def test_nobody_eligible_means_no_coordinator_and_no_claim() -> None:
    voters = [v("a", eligible=False, claim=3), v("b", "dead")]
    assert decide(voters, "a", Belief("a", 3), 3) == (Belief(None, 0), 0)


def test_a_suspect_coordinator_keeps_its_term_in_everyones_belief() -> None:
    voters = [v("a", "suspect", claim=4), v("b", max_term=4)]
    assert decide(voters, "b", Belief("a", 4), 0) == (Belief("a", 4), 0)
    voters = [v("a", "dead", claim=4), v("b", max_term=4)]
    assert decide(voters, "b", Belief("a", 4), 0) == (Belief("b", 5), 5)


@pytest.mark.parametrize(
    ("voters", "term"),
    [
        ([], 0),
        ([v("a")], 0),
        ([v("a", claim=3), v("b", max_term=5)], 5),
        ([v("a", "dead", claim=9), v("b", max_term=5)], 9),
    ],
)
def test_highest_term(voters: list[Voter], term: int) -> None:
    assert highest_term(voters) == term


@settings(max_examples=300)
@given(VOTERS, st.sampled_from("abcdefgh"), st.none() | st.sampled_from("abcdefgh"))
def test_a_new_coordinator_claims_above_every_term_in_the_view(
    voters: list[Voter], me: str, current: str | None
) -> None:
    belief, claim = decide(voters, me, Belief(current, 0), 0)
    assert belief.coordinator == choose_coordinator(voters, current)
    if belief.coordinator == me:
        terms = [t for x in voters for t in (x.claim, x.max_term)]
        assert all(claim > t for t in terms)
        assert belief.term == claim
    else:
        assert claim == 0


@settings(max_examples=300)
@given(
    VOTERS,
    st.sampled_from("abcdefgh"),
    st.none() | st.sampled_from("abcdefgh"),
    st.integers(0, 25),
)
def test_decide_properties_for_any_previous_claim(
    voters: list[Voter], me: str, current: str | None, my_claim: int
) -> None:
    belief, claim = decide(voters, me, Belief(current, my_claim), my_claim)
    if belief.coordinator is None:
        assert (belief, claim) == (Belief(None, 0), 0)
        return
    if belief.coordinator != me:
        (coord,) = [x for x in voters if x.name == belief.coordinator]
        assert (belief.term, claim) == (coord.claim, 0)
        return
    # the coordinator's claim: never below anything seen, strictly above every live rival
    assert belief.term == claim >= 1
    assert claim >= my_claim
    assert claim >= highest_term(voters)
    for x in voters:
        if x.name != me and x.state in ("alive", "suspect"):
            assert claim > x.claim
    # and, with the claim now known to the view, deciding again changes nothing
    again = [
        Voter(x.name, x.state, x.priority, x.eligible, claim, max(x.max_term, claim))
        if x.name == me
        else x
        for x in voters
    ]
    assert decide(again, me, belief, claim) == (belief, claim)


@settings(max_examples=100)
@given(VOTERS, st.sampled_from("abcdefgh"))
def test_every_node_agrees_on_the_coordinator_from_the_same_view(
    voters: list[Voter], current: str
) -> None:
    beliefs = {decide(voters, x.name, Belief(current, 0), 0)[0].coordinator for x in voters}
    assert len(beliefs) <= 1
