"""The per-patient log-loss and Brier score of the metric table: against scikit-learn, and group-weighted."""

from __future__ import annotations

import numpy as np
import pytest

from milcore import metrics
from milcore.metrics import classification as cl
from milcore.metrics.weighted import LabelledPredictions, weighted_metrics


def _case(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    proba = rng.dirichlet(np.ones(c), n)
    proba[np.arange(n), y] += rng.random(n)
    return y, proba / proba.sum(1, keepdims=True)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_class_balanced_log_loss_and_brier_equal_sklearn_with_class_weights(num_classes: int) -> None:
    from sklearn.metrics import brier_score_loss, log_loss

    y, proba = _case(150, num_classes, num_classes)
    weight = 1.0 / np.bincount(y, minlength=num_classes)[y]  # every class weighs the same: class-balanced
    labels = list(range(num_classes))
    assert cl.balanced_log_loss(y, proba) == pytest.approx(log_loss(y, proba, sample_weight=weight, labels=labels))
    assert cl.balanced_brier(y, proba) == pytest.approx(
        brier_score_loss(y, proba if num_classes > 2 else proba[:, 1], sample_weight=weight, labels=labels,
                         scale_by_half=True))  # fmt: skip
    # per patient: unweighted means are scikit-learn's plain scores
    assert cl.log_loss_per_patient(y, proba).mean() == pytest.approx(log_loss(y, proba, labels=labels))


def test_per_patient_scores_by_hand() -> None:
    y = np.array([0, 1, 1])
    proba = np.array([[0.8, 0.2], [0.5, 0.5], [1.0, 0.0]])
    assert cl.brier_per_patient(y, proba).tolist() == pytest.approx([0.04, 0.25, 1.0])
    ll = cl.log_loss_per_patient(y, proba)
    assert ll[:2].tolist() == pytest.approx([-np.log(0.8), np.log(2)])
    assert ll[2] == pytest.approx(-np.log(cl.LOG_LOSS_EPS))  # a probability of 0 costs 36 nats, not infinity
    # class-balanced: class 0 mean 0.04, class 1 mean (0.25 + 1) / 2 -> (0.04 + 0.625) / 2
    assert cl.balanced_brier(y, proba) == pytest.approx((0.04 + 0.625) / 2)


def test_weighted_forms_equal_point_forms_on_groups_and_resamples() -> None:
    y, proba = _case(90, 4, 7)
    pred = LabelledPredictions(y, proba)
    rng = np.random.default_rng(0)
    masks = (rng.random((4, 90)) < 0.4).astype(float)
    counts = rng.multinomial(90, np.full(90, 1 / 90), size=3).astype(float)
    got = weighted_metrics(pred, np.concatenate([masks, counts]), with_auroc=False)
    for r, w in enumerate(np.concatenate([masks, counts])):
        idx = np.repeat(np.arange(90), w.astype(int))
        assert got["balanced_log_loss"][r] == pytest.approx(cl.balanced_log_loss(y[idx], proba[idx]), abs=1e-12)
        assert got["balanced_brier"][r] == pytest.approx(cl.balanced_brier(y[idx], proba[idx]), abs=1e-12)


def test_table_rows() -> None:
    for name in ("balanced_log_loss", "balanced_brier"):
        m = metrics.get_metric(name)
        assert not m.higher_is_better and name in metrics.GROUP_METRICS and name in metrics.SCALAR_METRICS
    assert metrics.get_metric("balanced_log_loss").worst == np.inf
    assert metrics.get_metric("balanced_brier").worst == 1.0 and metrics.get_metric("auroc").worst == 0.0
    assert metrics.label("balanced_brier", short=True) == "bal. Brier"


def test_class_balanced_log_odds_by_hand_and_against_scipy() -> None:
    """The true-class log-odds (issue 19, round 3): scipy's logit of the true class's probability, clipped at
    +-8, class-balanced; its group-weighted form equals the point form; higher is better."""
    from scipy.special import logit

    y = np.array([0, 1, 1])
    proba = np.array([[0.8, 0.2], [0.5, 0.5], [1.0, 0.0]])
    lo = cl.log_odds_per_patient(y, proba)
    assert lo.tolist() == pytest.approx([np.log(4), 0.0, -cl.LOG_ODDS_CLIP])  # p = 0: clipped, not -infinity
    assert cl.balanced_log_odds(y, proba) == pytest.approx((np.log(4) + (0.0 - 8.0) / 2) / 2)
    y, proba = _case(120, 5, 3)
    true = proba[np.arange(120), y]
    weight = 1.0 / np.bincount(y, minlength=5)[y]
    assert cl.balanced_log_odds(y, proba) == pytest.approx(np.average(np.clip(logit(true), -8, 8), weights=weight))
    pred = LabelledPredictions(y, proba)
    masks = (np.random.default_rng(1).random((3, 120)) < 0.5).astype(float)
    got = weighted_metrics(pred, masks, with_auroc=False)["balanced_log_odds"]
    for r, w in enumerate(masks):
        assert got[r] == pytest.approx(cl.balanced_log_odds(y[w > 0], proba[w > 0]), abs=1e-12)
    m = metrics.get_metric("balanced_log_odds")
    assert m.higher_is_better and m.worst == -cl.LOG_ODDS_CLIP and "balanced_log_odds" in metrics.GROUP_METRICS
