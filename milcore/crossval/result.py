"""What a cross-validation returns: every fold's result, the pooled out-of-fold predictions and ``metrics.json``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from milcore.data.predictions import PredictionTable
from milcore.metrics import HEADLINE, aggregate_folds, label
from milcore.metrics.classification import instance_auroc
from milcore.report.evaluation import evaluate

if TYPE_CHECKING:
    from milcore.data.store import FeatureStore
    from milcore.training.config import TrainConfig
    from milcore.training.fold import FoldResult

log = logging.getLogger(__name__)


@dataclass
class CVResult:
    """A patient-level cross-validation of one configuration.

    Attributes:
        config: the training configuration.
        model_name: the registered aggregator, or the class name of a user's module.
        task: the label column (``None`` when the bags came without a cohort table).
        classes: class names (columns of the probabilities).
        encoder: the bank's encoder fingerprint (``EncoderInfo.to_dict()``), checked when predicting.
        folds: one :class:`~milcore.training.fold.FoldResult` per fold (model, temperature, test outputs).
        predictions: pooled out-of-fold predictions: each bag predicted once, by the fold that held it out.
        attention: out-of-fold per-cell attention per bag (heads averaged), aligned with the bag's bank rows.
        metrics: the content of ``metrics.json`` (per fold, mean ± sd, pooled with bootstrap CIs, warnings).
        out: the run folder, when one was written.
    """

    config: TrainConfig
    model_name: str
    task: str | None
    classes: list[str]
    encoder: dict[str, Any]
    folds: list[FoldResult]
    predictions: PredictionTable
    attention: dict[str, np.ndarray]
    metrics: dict[str, Any]
    out: Path | None = None

    @property
    def models(self) -> list[Any]:
        """The fold models (an ensemble: :func:`milcore.prediction.predict` averages them)."""
        return [f.model for f in self.folds]

    @property
    def warnings(self) -> list[dict[str, Any]]:
        """What makes this result unfit for a decision (:mod:`milcore.report.caveats`)."""
        return list(self.metrics.get("warnings", []))

    def summary(self) -> str:
        """One line: the headline metrics as mean ± sd over folds."""
        mean = self.metrics["mean"]
        parts = [f"{label(k)} {mean[k]['mean']:.3f} ± {mean[k]['sd']:.3f}" for k in HEADLINE if k in mean]
        task = f" on {self.task}" if self.task else ""
        return f"{self.model_name}{task}, {len(self.folds)}-fold CV: " + ", ".join(parts)

    def __repr__(self) -> str:
        return f"CVResult({self.summary()})"


def pool_folds(results: list[FoldResult], data: FeatureStore, config: TrainConfig, model_name: str, *,
               n_boot: int = 1000, seed: int = 0, truth: dict[str, np.ndarray] | None = None) -> CVResult:  # fmt: skip
    """Pool the folds' test predictions (each bag once) and compute ``metrics.json``.

    Args:
        results: every fold's result.
        data: the labelled bags the folds split.
        config: the training configuration.
        model_name: what trained (for the record).
        n_boot: bootstrap resamples of the pooled CIs.
        seed: bootstrap seed.
        truth: per bag, which cells are diagnostic (adds the attention instance-AUROC).
    """
    from milcore.crossval.report import run_warnings

    classes = list(data.classes or [])
    label_of = dict(zip(data.bag_ids, data.labels.tolist(), strict=True))
    oof_proba: dict[str, np.ndarray] = {}
    oof_fold: dict[str, int] = {}
    oof_att: dict[str, np.ndarray] = {}
    per_fold = []
    for r in results:
        row = r.row()
        per_fold.append(row)
        log.info("fold %d: balanced accuracy %.3f, AUROC %.3f (best epoch %d)", r.fold.index,
                 row["balanced_accuracy"], row["auroc"], r.best_epoch)  # fmt: skip
        for j, b in enumerate(r.fold.test):
            oof_proba[b], oof_fold[b] = r.proba[j], r.fold.index
            a = r.test.attention[j]
            oof_att[b] = a if a.ndim == 1 else a.mean(axis=1)
    ids = [b for b in data.bag_ids if b in oof_proba]
    y_all = np.asarray([label_of[b] for b in ids])
    p_all = np.stack([oof_proba[b] for b in ids])
    table = PredictionTable(ids, classes, p_all, y_all, np.asarray([oof_fold[b] for b in ids]))
    pooled = evaluate(y_all, p_all, classes, n_boot=n_boot, seed=seed)
    task = data.cohort.label_column if data.cohort is not None else None
    metrics: dict[str, Any] = {
        "task": task, "model": model_name, "classes": classes, "folds": len(results), "seed": config.seed,
        "per_fold": per_fold,
        "mean": aggregate_folds([{k: r[k] for k in (*HEADLINE, "accuracy", "ece_uncalibrated")} for r in per_fold]),
        "pooled": pooled,
    }  # fmt: skip
    for k in HEADLINE:
        metrics[k] = metrics["mean"][k]["mean"]
    if truth is not None:
        truth = {b: truth[b] for b in ids}
        metrics["instance"] = instance_auroc(oof_att, truth)
        for row in per_fold:
            fold_ids = [b for b in ids if oof_fold[b] == row["fold"]]
            row["instance_auroc"] = instance_auroc(oof_att, {b: truth[b] for b in fold_ids})["instance_auroc"]
        metrics["mean"]["instance_auroc"] = aggregate_folds([{"instance_auroc": r["instance_auroc"]}
                                                             for r in per_fold])["instance_auroc"]  # fmt: skip
    metrics["warnings"] = run_warnings(metrics)  # chance, temperature at a bound, too few patients
    return CVResult(config, model_name, task, classes, data.bank.info.to_dict(), list(results), table, oof_att,
                    metrics)  # fmt: skip
