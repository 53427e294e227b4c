"""Helpers of the tests that run real agents fetching a job's workdir (``LocalMesh``)."""

from __future__ import annotations

from pathlib import Path

from flexmesh.agent.localmesh import LocalMesh


def payload_config(mesh: LocalMesh, name: str, work: Path, extra: str = "") -> list[str]:
    """The arguments giving agent ``name`` a config file: its runs' directories under
    ``work``, and ``extra`` (TOML) after that."""
    path = mesh.root / f"{name}.toml"
    path.write_text(f'[payload]\nwork_dir = "{work / name}"\n{extra}')
    return ["--config", str(path)]


def partial_size(mesh: LocalMesh, node: str) -> int:
    """Bytes the partial downloads of agent ``node`` hold."""
    d = mesh.agents[node].dir / "state" / "bundles" / "partial"
    return sum(p.stat().st_size for p in d.iterdir()) if d.exists() else 0
