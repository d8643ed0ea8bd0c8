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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feature_cache.errors import UserError

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
    """Read ``predictions.csv`` from a run or prediction folder."""
    path = Path(folder) / "predictions.csv"
    if not path.exists():
        raise UserError(f"{path}: no predictions here (expected a training run or a 'milcore predict' output)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        classes = [c[len("prob_"):] for c in reader.fieldnames or [] if c.startswith("prob_")]
        rows = list(reader)
    index = {c: i for i, c in enumerate(classes)}
    return PredictionTable(
        bag_ids=[r["bag_id"] for r in rows],
        classes=classes,
        proba=np.asarray([[float(r[f"prob_{c}"]) for c in classes] for r in rows], dtype=float).reshape(
            -1, len(classes)
        ),
        labels=np.asarray([index.get(r["label"], -1) for r in rows], dtype=np.int64),
        folds=np.asarray([int(r["fold"]) for r in rows], dtype=np.int64),
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


def predict_bank(checkpoints: Sequence[str | Path], bank_path: str | Path, out: str | Path,
                 batch_instances: int = 16384, device: str = "auto") -> PredictionTable:  # fmt: skip
    """Apply one checkpoint, or the mean of several (a fold ensemble), to every bag of a bank.

    Refuses a bank whose encoder fingerprint differs from the checkpoints' training bank. Writes
    ``predictions.csv``, ``attention.h5`` and ``predictions.json`` into ``out``.
    """
    from feature_cache.bank import EncoderInfo, open_reader
    from feature_cache.devices import resolve_device
    from milcore.training.calibration import softmax
    from milcore.training.checkpoint import load_checkpoint
    from milcore.training.config import TrainConfig
    from milcore.training.features import FeatureStore
    from milcore.training.trainer import Trainer

    if not checkpoints:
        raise UserError("no checkpoint given")
    bank = open_reader(bank_path)
    ids = bank.bag_ids()
    dev = resolve_device(device)
    probas, attentions, classes = [], None, None
    for ckpt in checkpoints:
        model, card = load_checkpoint(ckpt, dev)
        if card.get("encoder"):
            EncoderInfo.from_dict(card["encoder"]).check_compatible(bank.info, where=str(bank_path))
        if model.config.in_dim != bank.dim:
            raise UserError(f"{bank_path}: features are {bank.dim}-d but {ckpt} expects {model.config.in_dim}-d")
        if classes is not None and card["classes"] != classes:
            raise UserError(f"{ckpt}: classes {card['classes']} differ from the other checkpoints' {classes}")
        classes = card["classes"]
        store = FeatureStore(bank, ids, with_coords=True)
        trainer = Trainer(TrainConfig(model=card["model"], batch_instances=batch_instances, device=str(dev)),
                          bank.dim, len(classes))  # fmt: skip
        preds = trainer.predict(model, store)
        probas.append(softmax(preds.logits, card.get("temperature", 1.0)))
        att = [a if a.ndim == 1 else a.mean(axis=1) for a in preds.attention]
        attentions = att if attentions is None else [x + y for x, y in zip(attentions, att, strict=True)]
    assert classes is not None and attentions is not None
    table = PredictionTable(ids, list(classes), np.mean(probas, axis=0), np.full(len(ids), -1),
                            np.full(len(ids), -1))  # fmt: skip
    out = Path(out)
    write_predictions(out, table)
    write_attention(out, ids, [a / len(checkpoints) for a in attentions],
                    {"bank": str(bank_path), "checkpoints": [str(c) for c in checkpoints]})  # fmt: skip
    (out / "predictions.json").write_text(json.dumps({
        "bank": str(bank_path), "checkpoints": [str(c) for c in checkpoints], "classes": classes,
        "bags": len(ids), "predicted_counts": {c: int((table.predicted == i).sum()) for i, c in enumerate(classes)},
    }, indent=2))  # fmt: skip
    return table


def evaluate_predictions(folder: str | Path, cohort_path: str | Path, task: str, bank_path: str | Path,
                         cells: str | Path | None = None, n_boot: int = 1000) -> dict:  # fmt: skip
    """Score a prediction folder against a labelled cohort (external test set): ``metrics.json``.

    Bags without a label are ignored (reported); labels must be among the checkpoint's classes.
    Instance AUROC is added when a ``cells.csv`` ground truth is given or found beside the cohort.
    """
    from feature_cache.bank import open_reader
    from milcore.data.cohort import read_cohort
    from milcore.training.metrics import evaluate

    table = read_predictions(folder)
    cohort = read_cohort(cohort_path, task, classes=table.classes)
    label_of = dict(zip(cohort.bag_ids, cohort.labels, strict=True))
    keep = [i for i, b in enumerate(table.bag_ids) if b in label_of]
    if not keep:
        raise UserError(f"{cohort_path}: no predicted bag has a {task!r} label")
    ids = [table.bag_ids[i] for i in keep]
    y = np.asarray([label_of[b] for b in ids])
    report = evaluate(y, table.proba[keep], table.classes, n_boot=n_boot)
    metrics = {"task": task, "classes": table.classes, "n": len(ids),
               "unlabelled": len(table.bag_ids) - len(ids), **report}  # fmt: skip
    cells = Path(cells) if cells else Path(cohort_path).with_name("cells.csv")
    bank = open_reader(bank_path)
    if cells.exists() and "cell_id" in bank.columns:
        from milcore.data.ground_truth import instance_auroc, load_cell_truth

        attention = read_attention(folder)
        metrics["instance"] = instance_auroc(attention, load_cell_truth(cells, bank, ids))
    (Path(folder) / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return metrics
