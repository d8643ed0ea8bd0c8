"""Metrics against scikit-learn, bootstrap CI coverage, calibration."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from milcore.metrics import aggregate_folds, bootstrap_ci
from milcore.metrics.calibration import fit_temperature, softmax
from milcore.metrics.classification import (
    balanced_accuracy,
    binary_auroc,
    confusion_matrix,
    expected_calibration_error,
    f1_per_class,
    macro_auroc,
    macro_f1,
)
from milcore.metrics.table import SCALAR_METRICS
from milcore.report.evaluation import evaluate


def _random_case(seed: int, n: int = 200, c: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    return y, softmax(logits)


@pytest.mark.parametrize("seed", range(5))
def test_against_scikit_learn(seed: int) -> None:
    y, p = _random_case(seed)
    pred = p.argmax(1)
    assert balanced_accuracy(y, pred, 4) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert macro_f1(y, pred, 4) == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert np.allclose(f1_per_class(y, pred, 4), skm.f1_score(y, pred, average=None, labels=range(4)))
    assert np.array_equal(confusion_matrix(y, pred, 4), skm.confusion_matrix(y, pred, labels=range(4)))
    assert macro_auroc(y, p) == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_binary_auroc_with_ties_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # many ties
    assert binary_auroc(y == 1, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert np.isnan(binary_auroc(np.ones(5, bool), np.arange(5.0)))


def test_binary_task_uses_the_positive_column() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    assert macro_auroc(y, p) == pytest.approx(1.0)


def test_ece_hand_computed() -> None:
    # two bins used: conf 0.95 (2 samples, 1 correct) and 0.65 (2 samples, both correct)
    p = np.array([[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.35, 0.65]])
    y = np.array([0, 1, 0, 1])
    expected = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.65)
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(expected)


def test_bootstrap_ci_covers_the_truth_at_the_nominal_rate() -> None:
    # a classifier with true accuracy 0.8: the 95% CI of accuracy should cover 0.8 in ~95% of samples
    covered = 0
    trials = 60
    for t in range(trials):
        rng = np.random.default_rng(100 + t)
        y = rng.integers(0, 2, 150)
        correct = rng.random(150) < 0.8
        pred = np.where(correct, y, 1 - y)
        p = np.stack([1 - pred, pred], 1).astype(float) * 0.8 + 0.1
        lo, hi = bootstrap_ci(y, p, n_boot=300, seed=t)["accuracy"]
        covered += lo <= 0.8 <= hi
    assert covered / trials >= 0.85


def test_evaluate_report_shape() -> None:
    y, p = _random_case(1)
    report = evaluate(y, p, ["a", "b", "c", "d"], n_boot=50)
    # the report holds exactly the metric table's scalar metrics (issue 19 added the class-balanced per-patient
    # log-loss and Brier score), each with its value inside its bootstrap CI
    assert tuple(report["metrics"]) == SCALAR_METRICS
    assert {"balanced_accuracy", "macro_f1", "auroc", "accuracy", "ece", "balanced_log_loss",
            "balanced_brier"} <= set(SCALAR_METRICS)  # fmt: skip
    for name, entry in report["metrics"].items():
        lo, hi = entry["ci95"]
        assert lo <= entry["value"] <= hi, name
    # the new ones against scikit-learn with class-balancing weights (each class weighs 1/C in all)
    w = 1.0 / np.bincount(y, minlength=4)[y]
    assert report["metrics"]["balanced_log_loss"]["value"] == pytest.approx(
        skm.log_loss(y, p, labels=[0, 1, 2, 3], sample_weight=w))
    onehot = np.eye(4)[y]
    assert report["metrics"]["balanced_brier"]["value"] == pytest.approx(
        np.average(((p - onehot) ** 2).sum(1) / 2, weights=w))
    assert report["per_class"]["a"]["support"] == int((y == 0).sum())
    assert sum(report["reliability"]["count"]) == len(y)


def test_aggregate_folds_mean_sd() -> None:
    agg = aggregate_folds([{"auroc": 0.8, "ece": 0.1}, {"auroc": 0.9, "ece": float("nan")}, {"auroc": 1.0}])
    assert agg["auroc"]["mean"] == pytest.approx(0.9) and agg["auroc"]["sd"] == pytest.approx(0.1)
    assert agg["ece"]["mean"] == pytest.approx(0.1) and agg["ece"]["sd"] == 0.0


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 3)) * 2
    y = np.array([rng.choice(3, p=row) for row in softmax(true_logits)])
    t = fit_temperature(true_logits * 3.0, y)  # over-confident by 3x
    assert t == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(y, softmax(true_logits * 3.0))
    after = expected_calibration_error(y, softmax(true_logits * 3.0, t))
    assert after < before
