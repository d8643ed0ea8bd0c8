"""Prediction stores: per-patient probabilities (``predictions.csv``) and per-cell attention (``attention.h5``).

A prediction folder (a training run or a ``milcore predict`` output) holds ``predictions.csv`` (bag id,
probabilities per class, predicted class and, where known, the label and the fold) and ``attention.h5``:
per-cell attention in CSR layout aligned with the rows of the bank the predictions were made from
(``offsets`` (B+1,), ``attention`` (N,) or (N, H)), so attention row ``i`` of bag ``b`` is bank row ``i``
of that bag. ``predictions.json`` (predict) or ``config.yaml`` (a run) name the bank and the cohort.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import UserError

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


def write_predictions(folder: str | Path, table: PredictionTable,
                      extra: Mapping[str, Sequence[Any]] | None = None) -> Path:  # fmt: skip
    """Write ``predictions.csv`` into ``folder``; ``extra`` columns (one value per bag, e.g. uncertainty scores,
    a referral flag) follow the probabilities (floats with 6 decimals)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "predictions.csv"
    extra = dict(extra or {})
    clash = [k for k in extra if k.startswith("prob_") or k in ("bag_id", "fold", "label", "predicted")]
    if clash or any(len(v) != len(table.bag_ids) for v in extra.values()):
        raise ValueError(f"extra prediction columns must not clash and must hold one value per bag: {clash or extra}")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["bag_id", "fold", "label", "predicted", *[f"prob_{c}" for c in table.classes], *extra])
        for i, b in enumerate(table.bag_ids):
            label = table.classes[table.labels[i]] if table.labels[i] >= 0 else ""
            w.writerow([b, int(table.folds[i]), label, table.classes[table.predicted[i]],
                        *[f"{p:.6f}" for p in table.proba[i]],
                        *[f"{v[i]:.6f}" if isinstance(v[i], float | np.floating) else v[i]
                          for v in extra.values()]])  # fmt: skip
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
    from milcore.data.inputs import read_run_config

    folder = Path(folder)
    pj = folder / "predictions.json"
    try:
        if pj.is_file():
            meta = json.loads(pj.read_text())
            if isinstance(meta, dict):
                ensemble = meta.get("ensemble") if isinstance(meta.get("ensemble"), dict) else {}
                return {"kind": "predict", "bank": meta.get("bank"), "cohort": meta.get("cohort"),
                        "ensemble": ensemble.get("description"), "partial": bool(ensemble.get("partial"))}  # fmt: skip
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{pj}: unreadable ({exc})") from exc
    cfg = read_run_config(folder, "cannot tell which bank these predictions come from")
    if cfg is not None:
        run = cfg.get("run") if isinstance(cfg.get("run"), dict) else {}
        return {"kind": "run", "bank": run.get("bank"), "cohort": run.get("cohort"), "ensemble": None,
                "partial": False}
    return {"kind": None, "bank": None, "cohort": None, "ensemble": None, "partial": False}
