"""Patient-level classification metrics with bootstrap confidence intervals.

Everything is computed with vectorised numpy (checked against scikit-learn in the tests) so that a
1,000-resample bootstrap over a few hundred patients takes well under a second:
balanced accuracy, macro-F1 and per-class F1, one-vs-rest AUROC (macro over classes present),
accuracy, confusion matrix, expected calibration error (top-label, equal-width bins) and the
reliability curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

SCALAR_METRICS = ("balanced_accuracy", "macro_f1", "auroc", "accuracy", "ece")


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


def scalar_metrics(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 10) -> dict[str, float]:
    """The headline metrics of one set of predictions."""
    y_true = np.asarray(y_true, dtype=np.int64)
    num_classes = proba.shape[1]
    y_pred = proba.argmax(axis=1)
    return {
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, num_classes),
        "macro_f1": macro_f1(y_true, y_pred, num_classes),
        "auroc": macro_auroc(y_true, proba),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "ece": expected_calibration_error(y_true, proba, n_bins),
    }


def bootstrap_ci(
    y_true: np.ndarray,
    proba: np.ndarray,
    fn: Callable[[np.ndarray, np.ndarray], dict[str, float]] = scalar_metrics,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    strata: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of every metric ``fn`` returns, resampling patients with replacement.

    Args:
        y_true: (n,) labels.
        proba: (n, C) probabilities.
        fn: metrics of one resample.
        n_boot: number of resamples.
        alpha: 1 - confidence level.
        seed: random seed.
        strata: (n,) optional groups resampled separately (keeps class or subgroup sizes fixed).

    Returns:
        ``{metric: (low, high)}``; NaN bounds where a metric is undefined in most resamples.
    """
    rng = np.random.default_rng(seed)
    n = len(y_true)
    if n == 0:
        return {}
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == g) for g in np.unique(strata)]
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        for k, v in fn(y_true[idx], proba[idx]).items():
            samples.setdefault(k, []).append(v)
    out = {}
    for k, values in samples.items():
        arr = np.asarray(values, dtype=float)
        arr = arr[np.isfinite(arr)]
        if len(arr) < n_boot / 2:
            out[k] = (float("nan"), float("nan"))
        else:
            out[k] = (float(np.quantile(arr, alpha / 2)), float(np.quantile(arr, 1 - alpha / 2)))
    return out


def evaluate(
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
) -> dict:
    """Full report of one set of predictions: metrics with 95% CIs, per-class F1/AUROC, confusion, reliability.

    ``warnings`` lists what makes the result unfit for a decision (at chance, a single predicted class,
    a wide CI, small classes: :mod:`milcore.report.caveats`).
    """
    from milcore.report.caveats import chance_classes, class_size_warnings, headline_warnings, prediction_warnings

    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=float)
    num_classes = len(classes)
    y_pred = proba.argmax(axis=1)
    point = scalar_metrics(y_true, proba, n_bins)
    support = np.bincount(y_true, minlength=num_classes)
    recall = _safe_div(np.diag(confusion_matrix(y_true, y_pred, num_classes)), support)
    ci = bootstrap_ci(y_true, proba, lambda a, b: scalar_metrics(a, b, n_bins), n_boot=n_boot, seed=seed)
    metrics = {k: {"value": v, "ci95": list(ci.get(k, (math.nan, math.nan)))} for k, v in point.items()}
    cm = confusion_matrix(y_true, y_pred, num_classes)
    warnings = (headline_warnings(metrics, chance_classes(support, num_classes)) + prediction_warnings(cm, classes)
                + class_size_warnings({c: int(s) for c, s in zip(classes, support, strict=True) if s > 0}))
    return {
        "n": len(y_true),
        "metrics": metrics,
        "per_class": {
            c: {
                "f1": float(f),
                "auroc": float(a),
                "recall": float(r),
                "support": int(s),
            }
            for c, f, a, r, s in zip(
                classes,
                f1_per_class(y_true, y_pred, num_classes),
                auroc_per_class(y_true, proba),
                recall,
                support,
                strict=True,
            )
        },
        "confusion_matrix": cm.tolist(),
        "reliability": reliability_curve(y_true, proba, n_bins),
        "warnings": warnings,
    }


def aggregate_folds(fold_metrics: Sequence[dict[str, float]]) -> dict[str, dict[str, float | list[float]]]:
    """Mean ± sd (ddof=1) of each scalar metric over folds (and seeds), NaNs ignored."""
    names = sorted({k for m in fold_metrics for k in m})
    out: dict[str, dict[str, float | list[float]]] = {}
    for k in names:
        values = np.asarray([m.get(k, math.nan) for m in fold_metrics], dtype=float)
        finite = values[np.isfinite(values)]
        out[k] = {
            "mean": float(finite.mean()) if len(finite) else math.nan,
            "sd": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0 if len(finite) else math.nan,
            "values": values.tolist(),
        }
    return out
