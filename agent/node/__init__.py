"""One node's sans-IO composition; see ``core`` for the theory of operation.

- ``core``: inputs, routing, the election, becoming and ceasing to be coordinator
- ``origin``, ``follow``: jobs submitted here, and following those that run elsewhere
- ``owner``: this node's devices, leases and the jobs it runs
- ``coordinator``: the queue and placement, while this node coordinates
- ``effects``: what the node asks the runtime to do; ``views``: what it shows
"""

from flexmesh.agent.node.config import NodeConfig
from flexmesh.agent.node.core import Node
from flexmesh.agent.node.effects import (
    ArchiveOutput,
    Call,
    CollectResults,
    Effect,
    ForgetJob,
    ForgetLease,
    ForgetRun,
    JobOutput,
    LogEvent,
    PersistJob,
    PersistLease,
    PersistRun,
    RunJob,
    StopJob,
)
from flexmesh.agent.node.views import NodeStatus

__all__ = ["ArchiveOutput", "Call", "CollectResults", "Effect", "ForgetJob", "ForgetLease",
           "ForgetRun", "JobOutput", "LogEvent", "Node", "NodeConfig", "NodeStatus", "PersistJob",
           "PersistLease", "PersistRun", "RunJob", "StopJob"]
