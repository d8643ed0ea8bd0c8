"""What a minimum detectable effect means in balanced-accuracy points, from the cohort's own predictions.

The primary tests may run on a per-patient score (true-class log-odds, Brier score, log-loss) whose units mean
little to a reader (balanced accuracy, the default family's other statistic, has its MDE in points directly).
To translate, the group's predictions are degraded the way a model that is less sure about a group would
degrade them: the logit of each patient's true class is lowered by the same amount ``tau``
(:func:`degrade_true_class`), which raises the score and turns some right answers wrong. The ``tau`` at
which the group's score worsens by the minimum detectable effect gives the balanced accuracy the group
would lose with it (:func:`equivalent_gap`). A bias that flips confident answers instead (rather than
shaking the model's confidence) would cost more balanced accuracy for the same score, so the figure is
what this kind of bias would cost, not a bound.
"""

from __future__ import annotations

import math

import numpy as np

from milcore.metrics import get_metric
from milcore.metrics.weighted import LabelledPredictions, weighted_metrics


def degrade_true_class(y_true: np.ndarray, proba: np.ndarray, tau: float) -> np.ndarray:
    """(n, C) probabilities with each patient's true-class logit lowered by ``tau`` (the others keep their ratios)."""
    p = np.asarray(proba, dtype=float).copy()
    rows = np.arange(len(p))
    true = p[rows, y_true]
    shrunk = true * math.exp(-tau)
    p[rows, y_true] = shrunk
    return p / (1.0 - true + shrunk)[:, None]


def _value(y: np.ndarray, proba: np.ndarray, metric: str) -> float:
    return float(weighted_metrics(LabelledPredictions(y, proba), np.ones((1, len(y))), with_auroc=False)[metric][0])


def equivalent_gap(y_true: np.ndarray, proba: np.ndarray, metric: str, effect: float,
                   target: str = "balanced_accuracy", max_tau: float = 30.0) -> float:  # fmt: skip
    """How much ``target`` worsens when the group's ``metric`` worsens by ``effect`` through lost confidence.

    Args:
        y_true: (n,) labels of the group's patients.
        proba: (n, C) their probabilities.
        metric: the tested metric (``balanced_brier``, ``balanced_log_loss``, ...).
        effect: its minimum detectable effect (how much worse, in its units).
        target: the metric to express it in.
        max_tau: the largest logit shift tried.

    Returns:
        The loss of ``target`` (positive: worse), NaN when no shift up to ``max_tau`` worsens ``metric``
        that much.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    sign = -1.0 if get_metric(metric).higher_is_better else 1.0
    base = _value(y_true, proba, metric)

    def worsened(tau: float) -> float:
        return sign * (_value(y_true, degrade_true_class(y_true, proba, tau), metric) - base)

    if not np.isfinite(effect) or worsened(max_tau) < effect:
        return math.nan
    lo, hi = 0.0, max_tau
    for _ in range(40):  # bisection: the metric worsens monotonically with tau
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if worsened(mid) < effect else (lo, mid)
    target_sign = -1.0 if get_metric(target).higher_is_better else 1.0
    return target_sign * (_value(y_true, degrade_true_class(y_true, proba, hi), target) - _value(y_true, proba, target))
