"""A small planted-signal stream bank (classes, sites, dates) for the continual tests, built in a second."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np
import pytest


def make_stream_bank(folder: Path, classes: int = 4, per_class: int = 12, sites: int = 2, dim: int = 8,
                     size: tuple[int, int] = (40, 80), rate: float = 0.1, seed: int = 0) -> dict:  # fmt: skip
    """Write bank.h5 + cohort.csv: class ``c``'s bags hold ``rate`` witness cells shifted along feature ``c``.

    Sites add a constant offset to every cell of their bags (a staining shift); dates spread over a year.
    """
    from feature_cache.bank import EncoderInfo, open_writer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    info = EncoderInfo(name="toy", version="1", weights_sha256="", transform="none", dim=dim)
    rows = []
    with open_writer(folder / "bank.h5", info, mode="w") as w:
        for i in range(classes * per_class):
            label, site = i % classes, (i // classes) % sites
            n = int(rng.integers(*size))
            x = rng.normal(size=(n, dim)).astype(np.float32)
            k = max(2, int(rate * n))
            x[:k, label % dim] += 4.0
            x += 1.5 * site * (np.arange(dim) % 2)
            x = x[rng.permutation(n)]
            bag = f"b{i:04d}"
            w.append(bag, x, cell_id=np.arange(n))
            date = dt.date(2024, 1, 1) + dt.timedelta(days=int(i * 365 / (classes * per_class)))
            rows.append([bag, f"c{label}", site, date.isoformat()])
    with open(folder / "cohort.csv", "w", newline="") as f:
        csv.writer(f).writerows([["bag_id", "dx", "site", "date"], *rows])
    return {"bank": folder / "bank.h5", "cohort": folder / "cohort.csv"}


@pytest.fixture(scope="session")
def stream_bank(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four classes, two sites, 48 bags."""
    return make_stream_bank(tmp_path_factory.mktemp("stream"))


def stream_config(bank: dict, **overrides) -> dict:
    """A fast class-incremental configuration over :func:`make_stream_bank` (2 tasks of 2 classes)."""
    config = {
        "name": "test",
        "data": {"bank": str(bank["bank"]), "cohort": str(bank["cohort"]), "label": "dx"},
        "scenario": {"kind": "class_incremental", "tasks": [["c0", "c1"], ["c2", "c3"]], "test_fraction": 0.3},
        "model": {"name": "abmil", "args": {"embed_dim": 16, "attention_dim": 8}},
        "train": {"epochs": 4, "lr": 0.005, "batch_instances": 256, "device": "cpu"},
        "memory": {"budget": 200, "per_bag": 10},
        "strategies": {"finetune": {}, "milreplay": {}},
        "seeds": [0],
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def make_config():
    """:func:`stream_config` itself."""
    return stream_config


@pytest.fixture(scope="session")
def stream_bank_factory():
    """:func:`make_stream_bank` itself, for tests that need a second bank."""
    return make_stream_bank
