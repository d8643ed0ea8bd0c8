"""A tiny planted-signal bank + cohort + ground truth for training tests (built in a second)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest


def make_planted_bank(folder: Path, n_bags: int = 30, dim: int = 8, seed: int = 0, encoder: str = "toy") -> dict:
    """Write bank.h5 / cohort.csv / cells.csv where 'sick' bags hold ~8% shifted cells."""
    from feature_cache.bank import EncoderInfo, open_writer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    info = EncoderInfo(name=encoder, version="1", weights_sha256="", transform="none", dim=dim)
    rows, cells = [], []
    with open_writer(folder / "bank.h5", info, mode="w") as w:
        for i in range(n_bags):
            label = i % 2
            n = int(rng.integers(30, 80))
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
def planted_factory():
    """The bank builder itself, for tests that need a second bank."""
    return make_planted_bank
