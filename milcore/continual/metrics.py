"""Continual-learning metrics from an accuracy matrix ``R`` (``R[i, j]``: task ``i`` after training task ``j``).

Definitions (Lopez-Paz and Ranzato 2017, "Gradient Episodic Memory"; Chaudhry et al. 2018, "Riemannian
Walk"): with ``T`` tasks,

- average accuracy ``A = mean_i R[i, T-1]``, and its curve ``A_j = mean_{i<=j} R[i, j]``;
- average forgetting ``F = mean_{i<T-1} (max_{i<=l<T-1} R[i, l] - R[i, T-1])``;
- backward transfer ``BWT = mean_{i<T-1} (R[i, T-1] - R[i, i])``;
- forward transfer ``FWT = mean_{i>0} (R[i, i-1] - b_i)`` with ``b_i`` the untrained model's accuracy on
  task ``i``; undefined (``None``) when a task cannot be evaluated before it is trained (new classes).

Entries a scenario cannot measure are NaN. Each entry is a balanced accuracy: the mean recall over
the task's own classes, predicting among every class seen so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def task_balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[int]) -> float:
    """Mean recall over ``classes`` (the task's classes; predictions may be any seen class)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in classes if np.any(y_true == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> list[float]:
    """(C,) recall per class (NaN for a class without samples)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return [float(np.mean(y_pred[y_true == c] == c)) if np.any(y_true == c) else float("nan")
            for c in range(num_classes)]  # fmt: skip


def _none(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def average_accuracy(r: np.ndarray) -> float:
    """Mean accuracy over all tasks after the last task."""
    return float(np.nanmean(np.asarray(r, dtype=float)[:, -1]))


def accuracy_curve(r: np.ndarray) -> list[float]:
    """``A_j``: mean accuracy over the tasks seen so far, after each task ``j``."""
    r = np.asarray(r, dtype=float)
    return [float(np.nanmean(r[: j + 1, j])) for j in range(r.shape[1])]


def average_forgetting(r: np.ndarray) -> float:
    """Mean drop from each earlier task's best accuracy to its final accuracy (0 with one task)."""
    r = np.asarray(r, dtype=float)
    t = r.shape[0]
    if t < 2:
        return 0.0
    drops = [np.nanmax(r[i, i : t - 1]) - r[i, t - 1] for i in range(t - 1)]
    return float(np.nanmean(drops))


def backward_transfer(r: np.ndarray) -> float:
    """Mean change of earlier tasks' accuracy between just after training them and the end."""
    r = np.asarray(r, dtype=float)
    t = r.shape[0]
    if t < 2:
        return 0.0
    return float(np.nanmean([r[i, t - 1] - r[i, i] for i in range(t - 1)]))


def forward_transfer(r: np.ndarray, baseline: Sequence[float]) -> float | None:
    """Mean accuracy on each task before training it, above an untrained model's (None if unmeasurable)."""
    r = np.asarray(r, dtype=float)
    t = r.shape[0]
    if t < 2:
        return None
    gains = [r[i, i - 1] - float(baseline[i]) for i in range(1, t)]
    return None if not all(np.isfinite(gains)) else float(np.mean(gains))


def summarize(r: np.ndarray, baseline: Sequence[float]) -> dict[str, Any]:
    """All stream metrics of one accuracy matrix."""
    return {
        "average_accuracy": average_accuracy(r),
        "average_forgetting": average_forgetting(r),
        "backward_transfer": backward_transfer(r),
        "forward_transfer": forward_transfer(r, baseline),
        "accuracy_curve": accuracy_curve(r),
        "accuracy_matrix": [[_none(v) for v in row] for row in np.asarray(r, dtype=float)],
    }
