"""A tiny three-class planted bank with a site column and cell ground truth (built in well under a second)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

CLASSES = ("control", "type_a", "type_b")


def make_bench_bank(folder: Path, n_bags: int = 48, dim: int = 8, seed: int = 0) -> dict:
    """bank.h5 / cohort.csv / cells.csv: class k > 0 bags hold ~10% cells shifted along feature k - 1.

    Every fourth bag is from site 1 (its features offset a little), the rest from site 0.
    """
    from feature_cache.bank import EncoderInfo, open_writer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    info = EncoderInfo(name="toy", version="1", weights_sha256="", transform="none", dim=dim)
    rows, cells = [], []
    with open_writer(folder / "bank.h5", info, mode="w") as w:
        for i in range(n_bags):
            label, site = i % 3, int(i % 4 == 3)
            n = int(rng.integers(20, 50))
            x = rng.normal(size=(n, dim)).astype(np.float32) + 0.3 * site
            diag = np.zeros(n, dtype=bool)
            if label:
                k = max(2, n // 10)
                diag[:k] = True
                x[:k, label - 1] += 6.0
            perm = rng.permutation(n)
            x, diag = x[perm], diag[perm]
            bag = f"p{i:03d}"
            w.append(bag, x, cell_id=np.arange(n))
            rows.append([bag, CLASSES[label], site])
            cells += [[bag, j, int(diag[j])] for j in range(n)]
    with open(folder / "cohort.csv", "w", newline="") as f:
        csv.writer(f).writerows([["patient_id", "dx", "site"], *rows])
    with open(folder / "cells.csv", "w", newline="") as f:
        csv.writer(f).writerows([["patient_id", "cell_id", "is_diagnostic"], *cells])
    return {"bank": folder / "bank.h5", "cohort": folder / "cohort.csv", "cells": folder / "cells.csv"}


@pytest.fixture(scope="session")
def bench_bank(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The planted three-class bank, built once per session."""
    return make_bench_bank(tmp_path_factory.mktemp("bench_bank"))
