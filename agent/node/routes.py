"""Routing: a request to the role that handles its type, a reply to the handler of the
type of call it answers. A message type missing here is an unexpected request (counted)
or a reply nobody waits on (the other side retries on its own)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flexmesh.agent.node import results
from flexmesh.agent.node.coordinator import lease_reply
from flexmesh.agent.node.effects import PendingCall
from flexmesh.protocol import wire

if TYPE_CHECKING:
    from flexmesh.agent.node.core import Node


def _submit(node: Node, msg: wire.Submit, now: float) -> wire.Message:
    if node.coordinator is None:
        return wire.Error(f"not the coordinator (ask {node.belief.coordinator})")
    return node.coordinator.handle_submit(msg, now)


def _withdraw(node: Node, msg: wire.Withdraw, now: float) -> wire.Message:
    node.scheduler.withdraw(msg.job_id)
    return wire.Ok("withdrawn")


def _pushpull(node: Node, msg: wire.PushPull, now: float) -> wire.Message:
    node.membership.merge_remote_state(msg.states, now)
    return node.pushpull_request(False)


def _preempt_reply(node: Node, call: PendingCall, reply: wire.Message | None, error: str,
                   now: float) -> None:
    if node.coordinator is not None:
        node.coordinator.on_preempt_reply(call, reply, error, now)


REQUESTS: dict[type, Callable[[Node, Any, float], wire.Message]] = {
    wire.Submit: _submit,
    wire.Withdraw: _withdraw,
    wire.LeaseRequest: lambda n, m, t: n.owner.handle_lease_request(m, t),
    wire.Placed: lambda n, m, t: n.origin.handle_placed(m, t),
    wire.Unplaceable: lambda n, m, t: n.origin.unplaceable(m, t),
    wire.StartJob: lambda n, m, t: n.owner.handle_start(m, t),
    wire.Cancel: lambda n, m, t: n.owner.handle_cancel(m, t),
    wire.Preempt: lambda n, m, t: n.owner.handle_preempt(m, t),
    wire.Release: lambda n, m, t: n.owner.handle_release(m, t),
    wire.PushPull: _pushpull,
    wire.ResultsTaken: lambda n, m, t: results.taken(n, m),
}

REPLIES: dict[type, Callable[[Node, PendingCall, wire.Message | None, str, float], None]] = {
    wire.Submit: lambda n, c, r, e, t: n.origin.on_submit_reply(c, r, e, t),
    wire.StartJob: lambda n, c, r, e, t: n.origin.on_start_reply(c, r, e, t),
    wire.Cancel: lambda n, c, r, e, t: n.origin.on_cancel_reply(c, r, e, t),
    wire.JobSync: lambda n, c, r, e, t: n.origin.follow.on_sync_reply(c, r, e, t),
    wire.LeaseRequest: lambda n, c, r, e, t: lease_reply(n, c, r, e, t),
    wire.Preempt: _preempt_reply,
    # Placed, Release, Withdraw, Unplaceable: the other side retries on its own (an
    # origin that missed an Unplaceable hears it in answer to its next Submit).
}
