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
from milcore.trust.uncertainty import (
    MC_SAMPLES,
    dropout_note,
    has_dropout,
    mc_dropout_proba,
    selective_summary,
    uncertainty_scores,
)

if TYPE_CHECKING:
    from milcore.data.store import FeatureStore
    from milcore.training.config import TrainConfig
    from milcore.training.fold import FoldResult
    from milcore.training.trainer import Trainer
    from milcore.trust.uncertainty import Uncertainty

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
        metrics: the content of ``metrics.json`` (per fold, mean ± sd, pooled with bootstrap CIs, warnings,
            ``uncertainty``: risk-coverage summaries of the out-of-fold uncertainty scores).
        out: the run folder, when one was written.
        uncertainty: per-patient out-of-fold uncertainty scores (:mod:`milcore.trust.uncertainty`), in
            ``predictions`` order.
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
    uncertainty: Uncertainty | None = None

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
    uncertainty = oof_uncertainty(results, data, table, seed=config.seed)
    metrics["uncertainty"] = selective_summary(table.labels, table.proba, uncertainty)
    return CVResult(config, model_name, task, classes, data.bank.info.to_dict(), list(results), table, oof_att,
                    metrics, uncertainty=uncertainty)  # fmt: skip


def oof_uncertainty(results: list[FoldResult], data: FeatureStore, table: PredictionTable, *, seed: int = 0,
                    mc_samples: int = MC_SAMPLES) -> Uncertainty:  # fmt: skip
    """Out-of-fold uncertainty of every patient of ``table``: entropy and least confidence of its probabilities,
    and MC-dropout of the fold model that held it out (where the models have dropout). Fold-ensemble
    disagreement needs several models per patient: it is measured by ``milcore predict`` on new patients."""
    notes = {"disagreement": "out-of-fold, each patient is predicted by one fold model; fold-ensemble disagreement "
                             "is measured on new patients ('milcore predict' with the run's ensemble)"}  # fmt: skip
    mc = None
    why = dropout_note([r.model for r in results])
    if why is not None:
        notes["mc_dropout"] = why
    elif mc_samples > 0:
        pos = {b: i for i, b in enumerate(table.bag_ids)}
        samples = np.zeros((mc_samples, *table.proba.shape))  # (S, B, C)
        filled = np.zeros(len(table.bag_ids), dtype=bool)
        for r in results:
            ids = [b for b in r.fold.test if b in pos]
            if not ids or not has_dropout(r.model):
                continue
            trainer = r.trainer or _trainer_for(r, data.dim, len(table.classes))
            draws = mc_dropout_proba(r.model, data.view(ids), trainer, r.temperature, samples=mc_samples,
                                     seed=seed)  # fmt: skip
            rows = [pos[b] for b in ids]
            samples[:, rows] = draws
            filled[rows] = True
        if filled.all():
            mc = [samples]
        else:
            notes["mc_dropout"] = "some fold models have no dropout"
    return uncertainty_scores(table.bag_ids, table.proba, mc=mc, notes=notes, mc_samples=mc_samples)


def _trainer_for(result: FoldResult, dim: int, num_classes: int) -> Trainer:
    """A trainer that predicts on the device of ``result``'s model."""
    from milcore.training.config import TrainConfig
    from milcore.training.trainer import Trainer

    return Trainer(TrainConfig(device=str(next(result.model.parameters()).device)), dim, num_classes)
