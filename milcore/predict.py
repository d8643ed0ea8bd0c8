"""Prediction stores and ``milcore predict``: per-patient probabilities plus per-cell attention.

A prediction folder holds ``predictions.csv`` (bag id, probabilities per class, predicted class and,
where known, the label and the fold) and ``attention.h5``: per-cell attention in CSR layout aligned
with the rows of the bank the predictions were made from (``offsets`` (B+1,), ``attention`` (N,) or
(N, H)), so attention row ``i`` of bag ``b`` is bank row ``i`` of that bag.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from feature_cache.errors import UserError

if TYPE_CHECKING:
    from milcore.training.checkpoint import CheckpointSet

log = logging.getLogger(__name__)

ATTENTION_FORMAT = "milcore-attention"


@dataclass
class PredictionTable:
    """Bag-level predictions.

    Attributes:
        bag_ids: (B,) ids.
        classes: class names (columns of ``proba``).
        proba: (B, C) calibrated probabilities.
        labels: (B,) int labels, -1 where unknown.
        folds: (B,) fold of each prediction, -1 for an ensemble or external bank.
    """

    bag_ids: list[str]
    classes: list[str]
    proba: np.ndarray
    labels: np.ndarray
    folds: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        """(B,) predicted class index."""
        return self.proba.argmax(axis=1)


def write_predictions(folder: str | Path, table: PredictionTable) -> Path:
    """Write ``predictions.csv`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "predictions.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["bag_id", "fold", "label", "predicted", *[f"prob_{c}" for c in table.classes]])
        for i, b in enumerate(table.bag_ids):
            label = table.classes[table.labels[i]] if table.labels[i] >= 0 else ""
            w.writerow([b, int(table.folds[i]), label, table.classes[table.predicted[i]],
                        *[f"{p:.6f}" for p in table.proba[i]]])  # fmt: skip
    return path


def read_predictions(folder: str | Path) -> PredictionTable:
    """Read ``predictions.csv`` from a run or prediction folder.

    Raises:
        UserError: naming the file: missing, a required column absent, a probability that is not a
            finite number, or a label that is not one of the classes.
    """
    path = Path(folder) / "predictions.csv"
    if not path.exists():
        raise UserError(f"{path}: no predictions here (expected a training run or a 'milcore predict' output)")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable predictions table ({exc})") from exc
    classes = [c[len("prob_"):] for c in fields if c.startswith("prob_")]
    missing = [c for c in ("bag_id", "fold", "label") if c not in fields]
    if missing or len(classes) < 2:
        what = ", ".join(missing) or "prob_<class> columns"
        raise UserError(f"{path}: not a milcore predictions table (missing {what})")
    index = {c: i for i, c in enumerate(classes)}
    try:
        proba = np.asarray([[float(r[f"prob_{c}"]) for c in classes] for r in rows], dtype=float)
        folds = np.asarray([int(r["fold"]) for r in rows], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: a probability or fold is not a number ({exc})") from exc
    proba = proba.reshape(-1, len(classes))
    bad = [rows[i]["bag_id"] for i in np.flatnonzero(~np.isfinite(proba).all(axis=1))]
    if bad:
        raise UserError(f"{path}: non-finite probabilities for {len(bad)} bag(s) (e.g. {', '.join(bad[:3])}); "
                        "these predictions cannot be trusted")  # fmt: skip
    unknown = sorted({r["label"] for r in rows if r["label"] and r["label"] not in index})
    if unknown:
        raise UserError(f"{path}: labels {', '.join(unknown[:5])} are not among the classes {', '.join(classes)}")
    return PredictionTable(
        bag_ids=[r["bag_id"] for r in rows],
        classes=classes,
        proba=proba,
        labels=np.asarray([index.get(r["label"], -1) for r in rows], dtype=np.int64),
        folds=folds,
    )


def write_attention(folder: str | Path, bag_ids: Sequence[str], attention: Sequence[np.ndarray],
                    meta: dict | None = None) -> Path:  # fmt: skip
    """Write per-cell attention (CSR, aligned with the bank's rows) to ``attention.h5``."""
    import h5py

    path = Path(folder) / "attention.h5"
    sizes = np.asarray([len(a) for a in attention], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    heads = max((a.shape[1] for a in attention if a.ndim == 2), default=0)
    flat = (np.concatenate([a.reshape(len(a), -1) if heads else a.reshape(-1) for a in attention])
            if len(attention) else np.zeros(0, np.float32))  # fmt: skip
    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = ATTENTION_FORMAT
        f.attrs["format_version"] = 1
        f.attrs["meta"] = json.dumps(meta or {})
        f.create_dataset("bag_id", data=np.asarray([str(b) for b in bag_ids], dtype=object),
                         dtype=h5py.string_dtype())  # fmt: skip
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("attention", data=flat.astype(np.float32))
    tmp.replace(path)
    return path


def read_attention(folder: str | Path) -> dict[str, np.ndarray]:
    """Per-bag attention arrays from ``attention.h5``."""
    import h5py

    path = Path(folder) / "attention.h5"
    if not path.exists():
        raise UserError(f"{path}: no attention file here")
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != ATTENTION_FORMAT:
            raise UserError(f"{path}: not a milcore attention file")
        ids = [b.decode() if isinstance(b, bytes) else str(b) for b in f["bag_id"][:]]
        offsets = f["offsets"][:]
        att = f["attention"][:]
    return {b: att[offsets[i] : offsets[i + 1]] for i, b in enumerate(ids)}


PREDICTIONS_FORMAT = "milcore-predictions"


def prediction_sources(folder: str | Path) -> dict:
    """Bank, cohort and kind of a prediction folder: a training run (``config.yaml``) or a predict output
    (``predictions.json``), with the ensemble's description and whether it was partial. Paths are returned
    as stored (absolute for predict outputs)."""
    import yaml

    folder = Path(folder)
    pj, cfg_path = folder / "predictions.json", folder / "config.yaml"
    try:
        if pj.is_file():
            meta = json.loads(pj.read_text())
            if isinstance(meta, dict):
                ensemble = meta.get("ensemble") if isinstance(meta.get("ensemble"), dict) else {}
                return {"kind": "predict", "bank": meta.get("bank"), "cohort": meta.get("cohort"),
                        "ensemble": ensemble.get("description"), "partial": bool(ensemble.get("partial"))}  # fmt: skip
        if cfg_path.is_file():
            cfg = yaml.safe_load(cfg_path.read_text())
            run = cfg.get("run", {}) if isinstance(cfg, dict) else {}
            run = run if isinstance(run, dict) else {}
            return {"kind": "run", "bank": run.get("bank"), "cohort": run.get("cohort"), "ensemble": None,
                    "partial": False}
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"{folder}: unreadable predictions.json / config.yaml ({exc})") from exc
    return {"kind": None, "bank": None, "cohort": None, "ensemble": None, "partial": False}


@dataclass
class PredictionRun:
    """What :func:`run_prediction` produced.

    Attributes:
        table: the predictions (labels filled from the cohort where given).
        checkpoints: the checkpoints averaged.
        task: the checkpoints' task (label column), ``None`` when they do not record it.
        metrics: the scores on the labelled bags (``metrics.json``), ``None`` without a cohort.
        meta: the content of ``predictions.json``.
    """

    table: PredictionTable
    checkpoints: CheckpointSet
    task: str | None
    metrics: dict | None
    meta: dict


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


def run_prediction(checkpoints: Sequence[str | Path], bank_path: str | Path, out: str | Path, *,
                   cohort: str | Path | None = None, task: str | None = None, cells: str | Path | None = None,
                   allow_partial: bool = False, allow_task_rename: bool = False, overwrite: bool = False,
                   batch_instances: int = 16384, device: str = "auto",
                   n_boot: int = 1000) -> PredictionRun:  # fmt: skip
    """Apply one checkpoint, or the mean of several (a fold ensemble), to every bag of a bank.

    Everything is checked before the first byte is written: ``out``, run completeness, each
    checkpoint's integrity (card and weights SHA-256, finite weights, tensor shapes), the encoder
    fingerprint and dimension, that all checkpoints share classes and task, the ``task`` column and
    labels of ``cohort`` against the checkpoints' task and classes, and that every output is finite.
    The folder is written under a temporary name and renamed into place, so a failed prediction
    leaves nothing behind.

    Args:
        checkpoints: fold checkpoint folders and/or run folders (all folds averaged).
        bank_path: the feature bank to predict.
        out: output folder (absent or empty unless ``overwrite``).
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

    Raises:
        UserError: any check above fails (nothing is written).
    """
    from feature_cache.bank import EncoderInfo, open_reader
    from feature_cache.devices import resolve_device
    from milcore.metrics.calibration import softmax
    from milcore.training.checkpoint import CARD, checkpoint_task, load_checkpoint, resolve_checkpoints
    from milcore.training.config import TrainConfig
    from milcore.training.features import FeatureStore
    from milcore.training.trainer import Trainer

    if (cohort is None) != (task is None):
        raise UserError("--cohort and --task go together")
    if cells is not None and cohort is None:
        raise UserError("--cells needs --cohort and --task (it is the ground truth of a labelled cohort)")
    out = check_out(out, overwrite)
    ckset = resolve_checkpoints(checkpoints, allow_partial=allow_partial)
    dev = resolve_device(device)
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
    models, cards = [], []
    classes: list[str] | None = None
    ck_task: str | None = None
    for ckpt in ckset.paths:
        model, card = load_checkpoint(ckpt, dev)
        if card.get("encoder"):
            try:
                info = EncoderInfo.from_dict(card["encoder"])
            except (UserError, TypeError, ValueError) as exc:
                raise UserError(f"{ckpt / CARD}: unreadable encoder fingerprint ({exc})") from exc
            info.check_compatible(bank.info, where=str(bank_path))
        else:
            log.warning("%s records no encoder fingerprint; %s cannot be checked against it", ckpt, bank_path)
        if model.config.in_dim != bank.dim:
            raise UserError(f"{bank_path}: features are {bank.dim}-d but {ckpt} expects {model.config.in_dim}-d")
        if classes is not None and card["classes"] != classes:
            raise UserError(f"{ckpt}: classes {card['classes']} differ from the other checkpoints' {classes}")
        this_task = checkpoint_task(ckpt, card)
        if models and this_task != ck_task:
            raise UserError(f"{ckpt}: task {this_task!r} differs from the other checkpoints' {ck_task!r}")
        classes, ck_task = list(card["classes"]), this_task
        models.append(model)
        cards.append(card)
    assert classes is not None
    where = str(ckset.paths[0]) if len(ckset.paths) == 1 else f"{ckset.paths[0].parent} ({ckset.describe()})"
    log.info("checkpoint task %s, classes %s (%s)", repr(ck_task) if ck_task else "not recorded", ", ".join(classes),
             ckset.describe())  # fmt: skip
    labels = np.full(len(ids), -1, dtype=np.int64)
    if cohort is not None:
        assert task is not None
        _check_task(task, ck_task, classes, where, allow_task_rename)
        labels = _load_labels(cohort, task, classes, ids, where, ck_task, empty)
    store = FeatureStore(bank, ids, with_coords=True)
    probas, attentions = [], None
    for ckpt, model, card in zip(ckset.paths, models, cards, strict=True):
        trainer = Trainer(TrainConfig(model=card["model"], batch_instances=batch_instances, device=str(dev)),
                          bank.dim, len(classes))  # fmt: skip
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
    attention = [a / len(ckset.paths) for a in attentions]
    metrics = None
    if cohort is not None and (labels >= 0).any():
        metrics = score_predictions(table, attention, bank, task or "", cohort, cells, n_boot=n_boot)
        metrics["ensemble"] = ckset.describe()
    meta = {
        "format": PREDICTIONS_FORMAT, "format_version": 1,
        "bank": str(Path(bank_path).resolve()), "cohort": str(Path(cohort).resolve()) if cohort else None,
        "task": ck_task, "label_column": task, "classes": classes, "ensemble": ckset.to_dict(),
        "checkpoints": [str(p.resolve()) for p in ckset.paths], "bags": len(ids),
        "not_predicted": {"no_cells": empty},
        "labelled": int((labels >= 0).sum()),
        "predicted_counts": {c: int((table.predicted == i).sum()) for i, c in enumerate(classes)},
    }  # fmt: skip
    _write_folder(out, overwrite, table, attention, meta, metrics)
    return PredictionRun(table, ckset, ck_task, metrics, meta)


def _write_folder(out: Path, overwrite: bool, table: PredictionTable, attention: list[np.ndarray], meta: dict,
                  metrics: dict | None) -> None:  # fmt: skip
    """Write the prediction folder under a temporary name, then move it into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise UserError(f"{out}: cannot write the predictions here ({exc.strerror or exc})") from exc
    old = None
    try:
        write_predictions(tmp, table)
        write_attention(tmp, table.bag_ids, attention, meta)
        (tmp / "predictions.json").write_text(json.dumps(meta, indent=2))
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
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


def predict_bank(checkpoints: Sequence[str | Path], bank_path: str | Path, out: str | Path,
                 batch_instances: int = 16384, device: str = "auto", **options) -> PredictionTable:  # fmt: skip
    """:func:`run_prediction`, returning only the table (``options`` are its keyword arguments)."""
    return run_prediction(checkpoints, bank_path, out, batch_instances=batch_instances, device=device,
                          **options).table  # fmt: skip


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
