"""A tiny planted-signal bank and a finished 3-fold run on it, shared by the predict/explain/checkpoint tests.

``make_planted_bank`` is a copy of the training tests' builder (tests/training/conftest.py) so that this
folder does not depend on another test package's fixtures.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

FAST = {"epochs": 2, "patience": 2, "min_epochs": 1, "lr": 2e-3, "batch_instances": 256}


def make_planted_bank(folder: Path, n_bags: int = 18, dim: int = 8, seed: int = 0, encoder: str = "toy") -> dict:
    """Write bank.h5 / cohort.csv / cells.csv where 'sick' bags hold ~8% shifted cells."""
    from feature_cache.bank import EncoderInfo, open_writer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    info = EncoderInfo(name=encoder, version="1", weights_sha256="", transform="none", dim=dim)
    rows, cells = [], []
    with open_writer(folder / "bank.h5", info, mode="w") as w:
        for i in range(n_bags):
            label = i % 2
            n = int(rng.integers(20, 40))
            x = rng.normal(size=(n, dim)).astype(np.float32)
            diag = np.zeros(n, dtype=bool)
            if label:
                k = max(2, n // 12)
                diag[:k] = True
                x[:k, 0] += 5.0
            perm = rng.permutation(n)
            x, diag = x[perm], diag[perm]
            bag = f"p{i:03d}"
            w.append(bag, x, cell_id=np.arange(n))
            rows.append([bag, ["control", "sick"][label], "F" if i % 4 < 2 else "M", 30 + i])
            cells += [[bag, j, int(diag[j])] for j in range(n)]
    with open(folder / "cohort.csv", "w", newline="") as f:
        csv.writer(f).writerows([["patient_id", "dx", "sex", "age"], *rows])
    with open(folder / "cells.csv", "w", newline="") as f:
        csv.writer(f).writerows([["patient_id", "cell_id", "is_diagnostic"], *cells])
    return {"bank": folder / "bank.h5", "cohort": folder / "cohort.csv", "cells": folder / "cells.csv"}


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The planted bank, built once per session."""
    return make_planted_bank(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="session")
def finished_run(planted: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-fold ABMIL run on the planted bank (never modified by tests: copy it first)."""
    from milcore.training.config import TrainConfig
    from milcore.training.run import RunSpec, train_cv

    out = tmp_path_factory.mktemp("run") / "abmil"
    spec = RunSpec(str(planted["bank"]), str(planted["cohort"]), "dx", folds=3, n_boot=50)
    train_cv(spec, TrainConfig(model="abmil", **FAST), out)
    return out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run that a test may damage."""
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


@pytest.fixture(scope="session")
def planted_factory():
    """The bank builder itself, for tests that need a second bank."""
    return make_planted_bank
