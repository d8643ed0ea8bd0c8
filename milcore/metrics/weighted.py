"""Per-group classification metrics computed for many weightings of the patients at once.

Every metric of the audit is a function of weighted sums over patients, so one (R, n) weight matrix
``W`` evaluates R groups, bootstrap resamples (multiplicity counts) or permuted groups (0/1 masks) in
a few matrix products:

- counts (:func:`weighted_counts`): ``W @ onehot(y)``, ``W @ onehot(pred)``, ``W @ (onehot(y) * correct)``
  give per-class support, predictions and true positives, hence recall (TPR), FPR, selection rate,
  balanced accuracy and macro-F1 exactly as :mod:`milcore.metrics.classification` defines them;
- ECE: ``W @ (bin one-hot * (correct - confidence))`` per equal-width confidence bin;
- per-patient scores (log-loss, Brier score, true-class log-odds): ``W @ (onehot(y) * score)`` per class, whose
  means over the classes present are the class-balanced log-loss, Brier score and log-odds;
- AUROC: the weighted Mann-Whitney statistic: in score order, each positive's weight times the cumulative
  weight of the negatives below it (plus half the tied ones), per class (one vs rest, macro over the
  classes present), O(R n) after one sort per class.

Why not fairlearn's ``MetricFrame``: it evaluates the metric callables group by group through pandas,
which is right for one table of point estimates but takes milliseconds per group and call; the audit
needs the same metrics for thousands of bootstrap resamples and permutations per group (a few seconds
here versus minutes). The tests check these values against ``MetricFrame`` and fairlearn's
equalized-odds and demographic-parity differences where fairlearn is installed.

Each metric's group-weighted function is named in :data:`milcore.metrics.TABLE` (``weighted``), beside
its one-set function, so the audit and the training report read one list of metrics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from milcore.metrics.classification import brier_per_patient, log_loss_per_patient, log_odds_per_patient


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


@dataclass
class LabelledPredictions:
    """Labelled predictions with everything the weighted metrics need precomputed (one-hots, bins, ranks).

    Args:
        y_true: (n,) int labels.
        proba: (n, C) probabilities.
        n_bins: equal-width confidence bins of the ECE.
    """

    y_true: np.ndarray
    proba: np.ndarray
    n_bins: int = 10

    def __post_init__(self) -> None:
        self.y_true = np.asarray(self.y_true, dtype=np.int64)
        self.proba = np.asarray(self.proba, dtype=float)
        n, c = self.proba.shape
        self.num_classes = c
        self.y_pred = self.proba.argmax(axis=1)
        eye = np.eye(c)
        self.onehot_true = eye[self.y_true]  # (n, C)
        self.onehot_pred = eye[self.y_pred]  # (n, C)
        self.correct = (self.y_pred == self.y_true).astype(float)  # (n,)
        conf = self.proba.max(axis=1)
        bins = np.clip((conf * self.n_bins).astype(int), 0, self.n_bins - 1)
        self.calib = np.eye(self.n_bins)[bins] * (self.correct - conf)[:, None]  # (n, bins)
        self.log_loss = log_loss_per_patient(self.y_true, self.proba)  # (n,)
        self.brier = brier_per_patient(self.y_true, self.proba)  # (n,)
        self.log_odds = log_odds_per_patient(self.y_true, self.proba)  # (n,)
        self.ranks = []  # per class: score order, and each position's tie-group start and end (exclusive)
        for k in range(c):
            order = np.argsort(self.proba[:, k], kind="mergesort")
            s = self.proba[order, k]
            new = np.concatenate(([True], s[1:] != s[:-1]))
            group = np.cumsum(new) - 1
            starts = np.flatnonzero(new)
            ends = np.concatenate((starts[1:], [n]))
            self.ranks.append((order, starts[group], ends[group]))

    def __len__(self) -> int:
        return len(self.y_true)


@dataclass
class WeightedCounts:
    """Per-class weighted counts of R weightings of the same patients (what most metrics are ratios of).

    Attributes:
        W: (R, n) weights.
        total: (R,) weight of all patients.
        support: (R, C) weight of each true class.
        predicted: (R, C) weight of each predicted class.
        tp: (R, C) weight of the correctly predicted patients of each class.
    """

    W: np.ndarray
    total: np.ndarray
    support: np.ndarray
    predicted: np.ndarray
    tp: np.ndarray

    @property
    def negatives(self) -> np.ndarray:
        """(R, C) weight of the patients not of each class."""
        return self.total[:, None] - self.support


def weighted_counts(pred: LabelledPredictions, W: np.ndarray) -> WeightedCounts:
    """The counts of each row of the (R, n) weight matrix ``W`` (masks, bootstrap multiplicities)."""
    W = np.atleast_2d(np.asarray(W, dtype=float))  # (R, n)
    return WeightedCounts(W, W.sum(axis=1), W @ pred.onehot_true, W @ pred.onehot_pred,
                          W @ (pred.onehot_true * pred.correct[:, None]))  # fmt: skip


def weighted_recall(pred: LabelledPredictions, c: WeightedCounts) -> np.ndarray:
    """(R, C) recall (TPR) per class; NaN for a class absent from a row."""
    return _div(c.tp, c.support)


def weighted_fpr(pred: LabelledPredictions, c: WeightedCounts) -> np.ndarray:
    """(R, C) false-positive rate per class (one vs rest)."""
    return _div(c.predicted - c.tp, c.negatives)


def weighted_selection_rate(pred: LabelledPredictions, c: WeightedCounts) -> np.ndarray:
    """(R, C) share of the patients predicted as each class."""
    return _div(c.predicted, np.repeat(c.total[:, None], pred.num_classes, axis=1))


def weighted_balanced_accuracy(pred: LabelledPredictions, c: WeightedCounts) -> np.ndarray:
    """(R,) mean recall over the classes present in each row."""
    present = c.support > 0
    with np.errstate(invalid="ignore"):
        return np.where(present.any(1), np.nansum(np.where(present, weighted_recall(pred, c), 0.0), 1)
                        / np.maximum(present.sum(1), 1), np.nan)  # fmt: skip


def weighted_macro_f1(pred: LabelledPredictions, c: WeightedCounts) -> np.ndarray:
    """(R,) mean F1 over the classes present or predicted in each row."""
    with np.errstate(invalid="ignore"):
        seen = (c.support + c.predicted) > 0
        f1 = np.where(seen, 2 * c.tp / np.where(seen, c.support + c.predicted, 1), 0.0)
        return np.where(seen.any(1), (f1 * seen).sum(1) / np.maximum(seen.sum(1), 1), np.nan)


def weighted_ece(pred: LabelledPredictions, c: WeightedCounts) -> np.ndarray:
    """(R,) top-label expected calibration error (equal-width bins)."""
    with np.errstate(invalid="ignore"):
        return np.where(c.total > 0, np.abs(c.W @ pred.calib).sum(1) / np.where(c.total > 0, c.total, 1), np.nan)


def weighted_class_balanced_mean(pred: LabelledPredictions, c: WeightedCounts, values: np.ndarray) -> np.ndarray:
    """(R,) mean over the classes present in each row of the class means of the per-patient ``values`` (n,)."""
    means = _div(c.W @ (pred.onehot_true * values[:, None]), c.support)  # (R, C)
    present = c.support > 0
    with np.errstate(invalid="ignore"):
        return np.where(present.any(1), np.where(present, means, 0.0).sum(1) / np.maximum(present.sum(1), 1), np.nan)


def weighted_balanced_log_loss(pred: LabelledPredictions, c: WeightedCounts) -> np.ndarray:
    """(R,) class-balanced mean log-loss."""
    return weighted_class_balanced_mean(pred, c, pred.log_loss)


def weighted_balanced_brier(pred: LabelledPredictions, c: WeightedCounts) -> np.ndarray:
    """(R,) class-balanced mean Brier score."""
    return weighted_class_balanced_mean(pred, c, pred.brier)


def weighted_balanced_log_odds(pred: LabelledPredictions, c: WeightedCounts) -> np.ndarray:
    """(R,) class-balanced mean true-class log-odds."""
    return weighted_class_balanced_mean(pred, c, pred.log_odds)


def weighted_auroc(pred: LabelledPredictions, c: WeightedCounts) -> np.ndarray:
    """(R,) macro one-vs-rest AUROC (binary: AUROC of class 1), NaN where a row has one class only."""
    W, support, negatives = c.W, c.support, c.negatives
    R, C = support.shape
    per = np.full((R, C), np.nan)
    for k in [1] if C == 2 else range(C):
        order, start, end = pred.ranks[k]
        pos = (pred.y_true == k)[order]
        Ws = W[:, order]  # (R, n) weights in score order
        cum = np.concatenate([np.zeros((R, 1)), np.cumsum(Ws * ~pos, axis=1)], axis=1)  # (R, n + 1)
        below = cum[:, start]  # negatives strictly below each position's score
        ties = cum[:, end] - below  # negatives with the same score
        u = ((below + 0.5 * ties) * (Ws * pos)).sum(axis=1)
        per[:, k] = _div(u, support[:, k] * negatives[:, k])
    if C == 2:
        return per[:, 1]
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(per)
        return np.where(ok.any(1), np.nansum(per, 1) / np.maximum(ok.sum(1), 1), np.nan)


def weighted_metrics(pred: LabelledPredictions, W: np.ndarray, with_auroc: bool = True) -> dict[str, np.ndarray]:
    """Every metric of :data:`milcore.metrics.TABLE` that has a group-weighted function, for each row of ``W``.

    Args:
        pred: the labelled predictions.
        W: (R, n) non-negative weights (masks, bootstrap counts).
        with_auroc: also compute AUROC (skip when not needed: it is the one that sorts).

    Returns:
        ``{name: (R,) array}`` for ``n`` and the scalar metrics (``balanced_accuracy``, ``macro_f1``, ``auroc``,
        ``ece``, ``balanced_log_loss``, ``balanced_brier``), ``{name: (R, C) array}`` for ``support`` and the
        per-class ones (``recall``, ``fpr``, ``selection_rate``); NaN where undefined (no patient, or a class
        absent from the group).
    """
    from milcore.metrics.table import TABLE

    counts = weighted_counts(pred, W)
    out = {"n": counts.total, "support": counts.support}
    for m in TABLE.values():
        if m.weighted is not None and (with_auroc or m.name != "auroc"):
            out[m.name] = m.weighted(pred, counts)
    return out


def flatten(metrics: dict[str, np.ndarray], classes: list[str]) -> dict[str, np.ndarray]:
    """``{name: (R,)}`` with per-class metrics spread out as ``recall[CLASS]``, ``fpr[CLASS]``, ..."""
    from milcore.metrics.table import GROUP_METRICS, PER_CLASS_METRICS

    out = {k: metrics[k] for k in (*GROUP_METRICS, "n") if k in metrics}
    for k in PER_CLASS_METRICS:
        for j, c in enumerate(classes):
            out[f"{k}[{c}]"] = metrics[k][:, j]
    return out


def parity_differences(metrics: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Equalized-odds and demographic-parity differences across the groups of one attribute.

    Args:
        metrics: ``recall``, ``fpr`` and ``selection_rate`` arrays shaped (..., G, C) for G groups of one
            attribute (e.g. :func:`weighted_metrics` of the groups' masks).

    Returns:
        ``equalized_odds_difference`` = max over classes (one vs rest) of the larger of the TPR range and
        the FPR range across groups, and ``demographic_parity_difference`` = max over classes of the
        selection-rate range; for two classes only class 1 counts (fairlearn's binary definitions).
    """
    recall, fpr, sel = metrics["recall"], metrics["fpr"], metrics["selection_rate"]  # (..., G, C)
    if recall.shape[-1] == 2:
        recall, fpr, sel = recall[..., 1:], fpr[..., 1:], sel[..., 1:]
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: a class absent everywhere
        tpr_range = np.nanmax(recall, -2) - np.nanmin(recall, -2)
        fpr_range = np.nanmax(fpr, -2) - np.nanmin(fpr, -2)
        sel_range = np.nanmax(sel, -2) - np.nanmin(sel, -2)
        eod = np.nanmax(np.fmax(tpr_range, fpr_range), -1)
        dpd = np.nanmax(sel_range, -1)
    return {"equalized_odds_difference": eod, "demographic_parity_difference": dpd}
