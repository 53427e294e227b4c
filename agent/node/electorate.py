"""The members as the election reads them, and every member's facts decoded.

Both are kept per member and read again only when an event touches that member: at 30%
loss state flips are many, members may be thousands, and most facts changes are device
usage, which the election does not read.
"""

from __future__ import annotations

from flexmesh.protocol import facts
from flexmesh.protocol.election import Voter
from flexmesh.protocol.membership import Member, Membership


class Electorate:
    def __init__(self, membership: Membership) -> None:
        self.membership = membership
        self._voters: dict[str, Voter] = {}
        self._facts: dict[str, tuple[tuple[int, int], facts.NodeFacts]] = {}

    def facts_of(self, m: Member) -> facts.NodeFacts:
        """A member's facts, decoded once per version."""
        key = (m.facts_inc, m.facts_version)
        hit = self._facts.get(m.name)
        if hit is None or hit[0] != key:
            hit = self._facts[m.name] = (key, facts.decode(m.facts))
            if len(self._facts) > 2 * len(self.membership.members):
                for name in [n for n in self._facts if n not in self.membership.members]:
                    del self._facts[name]
        return hit[1]

    def refresh(self, name: str) -> bool:
        """Read a member again as the election sees it; True when that changed."""
        m = self.membership.members.get(name)
        if m is None:
            return self._voters.pop(name, None) is not None
        voter = self._voter(m)
        if self._voters.get(name) == voter:
            return False
        self._voters[name] = voter
        return True

    def _voter(self, m: Member) -> Voter:
        f = self.facts_of(m)
        return Voter(m.name, m.state, f.priority, f.eligible, f.claim, f.max_term)

    def voters(self) -> list[Voter]:
        """Every member as the election sees it."""
        vm, members = self._voters, self.membership.members
        if len(vm) != len(members) or any(n not in members for n in vm):
            for name in [n for n in vm if n not in members]:
                del vm[name]  # reaped
            for name, m in members.items():
                if name not in vm:
                    vm[name] = self._voter(m)
        return list(vm.values())
