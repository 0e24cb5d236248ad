"""`pip install .` (and so every image) must ship every package folder, not only what an editable
install happens to find."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder_of = setuptools["package-dir"]
    assert sorted(setuptools["packages"]) == sorted(folder_of)
    listed = {Path(folder) for folder in folder_of.values()}
    found = {init.parent.relative_to(ROOT) for top in ("core", "worker", "producer", "db")
             for init in (ROOT / top).rglob("__init__.py") if "__pycache__" not in init.parts}
    assert found == listed, f"not in [tool.setuptools] packages: {sorted(map(str, found - listed))}"
