"""Repository-wide checks: ruff-clean code and no import-time heavy dependencies in the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed in this environment")
    result = subprocess.run(
        [ruff, "check", "--no-cache", "milcore", "feature_cache", "benchmarks", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:]


def test_packages_import_without_torch() -> None:
    code = (
        "import sys, milcore, feature_cache, feature_cache.errors, feature_cache.progress, milcore.cli;"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
