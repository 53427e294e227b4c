"""Every subpackage under agent/, client/, protocol/ and policies/ is installed as
flexmesh.*."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = {"agent": "flexmesh.agent", "client": "flexmesh.client", "protocol": "flexmesh.protocol",
       "policies": "flexmesh.policies"}


def _declared() -> tuple[set[str], dict[str, str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = data["tool"]["setuptools"]
    return set(tool["packages"]), dict(tool["package-dir"])


def test_every_subpackage_is_listed() -> None:
    packages, _ = _declared()
    on_disk = set()
    for folder, dotted in TOP.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([dotted, *rel.parts]))
    missing = on_disk - packages
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_package_dir_maps_the_three_folders() -> None:
    _, mapping = _declared()
    assert mapping == {v: k for k, v in TOP.items()}


def test_installed_packages_import() -> None:
    packages, _ = _declared()
    for name in sorted(packages):
        importlib.import_module(name)
