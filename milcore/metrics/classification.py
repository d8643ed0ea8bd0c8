"""Patient-level classification metrics of one set of predictions, and the attention instance-AUROC.

Everything is computed with vectorised numpy (checked against scikit-learn in the tests) so that a
1,000-resample bootstrap over a few hundred patients takes well under a second:
balanced accuracy, macro-F1 and per-class F1, one-vs-rest AUROC (macro over classes present),
accuracy, confusion matrix, expected calibration error (top-label, equal-width bins), the reliability
curve, the per-patient log-loss and Brier score with their class-balanced means, and how well per-cell
attention ranks the diagnostic cells (:func:`instance_auroc`).
Which of them are reported, under which label and in which direction is :data:`milcore.metrics.TABLE`.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    idx = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else float("nan")


def recall_per_class(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) recall per class (0 for a class absent from ``y_true``)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    return _safe_div(np.diag(cm), cm.sum(axis=1))


def f1_per_class(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) F1 per class (0 where a class is neither present nor predicted, as scikit-learn does)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(float)
    return _safe_div(2 * tp, cm.sum(axis=0) + cm.sum(axis=1))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean F1 over the classes present in ``y_true`` or predicted."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    seen = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(f1_per_class(y_true, y_pred, num_classes)[seen].mean()) if seen.any() else float("nan")


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC of ``score`` for the positives ``y`` (Mann-Whitney U with tie correction); NaN if one class."""
    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s), dtype=float)
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_per_class(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """(C,) one-vs-rest AUROC per class; NaN for a class absent from (or alone in) ``y_true``."""
    num_classes = proba.shape[1]
    return np.array([binary_auroc(np.asarray(y_true) == c, proba[:, c]) for c in range(num_classes)])


def macro_auroc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over classes that are present (binary: AUROC of class 1)."""
    if proba.shape[1] == 2:
        return binary_auroc(np.asarray(y_true) == 1, proba[:, 1])
    per = auroc_per_class(y_true, proba)
    return float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")


def reliability_curve(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 10) -> dict[str, list[float]]:
    """Top-label reliability: per equal-width confidence bin, mean confidence, accuracy and count."""
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == np.asarray(y_true)).astype(float)
    bins = np.clip((conf * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(float)
    mean_conf = _safe_div(np.bincount(bins, conf, minlength=n_bins), count)
    acc = _safe_div(np.bincount(bins, correct, minlength=n_bins), count)
    return {
        "bin_lower": (np.arange(n_bins) / n_bins).tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": acc.tolist(),
        "count": count.astype(int).tolist(),
    }


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE: sum over bins of |accuracy - confidence| weighted by the bin's share."""
    curve = reliability_curve(y_true, proba, n_bins)
    count = np.asarray(curve["count"], dtype=float)
    if count.sum() == 0:
        return float("nan")
    gap = np.abs(np.asarray(curve["accuracy"]) - np.asarray(curve["confidence"]))
    return float((gap * count).sum() / count.sum())


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of correct predictions (NaN for no patient)."""
    y_true = np.asarray(y_true)
    return float((np.asarray(y_pred) == y_true).mean()) if len(y_true) else float("nan")


#: Smallest true-class probability the log-loss takes (scikit-learn's clip: float64 machine epsilon), so one
#: patient given probability 0 costs 36 nats instead of infinity.
LOG_LOSS_EPS = float(np.finfo(np.float64).eps)


def log_loss_per_patient(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """(n,) ``-log p(true class)``, the probability clipped at :data:`LOG_LOSS_EPS`."""
    y_true = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=float)[np.arange(len(y_true)), y_true]
    return -np.log(np.clip(p, LOG_LOSS_EPS, 1.0))


def brier_per_patient(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """(n,) half the squared distance between the probabilities and the one-hot true class, in [0, 1].

    ``sum_k (p_k - [k = y])**2 / 2``: the multi-class Brier score scaled so that two classes give the usual
    binary ``(p_1 - y)**2`` (scikit-learn's ``brier_score_loss(..., scale_by_half=True)``).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=float)
    return ((p - np.eye(p.shape[1])[y_true]) ** 2).sum(axis=1) / 2.0


#: The true-class log-odds is clipped at plus or minus this (probabilities 0.00034 and 0.99966): one patient
#: scored with certainty cannot outweigh a group.
LOG_ODDS_CLIP = 8.0


def log_odds_per_patient(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """(n,) ``log(p / (1 - p))`` of the true class's probability p, clipped at :data:`LOG_ODDS_CLIP` (higher: surer)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=float)[np.arange(len(y_true)), y_true]
    with np.errstate(divide="ignore"):
        odds = np.log(p) - np.log1p(-p)
    return np.clip(odds, -LOG_ODDS_CLIP, LOG_ODDS_CLIP)


def class_balanced_mean(values: np.ndarray, y_true: np.ndarray, num_classes: int) -> float:
    """Mean over the classes present in ``y_true`` of the class means of ``values`` (NaN for no patient).

    The per-patient analogue of balanced accuracy: a group's value does not depend on its class mix.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    support = np.bincount(y_true, minlength=num_classes)
    sums = np.bincount(y_true, weights=np.asarray(values, dtype=float), minlength=num_classes)
    present = support > 0
    return float(np.mean(sums[present] / support[present])) if present.any() else float("nan")


def balanced_log_loss(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Class-balanced mean of the per-patient log-loss (:func:`log_loss_per_patient`)."""
    return class_balanced_mean(log_loss_per_patient(y_true, proba), y_true, np.asarray(proba).shape[1])


def balanced_brier(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Class-balanced mean of the per-patient Brier score (:func:`brier_per_patient`)."""
    return class_balanced_mean(brier_per_patient(y_true, proba), y_true, np.asarray(proba).shape[1])


def balanced_log_odds(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Class-balanced mean of the per-patient true-class log-odds (:func:`log_odds_per_patient`)."""
    return class_balanced_mean(log_odds_per_patient(y_true, proba), y_true, np.asarray(proba).shape[1])


def instance_auroc(attention: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Attention vs diagnostic cells: mean per-bag AUROC (bags with both kinds) and pooled rank AUROC.

    The pooled figure ranks cells by attention times bag size (attention is relative within a bag).

    Args:
        attention: per bag, (n,) or (n, H) attention (heads averaged).
        truth: per bag, (n,) bool: True for a diagnostic cell (:func:`milcore.data.ground_truth.load_cell_truth`).
    """
    per_bag, pooled_s, pooled_y = [], [], []
    for b, flags in truth.items():
        a = attention.get(b)
        if a is None or len(a) != len(flags) or len(a) == 0:
            continue
        a = a if a.ndim == 1 else a.mean(axis=1)
        if flags.any() and not flags.all():
            per_bag.append(binary_auroc(flags, a))
        pooled_s.append(a * len(a))
        pooled_y.append(flags)
    pooled = (binary_auroc(np.concatenate(pooled_y), np.concatenate(pooled_s)) if pooled_y else float("nan"))
    return {
        "instance_auroc": float(np.mean(per_bag)) if per_bag else float("nan"),
        "instance_auroc_pooled": pooled,
        "bags_with_ground_truth": len(per_bag),
    }
