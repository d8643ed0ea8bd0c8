"""The evaluation of one set of labelled predictions, as ``metrics.json`` holds it: metrics with CIs and caveats.

Used by the cross-validated run (pooled out-of-fold predictions) and by ``predict`` (a labelled
external cohort), so both files have one layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from milcore.metrics.classification import (
    auroc_per_class,
    confusion_matrix,
    f1_per_class,
    recall_per_class,
    reliability_curve,
)
from milcore.metrics.intervals import bootstrap_ci
from milcore.metrics.table import scalar_metrics


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
    recall = recall_per_class(y_true, y_pred, num_classes)
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
