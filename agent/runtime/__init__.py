"""The asyncio runtime around a node; see ``agent`` for how the pieces fit."""

from flexmesh.agent.runtime.agent import Agent, StartError

__all__ = ["Agent", "StartError"]
