"""A training run: patient-level k-fold cross-validation from a bank and a cohort table into a run folder.

``RUN/`` holds ``config.yaml`` (resolved), ``splits.json``, ``metrics.json`` (per-fold and mean values,
pooled out-of-fold metrics with bootstrap CIs), ``predictions.csv`` + ``attention.h5`` (out-of-fold,
aligned with the bank rows), ``fold_K/`` (checkpoint in safetensors + card, history), and
``report.html`` / ``report.md``. An interrupted run resumes with ``resume=True``: finished folds are
reloaded, the fold in flight continues from its last epoch.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import OutputExistsError, UserError
from milcore.training.config import TrainConfig

log = logging.getLogger(__name__)

HEADLINE = ("balanced_accuracy", "macro_f1", "auroc", "ece")


@dataclass(frozen=True)
class RunSpec:
    """What to train on.

    Attributes:
        bank: feature bank path.
        cohort: cohort table path.
        task: label column.
        folds: number of cross-validation folds.
        seed: split seed (the training seed is in :class:`TrainConfig`).
        cells: instance ground-truth table; ``None`` looks for ``cells.csv`` beside the cohort.
        group_column: cohort column grouping several bags of one patient.
        n_boot: bootstrap resamples for confidence intervals.
    """

    bank: str
    cohort: str
    task: str
    folds: int = 5
    seed: int = 0
    cells: str | None = None
    group_column: str = "patient"
    n_boot: int = 1000


def _prepare_out(out: Path, overwrite: bool, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise OutputExistsError(f"{out}: exists and is not empty (pass --resume to continue it or --overwrite)")
    if overwrite and out.is_dir() and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _write_history(folder: Path, history: list[dict[str, float]]) -> None:
    (folder / "history.json").write_text(json.dumps(history, indent=1))
    if history:
        with open(folder / "history.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)


def train_cv(spec: RunSpec, config: TrainConfig, out: str | Path, *, overwrite: bool = False,
             resume: bool = False) -> dict[str, Any]:  # fmt: skip
    """Cross-validate ``config`` on ``spec`` and write the run folder; returns ``metrics.json``'s content."""
    import yaml

    from feature_cache.bank import open_reader
    from milcore.data.cohort import join_bank, read_cohort
    from milcore.data.splits import load_folds, make_folds, save_folds
    from milcore.predict import PredictionTable, write_attention, write_predictions
    from milcore.training.calibration import fit_temperature, softmax
    from milcore.training.checkpoint import load_checkpoint, save_checkpoint, versions
    from milcore.training.features import FeatureStore
    from milcore.training.metrics import aggregate_folds, evaluate, expected_calibration_error, scalar_metrics
    from milcore.training.trainer import Trainer

    t_start = time.perf_counter()
    out = Path(out)
    _prepare_out(out, overwrite, resume)
    bank = open_reader(spec.bank)
    cohort, join = join_bank(read_cohort(spec.cohort, spec.task, group_column=spec.group_column), bank.bag_ids())
    log.info("%s: %s", spec.cohort, join.summary())
    classes = list(cohort.classes)
    for name, n in cohort.class_counts().items():
        if n == 0:
            log.warning("class %r has no bag in the bank; it is kept in the head but never trained", name)
    resolved = {"run": asdict(spec), "train": config.to_dict(), "classes": classes, "encoder": bank.info.to_dict(),
                "versions": versions(), "join": {"matched": len(join.matched),
                "only_in_cohort": len(join.only_in_cohort), "only_in_bank": len(join.only_in_bank)}}  # fmt: skip
    splits_path = out / "splits.json"
    if resume and splits_path.exists():
        folds = load_folds(splits_path)
    else:
        folds = make_folds(list(cohort.bag_ids), cohort.labels, k=spec.folds, seed=spec.seed, groups=cohort.groups,
                           classes=classes)  # fmt: skip
        save_folds(folds, splits_path, {"seed": spec.seed, "k": spec.folds, "cohort": spec.cohort})
    (out / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(resolved, default=str)), sort_keys=False))
    label_of = dict(zip(cohort.bag_ids, cohort.labels, strict=True))
    needs_coords = config.model.startswith("graph")
    budget = int(config.memory_budget_gb * (1 << 30))
    store = FeatureStore(bank, list(cohort.bag_ids), budget, with_coords=needs_coords)
    trainer = Trainer(config, bank.dim, len(classes))
    oof_proba: dict[str, np.ndarray] = {}
    oof_fold: dict[str, int] = {}
    oof_att: dict[str, np.ndarray] = {}
    per_fold = []
    for fold in folds:
        fdir = out / f"fold_{fold.index}"
        fdir.mkdir(exist_ok=True)
        tr, va, te = store.view(fold.train), store.view(fold.val), store.view(fold.test)
        y_tr = np.asarray([label_of[b] for b in fold.train])
        y_va = np.asarray([label_of[b] for b in fold.val])
        y_te = np.asarray([label_of[b] for b in fold.test])
        if resume and (fdir / "checkpoint.json").exists():
            model, card = load_checkpoint(fdir, trainer.device)
            temperature, best_epoch = float(card["temperature"]), int(card.get("best_epoch", -1))
            history = json.loads((fdir / "history.json").read_text()) if (fdir / "history.json").exists() else []
            log.info("fold %d: reusing its checkpoint", fold.index)
        else:
            model, fit = trainer.fit(tr, y_tr, va, y_va, state_path=fdir / "train_state.pt",
                                     log_dir=fdir / "tensorboard", desc=f"fold {fold.index + 1}/{len(folds)}")
            val_logits = trainer.predict(model, va, with_attention=False).logits
            temperature = fit_temperature(val_logits, y_va)
            best_epoch, history = fit.best_epoch, fit.history
            save_checkpoint(fdir, model, classes=classes, encoder=bank.info.to_dict(), temperature=temperature,
                            train_config=config.to_dict(), split={"fold": fold.index, "train": list(fold.train),
                            "val": list(fold.val), "test": list(fold.test)},
                            extra={"best_epoch": best_epoch})  # fmt: skip
            _write_history(fdir, history)
            (fdir / "train_state.pt").unlink(missing_ok=True)
        preds = trainer.predict(model, te)
        proba = softmax(preds.logits, temperature)
        row = {"fold": fold.index, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
               "best_epoch": best_epoch, "epochs_run": len(history), "temperature": temperature,
               **scalar_metrics(y_te, proba), "ece_uncalibrated": expected_calibration_error(
                   y_te, softmax(preds.logits))}  # fmt: skip
        per_fold.append(row)
        log.info("fold %d: balanced accuracy %.3f, AUROC %.3f (best epoch %d)", fold.index,
                 row["balanced_accuracy"], row["auroc"], best_epoch)  # fmt: skip
        for j, b in enumerate(fold.test):
            oof_proba[b], oof_fold[b] = proba[j], fold.index
            a = preds.attention[j]
            oof_att[b] = a if a.ndim == 1 else a.mean(axis=1)
    ids = [b for b in cohort.bag_ids if b in oof_proba]
    y_all = np.asarray([label_of[b] for b in ids])
    p_all = np.stack([oof_proba[b] for b in ids])
    table = PredictionTable(ids, classes, p_all, y_all, np.asarray([oof_fold[b] for b in ids]))
    write_predictions(out, table)
    write_attention(out, ids, [oof_att[b] for b in ids], {"bank": spec.bank, "kind": "out-of-fold"})
    pooled = evaluate(y_all, p_all, classes, n_boot=spec.n_boot, seed=spec.seed)
    metrics: dict[str, Any] = {
        "task": spec.task, "model": config.model, "classes": classes, "folds": len(folds), "seed": config.seed,
        "per_fold": per_fold,
        "mean": aggregate_folds([{k: r[k] for k in (*HEADLINE, "accuracy", "ece_uncalibrated")} for r in per_fold]),
        "pooled": pooled,
    }  # fmt: skip
    for k in HEADLINE:
        metrics[k] = metrics["mean"][k]["mean"]
    cells = Path(spec.cells) if spec.cells else Path(spec.cohort).with_name("cells.csv")
    if cells.exists() and "cell_id" in bank.columns:
        from milcore.data.ground_truth import instance_auroc, load_cell_truth

        truth = load_cell_truth(cells, bank, ids)
        metrics["instance"] = instance_auroc(oof_att, truth)
        for row in per_fold:
            fold_ids = [b for b in ids if oof_fold[b] == row["fold"]]
            row["instance_auroc"] = instance_auroc(oof_att, {b: truth[b] for b in fold_ids})["instance_auroc"]
        metrics["mean"]["instance_auroc"] = aggregate_folds([{"instance_auroc": r["instance_auroc"]}
                                                             for r in per_fold])["instance_auroc"]  # fmt: skip
    from milcore.training.report import run_warnings, write_run_report

    metrics["warnings"] = run_warnings(metrics)  # chance, temperature at a bound, too few patients (report.py)
    metrics["seconds"] = time.perf_counter() - t_start
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    write_run_report(out, metrics, table, history_of={f.index: out / f"fold_{f.index}" for f in folds})
    return metrics
