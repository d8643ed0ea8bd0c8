"""Per-group classification metrics computed for many weightings of the patients at once.

Every metric of the audit is a function of weighted sums over patients, so one (R, n) weight matrix
``W`` evaluates R groups, bootstrap resamples (multiplicity counts) or permuted groups (0/1 masks) in
a few matrix products:

- counts: ``W @ onehot(y)``, ``W @ onehot(pred)``, ``W @ (onehot(y) * correct)`` give per-class
  support, predictions and true positives, hence recall (TPR), FPR, selection rate, balanced
  accuracy and macro-F1 exactly as :mod:`milcore.training.metrics` defines them;
- ECE: ``W @ (bin one-hot * (correct - confidence))`` per equal-width confidence bin;
- AUROC: the weighted Mann-Whitney statistic: in score order, each positive's weight times the cumulative
  weight of the negatives below it (plus half the tied ones), per class (one vs rest, macro over the
  classes present), O(R n) after one sort per class.

Why not fairlearn's ``MetricFrame``: it evaluates the metric callables group by group through pandas,
which is right for one table of point estimates but takes milliseconds per group and call; the audit
needs the same metrics for thousands of bootstrap resamples and permutations per group (a few seconds
here versus minutes). The tests check these values against ``MetricFrame`` and fairlearn's
equalized-odds and demographic-parity differences where fairlearn is installed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

#: Scalar metrics per group, and whether higher is better.
HIGHER_IS_BETTER: dict[str, bool] = {"balanced_accuracy": True, "macro_f1": True, "auroc": True, "ece": False}
#: Per-class metrics per group, and whether higher is better.
PER_CLASS_HIGHER: dict[str, bool] = {"recall": True, "fpr": False, "selection_rate": True}


def metric_direction(name: str) -> bool:
    """Whether higher is better for a metric name such as ``auroc`` or ``recall[NPM1]``."""
    base = name.split("[", 1)[0]
    if base in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[base]
    if base in PER_CLASS_HIGHER:
        return PER_CLASS_HIGHER[base]
    raise KeyError(name)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


@dataclass
class Predictions:
    """Labelled predictions of one audit, with everything the weighted metrics need precomputed.

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


def weighted_metrics(pred: Predictions, W: np.ndarray, with_auroc: bool = True) -> dict[str, np.ndarray]:
    """All audit metrics for each row of a weight matrix.

    Args:
        pred: the labelled predictions.
        W: (R, n) non-negative weights (masks, bootstrap counts).
        with_auroc: also compute AUROC (skip when not needed).

    Returns:
        ``{name: (R,) array}`` for ``n``, ``balanced_accuracy``, ``macro_f1``, ``ece``, ``auroc`` and
        ``{name: (R, C) array}`` for ``support``, ``recall``, ``fpr``, ``selection_rate``; NaN where undefined
        (no patient, or a class absent from the group).
    """
    W = np.atleast_2d(np.asarray(W, dtype=float))  # (R, n)
    total = W.sum(axis=1)  # (R,)
    support = W @ pred.onehot_true  # (R, C)
    predicted = W @ pred.onehot_pred  # (R, C)
    tp = W @ (pred.onehot_true * pred.correct[:, None])  # (R, C)
    recall = _div(tp, support)
    negatives = total[:, None] - support
    fpr = _div(predicted - tp, negatives)
    selection = _div(predicted, np.repeat(total[:, None], pred.num_classes, axis=1))
    present = support > 0
    with np.errstate(invalid="ignore"):
        ba = np.where(present.any(1), np.nansum(np.where(present, recall, 0.0), 1) / np.maximum(present.sum(1), 1),
                      np.nan)  # fmt: skip
        seen = (support + predicted) > 0
        f1 = np.where(seen, 2 * tp / np.where(seen, support + predicted, 1), 0.0)
        macro_f1 = np.where(seen.any(1), (f1 * seen).sum(1) / np.maximum(seen.sum(1), 1), np.nan)
        ece = np.where(total > 0, np.abs(W @ pred.calib).sum(1) / np.where(total > 0, total, 1), np.nan)
    out = {"n": total, "balanced_accuracy": ba, "macro_f1": macro_f1, "ece": ece, "support": support,
           "recall": recall, "fpr": fpr, "selection_rate": selection}  # fmt: skip
    if with_auroc:
        out["auroc"] = _weighted_auroc(pred, W, support, negatives)
    return out


def _weighted_auroc(pred: Predictions, W: np.ndarray, support: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """(R,) macro one-vs-rest AUROC (binary: AUROC of class 1), NaN where a group has one class only."""
    R, C = support.shape
    per = np.full((R, C), np.nan)
    for c in [1] if C == 2 else range(C):
        order, start, end = pred.ranks[c]
        pos = (pred.y_true == c)[order]
        Ws = W[:, order]  # (R, n) weights in score order
        cum = np.concatenate([np.zeros((R, 1)), np.cumsum(Ws * ~pos, axis=1)], axis=1)  # (R, n + 1)
        below = cum[:, start]  # negatives strictly below each position's score
        ties = cum[:, end] - below  # negatives with the same score
        u = ((below + 0.5 * ties) * (Ws * pos)).sum(axis=1)
        per[:, c] = _div(u, support[:, c] * negatives[:, c])
    if C == 2:
        return per[:, 1]
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(per)
        return np.where(ok.any(1), np.nansum(per, 1) / np.maximum(ok.sum(1), 1), np.nan)


def flatten(metrics: dict[str, np.ndarray], classes: list[str]) -> dict[str, np.ndarray]:
    """``{name: (R,)}`` with per-class metrics spread out as ``recall[CLASS]``, ``fpr[CLASS]``, ..."""
    out = {k: metrics[k] for k in (*HIGHER_IS_BETTER, "n") if k in metrics}
    for k in PER_CLASS_HIGHER:
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
