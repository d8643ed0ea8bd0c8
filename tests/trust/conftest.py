"""A tiny planted bank and a finished 3-fold ABMIL run with dropout on it, shared by the trust-layer tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FAST = {"epochs": 3, "patience": 3, "min_epochs": 1, "lr": 2e-3, "batch_instances": 256, "num_workers": 0,
        "device": "cpu"}  # fmt: skip


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory, planted_factory) -> dict:
    """18 bags (control / sick), 20-40 cells each, 8-d toy features."""
    return planted_factory(tmp_path_factory.mktemp("trust_planted"), n_bags=18, sizes=(20, 40))


@pytest.fixture(scope="session")
def dropout_run(planted: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-fold ABMIL run with dropout 0.25 (never modified by tests: copy it first)."""
    from milcore.crossval import train_run
    from milcore.training.config import RunSpec, TrainConfig

    out = tmp_path_factory.mktemp("trust_run") / "abmil"
    spec = RunSpec(str(planted["bank"]), str(planted["cohort"]), "dx", folds=3, n_boot=50)
    train_run(spec, TrainConfig(model="abmil", model_args={"dropout": 0.25}, **FAST), out)
    return out


@pytest.fixture
def run_copy(dropout_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run that a test may change."""
    dst = tmp_path / "run"
    shutil.copytree(dropout_run, dst)
    return dst


@pytest.fixture(scope="session")
def fast() -> dict:
    """Training options for a run of a few seconds."""
    return dict(FAST)


@pytest.fixture(scope="session")
def plain_run(planted: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-fold mean-pooling run: a model without dropout (never modified by tests)."""
    from milcore.crossval import train_run
    from milcore.training.config import RunSpec, TrainConfig

    out = tmp_path_factory.mktemp("trust_plain") / "mean"
    train_run(RunSpec(str(planted["bank"]), str(planted["cohort"]), "dx", folds=3, n_boot=20),
              TrainConfig(model="mean", **FAST), out)  # fmt: skip
    return out
