"""The package layering is a contract checked by import-linter (``.importlinter``), not a convention.

``feature_cache`` never imports ``milcore``; inside ``milcore`` a layer imports only the layers below it
(cli -> jobs (audit, bench, continual, crossval) -> prediction/explain -> training -> models -> losses ->
data -> report -> metrics -> ops), which also rules out import cycles between these packages. Imports
inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    found = str(exe) if exe.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.skip("import-linter is not installed (pip install import-linter; it is in the dev extra)")
    return found


def test_import_contracts_are_kept() -> None:
    result = subprocess.run([_lint_imports(), "--no-cache", "--no-logo", str(REPO / ".importlinter")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "broken" in result.stdout and "0 broken" in result.stdout


def test_every_milcore_package_is_in_a_layer() -> None:
    """A new top-level package or module must be placed in the layers, or the contract says nothing about it."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    layers = config["importlinter:contract:layers"]["layers"]
    named = {name.strip() for line in layers.splitlines() for name in line.split("|") if name.strip()}
    root = REPO / "milcore"
    packages = {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    present = packages | {p.stem for p in root.glob("*.py") if not p.stem.startswith("_")}
    assert present - named == set(), f"milcore packages missing from .importlinter's layers: {present - named}"
