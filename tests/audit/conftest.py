"""Simulated labelled predictions with a known subgroup effect, written as a run folder and a cohort table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from milcore.data.predictions import PredictionTable, write_predictions

CLASSES = ["control", "NPM1", "PML::RARA", "RUNX1::RUNX1T1"]


def simulate(n: int, seed: int, female_accuracy: float, male_accuracy: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Labels, probabilities and metadata where each sex is classified correctly at its own rate."""
    rng = np.random.default_rng(seed)
    C = len(CLASSES)
    y = rng.integers(0, C, n)
    sex = rng.choice(["F", "M"], n)
    age = np.clip(np.rint(rng.normal(58, 16, n)), 18, 95).astype(int)
    acc = np.where(sex == "F", female_accuracy, male_accuracy)
    correct = rng.random(n) < acc
    wrong = (y + rng.integers(1, C, n)) % C
    pred = np.where(correct, y, wrong)
    logits = rng.normal(0, 0.6, (n, C))
    logits[np.arange(n), pred] += 2.0
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba, {"sex": sex, "age": age, "site": rng.integers(0, 2, n)}


def write_case(folder: Path, n: int, seed: int, female_accuracy: float, male_accuracy: float) -> tuple[Path, Path]:
    """A run folder with predictions.csv and a cohort.csv beside it."""
    y, proba, meta = simulate(n, seed, female_accuracy, male_accuracy)
    ids = [f"p{i:04d}" for i in range(n)]
    run = folder / "run"
    write_predictions(run, PredictionTable(ids, CLASSES, proba, y, np.arange(n) % 5))
    cohort = folder / "cohort.csv"
    rows = zip(ids, y, meta["age"], meta["sex"], meta["site"], strict=True)
    lines = ["patient_id,aml,age,sex,site"] + [f"{b},{CLASSES[c]},{a},{s},{t}" for b, c, a, s, t in rows]
    cohort.write_text("\n".join(lines) + "\n")
    return run, cohort


@pytest.fixture(scope="session")
def audit_case():
    """The :func:`write_case` helper (a fixture, so test modules need no package imports)."""
    return write_case
