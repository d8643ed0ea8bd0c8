"""A tiny planted-signal bank and a finished 3-fold run on it, shared by the predict/explain/checkpoint tests.

The bank comes from ``make_planted_bank`` in ``tests/conftest.py`` (the ``planted_factory`` fixture).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FAST = {"epochs": 2, "patience": 2, "min_epochs": 1, "lr": 2e-3, "batch_instances": 256}


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory, planted_factory) -> dict:
    """The planted bank, built once per session."""
    return planted_factory(tmp_path_factory.mktemp("planted"), n_bags=18, sizes=(20, 40))


@pytest.fixture(scope="session")
def finished_run(planted: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-fold ABMIL run on the planted bank (never modified by tests: copy it first)."""
    from milcore.crossval import train_run
    from milcore.training.config import RunSpec, TrainConfig

    out = tmp_path_factory.mktemp("run") / "abmil"
    spec = RunSpec(str(planted["bank"]), str(planted["cohort"]), "dx", folds=3, n_boot=50)
    train_run(spec, TrainConfig(model="abmil", **FAST), out)
    return out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run that a test may damage."""
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst

