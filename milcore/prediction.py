"""Prediction (``milcore predict``): apply a model, a checkpoint or a run's fold ensemble to every bag of a bank.

The result is per-patient probabilities plus per-cell attention, written (optionally) as a prediction
folder in the layout of :mod:`milcore.data.predictions`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from feature_cache.errors import InvalidArgumentError, UserError
from milcore.data.predictions import (
    PREDICTIONS_FORMAT,
    PredictionTable,
    read_attention,
    read_predictions,
    write_attention,
    write_predictions,
)
from milcore.trust.scores import DEFAULT_SCORE

if TYPE_CHECKING:
    from milcore.training.checkpoint import CheckpointSet
    from milcore.trust.uncertainty import Uncertainty

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class MemoryEnsemble:
    """The fold models of an in-memory cross-validation, described as :class:`CheckpointSet` describes folders.

    Attributes:
        folds: number of fold models averaged.
    """

    folds: int
    paths: tuple[Path, ...] = ()
    partial: bool = False

    def describe(self) -> str:
        """``ensemble of K fold models (in memory)``."""
        return f"ensemble of {self.folds} fold model{'s' * (self.folds != 1)} (in memory)"

    def to_dict(self) -> dict:
        """JSON-ready description (stored in ``predictions.json``)."""
        return {"checkpoints": [], "partial": False, "description": self.describe(), "runs": []}


def _on_disk(ckset: CheckpointSet, device: Any) -> Iterator[tuple[str, Any, dict]]:
    """``(where, model, card)`` of every checkpoint folder, loaded and verified."""
    from milcore.training.checkpoint import CARD, load_checkpoint

    for path in ckset.paths:
        model, card = load_checkpoint(path, device)
        yield str(path / CARD), model, card


def _in_memory(result: Any, device: Any) -> Iterator[tuple[str, Any, dict]]:
    """``(where, model, card)`` of every fold of a :class:`~milcore.crossval.CVResult`."""
    for f in result.folds:
        card = {"classes": list(result.classes), "temperature": f.temperature, "encoder": result.encoder,
                "task": result.task, "model": result.model_name}  # fmt: skip
        yield f"{result.model_name} fold {f.fold.index} (in memory)", f.model.to(device), card


@dataclass
class PredictionRun:
    """What :func:`predict` produced.

    Attributes:
        table: the predictions (labels filled from the cohort where given).
        checkpoints: the checkpoints averaged.
        task: the checkpoints' task (label column), ``None`` when they do not record it.
        metrics: the scores on the labelled bags (``metrics.json``), ``None`` without a cohort.
        meta: the content of ``predictions.json``.
        attention: per bag, the ensemble's mean per-cell attention (aligned with the bank's rows).
        out: the prediction folder, when one was written.
        uncertainty: per-patient uncertainty scores (:mod:`milcore.trust.uncertainty`), in ``table`` order.
        referral: with ``abstain_above``, the patients referred for review and the counts
            (``predictions.json["abstention"]``); ``None`` otherwise.
    """

    table: PredictionTable
    checkpoints: CheckpointSet | MemoryEnsemble
    task: str | None
    metrics: dict | None
    meta: dict
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    out: Path | None = None
    uncertainty: Uncertainty | None = None
    referral: dict[str, Any] | None = None

    @property
    def referred(self) -> np.ndarray:
        """(B,) whether each patient is referred for manual review (all False without ``abstain_above``)."""
        ids = set((self.referral or {}).get("referred_ids", []))
        return np.asarray([b in ids for b in self.table.bag_ids], dtype=bool)

    @property
    def warnings(self) -> list[dict[str, Any]]:
        """What makes the scores unfit for a decision (empty without a labelled cohort)."""
        return list((self.metrics or {}).get("warnings", []))


def check_out(out: str | Path, overwrite: bool) -> Path:
    """Refuse an ``out`` that is a file, or a non-empty folder unless ``overwrite``; creates nothing."""
    from feature_cache.errors import OutputExistsError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    return out


def _check_task(task: str | None, ck_task: str | None, classes: list[str], where: str,
                allow_task_rename: bool) -> None:  # fmt: skip
    if task is None or ck_task is None or task == ck_task:
        if task is not None and ck_task is None:
            log.warning("%s does not record its task; the --task column %r is trusted to hold classes %s", where,
                        task, ", ".join(classes))  # fmt: skip
        return
    if not allow_task_rename:
        raise UserError(f"--task {task!r} is not the task of {where}, which was trained for {ck_task!r} (classes "
                        f"{', '.join(classes)}); give the matching column, or pass --allow-task-rename if column "
                        f"{task!r} holds that same diagnosis under another name")  # fmt: skip
    log.warning("--task %r stands for the checkpoint's task %r (--allow-task-rename)", task, ck_task)


def _load_labels(cohort: str | Path, task: str, classes: list[str], ids: list[str], where: str,
                 ck_task: str | None, empty: Sequence[str] = ()) -> np.ndarray:  # fmt: skip
    """(B,) label index of each bag of ``ids``, -1 where the cohort has none; refuses labels outside ``classes``.

    ``empty`` are the bank's bags with no cell (left out of ``ids``); the join reports them as such.
    """
    from milcore.data.cohort import join_bank, read_cohort

    try:
        table = read_cohort(cohort, task, classes=classes)
    except UserError as exc:
        raise UserError(f"{exc} (checkpoint {where}: task {ck_task or 'not recorded'!r}, classes "
                        f"{', '.join(classes)})") from None  # fmt: skip
    bank_ids = [*ids, *empty]
    table, join = join_bank(table, bank_ids, sizes=[1] * len(ids) + [0] * len(empty))
    log.info("%s: %s", cohort, join.summary())
    label_of = dict(zip(table.bag_ids, table.labels, strict=True))
    return np.asarray([label_of.get(b, -1) for b in ids], dtype=np.int64)


def _finite_or_refuse(values: np.ndarray, ids: list[str], what: str, where: str, bank_path: str | Path) -> None:
    bad = [ids[i] for i in np.flatnonzero(~np.isfinite(values.reshape(len(ids), -1)).all(axis=1))]
    if bad:
        raise UserError(f"{where}: non-finite {what} (NaN/Inf) for {len(bad)} patient(s) of {bank_path} (e.g. "
                        f"{', '.join(bad[:5])}); nothing was written: the checkpoint or the features cannot "
                        f"be trusted")  # fmt: skip


def predict(source: Any, bank_path: str | Path, *, out: str | Path | None = None,
            cohort: str | Path | None = None, task: str | None = None, cells: str | Path | None = None,
            allow_partial: bool = False, allow_task_rename: bool = False, overwrite: bool = False,
            batch_instances: int = 16384, device: str = "auto", n_boot: int = 1000,
            abstain_above: float | None = None, abstain_score: str = DEFAULT_SCORE,
            mc_samples: int | None = None, coverage_targets: Sequence[float] = ()) -> PredictionRun:  # fmt: skip
    """Apply one model, or the mean of several (a fold ensemble), to every bag of a bank.

    Everything is checked before the first byte is written: ``out``, run completeness, each
    checkpoint's integrity (card and weights SHA-256, finite weights, tensor shapes), the encoder
    fingerprint and dimension, that all checkpoints share classes and task, the ``task`` column and
    labels of ``cohort`` against the checkpoints' task and classes, and that every output is finite.
    The folder is written under a temporary name and renamed into place, so a failed prediction
    leaves nothing behind.

    Args:
        source: what predicts: a :class:`~milcore.crossval.CVResult` (its fold models, in memory), a run folder
            (all its folds averaged), a fold checkpoint folder, or a list of such folders.
        bank_path: the feature bank to predict.
        out: output folder (absent or empty unless ``overwrite``); ``None`` writes nothing.
        cohort: labelled cohort table: labels go into ``predictions.csv`` and the predictions are scored
            (``metrics.json``); needs ``task``.
        task: label column of ``cohort``; must be the checkpoints' task (unless ``allow_task_rename``).
        cells: instance ground truth (default ``cells.csv`` beside the cohort, if present).
        allow_partial: accept an incomplete training run (recorded in the output).
        allow_task_rename: accept a ``task`` column named differently from the checkpoints' task.
        overwrite: replace a non-empty ``out``.
        batch_instances: cells per forward pass.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        n_boot: bootstrap resamples for the metrics' CIs.
        abstain_above: refer the patients whose ``abstain_score`` is above this value (in ``[0, 1)``) for
            manual review: a ``referred`` column in ``predictions.csv``, the counts in ``predictions.json``
            and ``metrics.json`` (with the metrics of the accepted patients).
        abstain_score: the uncertainty score thresholded (:data:`milcore.trust.uncertainty.SCORES`):
            ``entropy``, ``least_confidence``, ``disagreement`` (two or more models) or ``mc_dropout``
            (models with dropout).
        mc_samples: Monte-Carlo dropout passes per model with dropout (default
            :data:`~milcore.trust.uncertainty.MC_SAMPLES`; 0 skips MC-dropout).
        coverage_targets: balanced accuracies (each in ``(0, 1]``) whose coverage is reported beside the
            default 0.90 and 0.95 ("the coverage at which balanced accuracy reaches X").

    Every patient gets the uncertainty scores the models allow (``uncertainty_<score>`` columns of
    ``predictions.csv``); with a labelled cohort, ``metrics.json["uncertainty"]`` holds their risk-coverage
    summaries.

    Returns:
        The :class:`PredictionRun` (the table of probabilities and labels, per-cell attention, metrics,
        uncertainty and referrals).

    Raises:
        UserError: any check above fails (nothing is written).
        InvalidArgumentError: ``abstain_above`` outside ``[0, 1)``, an unknown ``abstain_score``.
    """
    from feature_cache.bank import EncoderInfo, open_reader
    from feature_cache.devices import resolve_device
    from milcore.data.store import FeatureStore
    from milcore.metrics.calibration import softmax
    from milcore.training.checkpoint import checkpoint_task, resolve_checkpoints
    from milcore.training.config import TrainConfig
    from milcore.training.trainer import Trainer
    from milcore.trust import uncertainty as unc

    if abstain_above is not None:
        abstain_above = unc.check_threshold(abstain_above)
    unc.check_score_name(abstain_score)
    targets = unc.check_coverage_targets(coverage_targets)
    mc_samples = unc.MC_SAMPLES if mc_samples is None else int(mc_samples)
    if mc_samples < 0:
        raise InvalidArgumentError(f"--mc-samples {mc_samples}: must be 0 (off) or more")
    if (cohort is None) != (task is None):
        raise UserError("--cohort and --task go together")
    if cells is not None and cohort is None:
        raise UserError("--cells needs --cohort and --task (it is the ground truth of a labelled cohort)")
    out = check_out(out, overwrite) if out is not None else None
    dev = resolve_device(device)
    in_memory = hasattr(source, "folds") and hasattr(source, "classes")
    ckset = MemoryEnsemble(len(source.folds)) if in_memory else resolve_checkpoints(
        [source] if isinstance(source, str | Path) else source, allow_partial=allow_partial)  # fmt: skip
    bank = open_reader(bank_path)
    all_ids = bank.bag_ids()
    sizes = bank.bag_sizes()
    empty = [b for b, n in zip(all_ids, sizes, strict=True) if n == 0]
    ids = [b for b, n in zip(all_ids, sizes, strict=True) if n > 0]
    if not ids:
        raise UserError(f"{bank_path}: no bag has a cell ({len(empty)} empty bag(s)); there is nothing to predict")
    if empty:  # no cell, no evidence: a prediction would come from the model's bias alone
        log.warning("%s: %d bag(s) have no cell and are NOT predicted (e.g. %s); predictions.json lists them",
                    bank_path, len(empty), ", ".join(empty[:5]))  # fmt: skip
    wheres, models, cards = [], [], []
    classes: list[str] | None = None
    ck_task: str | None = None
    for ckpt, model, card in (_in_memory(source, dev) if in_memory else _on_disk(ckset, dev)):
        if card.get("encoder"):
            try:
                info = EncoderInfo.from_dict(card["encoder"])
            except (UserError, TypeError, ValueError) as exc:
                raise UserError(f"{ckpt}: unreadable encoder fingerprint ({exc})") from exc
            info.check_compatible(bank.info, where=str(bank_path))
            if (note := info.precision_note(bank.info)) and len(models) == 0:  # warned, not refused: see bank_schema
                log.warning("%s: %s; predictions can differ from those on a %s bank (benchmarks/bench_precision.py: "
                            "probabilities by up to 0.15, 1 of 20 patients changed class); extracting both banks on "
                            "the same kind of device avoids it", bank_path, note, info.compute_dtype)  # fmt: skip
        else:
            log.warning("%s records no encoder fingerprint; %s cannot be checked against it", ckpt, bank_path)
        in_dim = getattr(getattr(model, "config", None), "in_dim", bank.dim)
        if in_dim != bank.dim:
            raise UserError(f"{bank_path}: features are {bank.dim}-d but {ckpt} expects {in_dim}-d")
        if classes is not None and card["classes"] != classes:
            raise UserError(f"{ckpt}: classes {card['classes']} differ from the other checkpoints' {classes}")
        this_task = card.get("task") if in_memory else checkpoint_task(ckpt, card)
        if models and this_task != ck_task:
            raise UserError(f"{ckpt}: task {this_task!r} differs from the other checkpoints' {ck_task!r}")
        classes, ck_task = list(card["classes"]), this_task
        wheres.append(str(ckpt))
        models.append(model)
        cards.append(card)
    assert classes is not None
    if abstain_above is not None:
        _check_abstain_score(abstain_score, models, mc_samples, ckset.describe())
    where = (ckset.describe() if in_memory else str(ckset.paths[0]) if len(ckset.paths) == 1
             else f"{ckset.paths[0].parent} ({ckset.describe()})")  # fmt: skip
    log.info("checkpoint task %s, classes %s (%s)", repr(ck_task) if ck_task else "not recorded", ", ".join(classes),
             ckset.describe())  # fmt: skip
    labels = np.full(len(ids), -1, dtype=np.int64)
    if cohort is not None:
        assert task is not None
        _check_task(task, ck_task, classes, where, allow_task_rename)
        labels = _load_labels(cohort, task, classes, ids, where, ck_task, empty)
    store = FeatureStore(bank, ids, with_coords=True)
    probas, attentions = [], None
    trainer = Trainer(TrainConfig(batch_instances=batch_instances, device=str(dev)), bank.dim, len(classes))
    for ckpt, model, card in zip(wheres, models, cards, strict=True):
        preds = trainer.predict(model, store)
        _finite_or_refuse(preds.logits, ids, "logits", str(ckpt), bank_path)
        proba = softmax(preds.logits, float(card.get("temperature", 1.0)))
        _finite_or_refuse(proba, ids, "probabilities", str(ckpt), bank_path)
        att = [a if a.ndim == 1 else a.mean(axis=1) for a in preds.attention]
        bad = [ids[i] for i, a in enumerate(att) if not np.isfinite(a).all()]
        if bad:
            raise UserError(f"{ckpt}: non-finite attention for {len(bad)} patient(s) of {bank_path} (e.g. "
                            f"{', '.join(bad[:5])}); nothing was written")  # fmt: skip
        probas.append(proba)
        attentions = att if attentions is None else [x + y for x, y in zip(attentions, att, strict=True)]
    assert attentions is not None
    table = PredictionTable(ids, classes, np.mean(probas, axis=0), labels, np.full(len(ids), -1))
    attention = [a / len(models) for a in attentions]
    uncertainty = _uncertainty(table, probas, models, cards, wheres, store, trainer, mc_samples, bank_path)
    referral = None
    if abstain_above is not None:
        referral = unc.referral_summary(uncertainty, abstain_score, abstain_above, labels, table.predicted)
    metrics = None
    if cohort is not None and (labels >= 0).any():
        metrics = score_predictions(table, attention, bank, task or "", cohort, cells, n_boot=n_boot)
        metrics["ensemble"] = ckset.describe()
        metrics["uncertainty"] = unc.selective_summary(labels, table.proba, uncertainty, targets=targets)
        if referral is not None:
            metrics["abstention"] = {k: v for k, v in referral.items() if k != "referred_ids"}
    meta = {
        "format": PREDICTIONS_FORMAT, "format_version": 1,
        "bank": str(Path(bank_path).resolve()), "cohort": str(Path(cohort).resolve()) if cohort else None,
        "task": ck_task, "label_column": task, "classes": classes, "ensemble": ckset.to_dict(),
        "checkpoints": [str(p.resolve()) for p in ckset.paths], "bags": len(ids),
        "not_predicted": {"no_cells": empty},
        "labelled": int((labels >= 0).sum()),
        "predicted_counts": {c: int((table.predicted == i).sum()) for i, c in enumerate(classes)},
        "uncertainty": uncertainty.to_dict(),
        "abstention": {k: v for k, v in referral.items() if k not in ("accepted", "all")} if referral else None,
    }  # fmt: skip
    columns = uncertainty.columns()
    if referral is not None:
        referred = set(referral["referred_ids"])
        columns["referred"] = [int(b in referred) for b in ids]
    if out is not None:
        _write_folder(out, overwrite, table, attention, meta, metrics, columns, uncertainty)
    return PredictionRun(table, ckset, ck_task, metrics, meta, dict(zip(ids, attention, strict=True)), out,
                         uncertainty, referral)  # fmt: skip


def _check_abstain_score(score: str, models: list, mc_samples: int, described: str) -> None:
    """Refuse an abstention score these models cannot give, before anything is computed or written."""
    from milcore.trust.uncertainty import dropout_note

    if score == "disagreement" and len(models) < 2:
        raise UserError(f"--abstain-score disagreement needs two or more models (fold-ensemble disagreement); "
                        f"these predictions come from one ({described}): use entropy")  # fmt: skip
    if score == "mc_dropout":
        why = dropout_note(models)
        if why is not None or mc_samples < 1:
            raise UserError(f"--abstain-score mc_dropout: {why or '--mc-samples is 0'}; use entropy")


def _uncertainty(table: PredictionTable, probas: list[np.ndarray], models: list, cards: list[dict], wheres: list[str],
                 store: Any, trainer: Any, mc_samples: int, bank_path: str | Path) -> Uncertainty:  # fmt: skip
    """Every uncertainty score the ensemble allows (MC-dropout for the models with dropout)."""
    from milcore.trust.uncertainty import dropout_note, has_dropout, mc_dropout_proba, uncertainty_scores

    notes: dict[str, str] = {}
    mc = []
    why = dropout_note(models)
    if why is not None:
        notes["mc_dropout"] = why
    elif mc_samples < 1:
        notes["mc_dropout"] = "--mc-samples 0"
    else:
        for model, card, where in zip(models, cards, wheres, strict=True):
            if not has_dropout(model):
                continue
            draws = mc_dropout_proba(model, store, trainer, float(card.get("temperature", 1.0)), samples=mc_samples)
            assert draws is not None
            _finite_or_refuse(draws.transpose(1, 0, 2), table.bag_ids, "MC-dropout probabilities", where, bank_path)
            mc.append(draws)
    return uncertainty_scores(table.bag_ids, table.proba, members=np.stack(probas), mc=mc, notes=notes,
                              mc_samples=mc_samples if mc else 0)  # fmt: skip


def _write_folder(out: Path, overwrite: bool, table: PredictionTable, attention: list[np.ndarray], meta: dict,
                  metrics: dict | None, columns: dict[str, Any] | None = None,
                  uncertainty: Uncertainty | None = None) -> None:  # fmt: skip
    """Write the prediction folder (and, with ``uncertainty``, its report) under a temporary name, then move it
    into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise UserError(f"{out}: cannot write the predictions here ({exc.strerror or exc})") from exc
    old = None
    try:
        write_predictions(tmp, table, columns)
        write_attention(tmp, table.bag_ids, attention, meta)
        (tmp / "predictions.json").write_text(json.dumps(meta, indent=2))
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        if uncertainty is not None:
            from milcore.trust.abstention_report import prediction_report

            prediction_report(tmp, list(table.bag_ids), list(table.classes), table.proba, table.labels,
                              uncertainty.scores, meta, metrics)  # fmt: skip
        if out.exists():
            check_out(out, overwrite)  # still allowed (nothing appeared meanwhile)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as exc:
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous predictions back
            old = None
        raise UserError(f"{out}: cannot write the predictions ({exc.strerror or exc}); nothing was changed") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def score_predictions(table: PredictionTable, attention: Sequence[np.ndarray] | dict[str, np.ndarray], bank,
                      task: str, cohort_path: str | Path, cells: str | Path | None = None,
                      n_boot: int = 1000) -> dict:  # fmt: skip
    """Metrics of the labelled rows of ``table`` (``metrics.json`` content); instance AUROC when a
    ``cells.csv`` ground truth is given or found beside the cohort and the bank has cell ids."""
    from milcore.report.evaluation import evaluate

    keep = np.flatnonzero(table.labels >= 0)
    if not len(keep):
        raise UserError(f"{cohort_path}: no predicted bag has a {task!r} label")
    ids = [table.bag_ids[i] for i in keep]
    report = evaluate(table.labels[keep], table.proba[keep], table.classes, n_boot=n_boot)
    metrics = {"task": task, "classes": table.classes, "n": len(ids),
               "unlabelled": len(table.bag_ids) - len(ids), **report}  # fmt: skip
    cells = Path(cells) if cells else Path(cohort_path).with_name("cells.csv")
    if cells.exists() and "cell_id" in bank.columns:
        from milcore.data.ground_truth import load_cell_truth
        from milcore.metrics.classification import instance_auroc

        att = attention if isinstance(attention, dict) else dict(zip(table.bag_ids, attention, strict=True))
        metrics["instance"] = instance_auroc(att, load_cell_truth(cells, bank, ids))
    return metrics


def evaluate_predictions(folder: str | Path, cohort_path: str | Path, task: str, bank_path: str | Path,
                         cells: str | Path | None = None, n_boot: int = 1000) -> dict:  # fmt: skip
    """Score an existing prediction folder against a labelled cohort (external test set): ``metrics.json``.

    Bags without a label are ignored (reported); labels must be among the checkpoint's classes.
    """
    from feature_cache.bank import open_reader
    from milcore.data.cohort import read_cohort

    table = read_predictions(folder)
    cohort = read_cohort(cohort_path, task, classes=table.classes)
    label_of = dict(zip(cohort.bag_ids, cohort.labels, strict=True))
    table.labels = np.asarray([label_of.get(b, -1) for b in table.bag_ids], dtype=np.int64)
    metrics = score_predictions(table, read_attention(folder), open_reader(bank_path), task, cohort_path, cells,
                                n_boot=n_boot)  # fmt: skip
    (Path(folder) / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return metrics
