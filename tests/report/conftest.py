"""Tiny banks for the honest-report tests: a learnable one and one whose labels are shuffled (chance)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest


def make_report_bank(folder: Path, n_bags: int = 40, classes: tuple[str, ...] = ("control", "sick"),
                     signal: bool = True, seed: int = 0, dim: int = 6) -> dict:  # fmt: skip
    """bank.h5 + cohort.csv (``patient_id, dx, sex, age``); with ``signal`` class k > 0 bags hold cells
    shifted along feature k - 1, without it the features are noise and the labels a shuffled rotation."""
    from feature_cache.bank import EncoderInfo, open_writer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    info = EncoderInfo(name="toy", version="1", weights_sha256="", transform="none", dim=dim)
    labels = np.arange(n_bags) % len(classes)
    if not signal:
        labels = rng.permutation(labels)
    rows = []
    with open_writer(folder / "bank.h5", info, mode="w") as w:
        for i in range(n_bags):
            n = int(rng.integers(15, 30))
            x = rng.normal(size=(n, dim)).astype(np.float32)
            if signal and labels[i]:
                x[: max(3, n // 5), int(labels[i]) - 1] += 4.0
            bag = f"p{i:03d}"
            w.append(bag, x)
            rows.append([bag, classes[labels[i]], "F" if i % 4 < 2 else "M", 30 + i])
    with open(folder / "cohort.csv", "w", newline="") as f:
        csv.writer(f).writerows([["patient_id", "dx", "sex", "age"], *rows])
    return {"bank": folder / "bank.h5", "cohort": folder / "cohort.csv"}


@pytest.fixture(scope="session")
def report_bank_factory():
    """The bank builder (a fixture, so test modules need no import from this folder)."""
    return make_report_bank
