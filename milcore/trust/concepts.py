"""Morphological concepts: which hematologist-readable attributes a patient's top-attention cells carry.

Attribute heads are one scikit-learn logistic regression per attribute (WBCAtt-style: cell size,
nucleus shape, N:C ratio, chromatin, nucleoli, cytoplasm colour and texture, vacuoles, granularity,
granule colour and type, Auer rods; for red cells size, shape, central pallor and colour) on the
bank's standardised cell features, trained on cells whose attributes are known (``cells.csv`` of a
synthetic cohort, or any table with those columns) and scored on held-out *patients'* cells (macro-F1
per attribute). They predict attributes for any cell of a bank from the same encoder (a bank from
another encoder is refused).

Per patient, :func:`describe_top_cells` names the attribute values that distinguish the cells the
model looked at: a value is named when at least ``top_share`` of the top cells carry it and it is at
least ``min_lift`` times as frequent among them as among all the patient's cells ("high N:C ratio,
fine chromatin, Auer rods"). Heads are saved as JSON (coefficients, classes, the encoder's
fingerprint and the evaluation), never pickled.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.config import Config, option
from feature_cache.errors import UserError

log = logging.getLogger(__name__)

HEADS_FORMAT = "milcore-attribute-heads"
HEADS_VERSION = 1
#: Columns of a cell table that are never attributes.
NOT_ATTRIBUTES = ("patient_id", "bag_id", "cell_id", "cell_type", "is_diagnostic", "x", "y", "diagnostic_feature")


def known_attributes() -> tuple[str, ...]:
    """Attribute column names the engine knows (white- and red-cell vocabularies)."""
    from feature_cache.sources.synthetic_attributes import RED_ATTRIBUTES, WHITE_ATTRIBUTES

    return tuple(dict.fromkeys([*WHITE_ATTRIBUTES, *RED_ATTRIBUTES]))


def phrase(attribute: str, value: str) -> str:
    """How a report names an attribute value (``high N:C ratio``)."""
    from feature_cache.sources.synthetic_attributes import phrase as vocab_phrase

    return vocab_phrase(attribute, value)


@dataclass(frozen=True)
class ConceptConfig(Config):
    """Attribute heads and the per-patient description.

    Attributes:
        max_cells: cells sampled to train and evaluate the heads.
        heldout_fraction: share of the patients whose cells only evaluate the heads.
        c: inverse L2 regularisation strength of each logistic head.
        max_iter: optimiser iterations per head.
        top_share: a value is named for a patient when at least this share of its top cells carry it...
        min_lift: ...and it is at least this many times as frequent among them as among all its cells.
        seed: sampling and split seed.
    """

    config_key = "concept option"

    max_cells: int = option(12000, low=50)
    heldout_fraction: float = option(0.25, low=0, high=0.9, low_open=True)
    c: float = option(0.5, low=0, low_open=True)
    max_iter: int = option(300, low=10)
    top_share: float = option(0.5, low=0, high=1, low_open=True)
    min_lift: float = option(1.5, low=1)
    seed: int = option(0, low=0)


@dataclass
class CellAttributes:
    """Attribute labels of bank cells, aligned with the bank's rows.

    Attributes:
        columns: attribute names.
        values: per bag, (n, A) str array ('' where a cell has no row or no value).
        missing: bank cells without a row in the table.
    """

    columns: tuple[str, ...]
    values: dict[str, np.ndarray]
    missing: int = 0


def read_cell_attributes(cells_csv: str | Path, bank: Any, bag_ids: Iterable[str],
                         columns: Iterable[str] | None = None) -> CellAttributes:  # fmt: skip
    """Attribute labels from a cell table (``patient_id``/``bag_id``, ``cell_id``, attribute columns).

    Args:
        cells_csv: the table.
        bank: an open bank with a ``cell_id`` column.
        bag_ids: bags to align.
        columns: attribute columns (default: every known attribute present in the table).

    Raises:
        UserError: no such table, no id columns, no attribute column, or a bank without cell ids.
    """
    path = Path(cells_csv)
    if not path.is_file():
        raise UserError(f"{path}: cell attribute table not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        bag_col = "patient_id" if "patient_id" in header else "bag_id" if "bag_id" in header else None
        if bag_col is None or "cell_id" not in header:
            raise UserError(f"{path}: needs columns patient_id (or bag_id) and cell_id")
        wanted = list(columns) if columns is not None else [c for c in known_attributes() if c in header]
        absent = [c for c in wanted if c not in header]
        if absent or not wanted:
            raise UserError(f"{path}: no attribute column{' ' + ', '.join(absent) if absent else ''} (known "
                            f"attributes: {', '.join(known_attributes())})")  # fmt: skip
        rows = {(r[bag_col], r["cell_id"]): [r[c] or "" for c in wanted] for r in reader}
    if "cell_id" not in bank.columns:
        raise UserError(f"{bank.path}: the bank stores no cell ids, so cells cannot be matched to {path.name}")
    values, missing, empty = {}, 0, [""] * len(wanted)
    for b in bag_ids:
        ids = bank.read_column(b, "cell_id")
        got = [rows.get((b, str(c))) for c in ids]
        missing += sum(g is None for g in got)
        values[b] = np.asarray([g if g is not None else empty for g in got], dtype=object).reshape(len(ids), -1)
    if missing:
        log.warning("%s: %d bank cells have no attribute row (left out of the heads)", path, missing)
    return CellAttributes(tuple(wanted), values, missing)


@dataclass
class AttributeHeads:
    """One logistic head per attribute on standardised features.

    Attributes:
        attributes: attribute names.
        classes: per attribute, its values (head output order).
        mean, scale: (D,) feature standardisation.
        coef: per attribute, (K, D) weights (K = 1 for two classes: the logit of the second class).
        intercept: per attribute, (K,) biases.
        encoder: the fingerprint of the bank the heads were trained on.
        evaluation: per attribute, held-out macro-F1 and cell counts; ``macro_f1``: their mean.
    """

    attributes: tuple[str, ...]
    classes: dict[str, tuple[str, ...]]
    mean: np.ndarray
    scale: np.ndarray
    coef: dict[str, np.ndarray]
    intercept: dict[str, np.ndarray]
    encoder: dict[str, Any] | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)

    def proba(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """(n, D) features -> per attribute (n, K) probabilities."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale  # (n, D)
        out = {}
        for a in self.attributes:
            logits = z @ self.coef[a].T + self.intercept[a]  # (n, K) or (n, 1)
            if logits.shape[1] == 1:
                logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            out[a] = e / e.sum(axis=1, keepdims=True)
        return out

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """(n, D) features -> per attribute (n,) predicted values."""
        return {a: np.asarray(self.classes[a], dtype=object)[p.argmax(axis=1)] for a, p in self.proba(x).items()}

    def check_encoder(self, info: Any, where: str = "bank") -> None:
        """Refuse features from another encoder than the one the heads were trained on.

        Raises:
            UserError: name, weights, transform or dimension differ.
        """
        if not self.encoder:
            return
        diff = [k for k in ("name", "weights_sha256", "transform", "dim")
                if k in self.encoder and str(self.encoder[k]) != str(getattr(info, k, None))]  # fmt: skip
        if diff:
            raise UserError(f"{where}: encoded by {getattr(info, 'name', '?')!r}, but the attribute heads were trained "
                            f"on {self.encoder.get('name')!r} features ({', '.join(diff)} differ)")  # fmt: skip
        if int(self.encoder.get("dim", len(self.mean))) != len(self.mean):
            raise UserError(f"{where}: attribute heads of dimension {len(self.mean)} do not match the recorded encoder")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"format": HEADS_FORMAT, "format_version": HEADS_VERSION, "attributes": list(self.attributes),
                "classes": {a: list(c) for a, c in self.classes.items()}, "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "coef": {a: c.tolist() for a, c in self.coef.items()},
                "intercept": {a: c.tolist() for a, c in self.intercept.items()}, "encoder": self.encoder,
                "evaluation": self.evaluation}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "attribute heads") -> AttributeHeads:
        """Read back :meth:`to_dict`.

        Raises:
            UserError: another format, or arrays whose shapes do not fit.
        """
        if not isinstance(data, Mapping) or data.get("format") != HEADS_FORMAT:
            raise UserError(f"{where}: not a {HEADS_FORMAT} file")
        try:
            attrs = tuple(str(a) for a in data["attributes"])
            dim = len(data["mean"])
            heads = cls(attrs, {a: tuple(map(str, data["classes"][a])) for a in attrs},
                        np.asarray(data["mean"], dtype=np.float64), np.asarray(data["scale"], dtype=np.float64),
                        {a: np.asarray(data["coef"][a], dtype=np.float64).reshape(-1, dim) for a in attrs},
                        {a: np.asarray(data["intercept"][a], dtype=np.float64).reshape(-1) for a in attrs},
                        data.get("encoder"), dict(data.get("evaluation") or {}))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: damaged attribute heads ({exc})") from None
        for a in attrs:
            k = len(heads.classes[a])
            if heads.coef[a].shape[0] != (1 if k == 2 else k) or heads.intercept[a].shape[0] != heads.coef[a].shape[0]:
                raise UserError(f"{where}: attribute {a!r}: {k} classes but {heads.coef[a].shape[0]} weight rows")
        return heads

    def save(self, path: str | Path) -> Path:
        """Write the heads as JSON (atomically)."""
        from milcore.report.files import write_json_atomic

        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> AttributeHeads:
        """Read heads written by :meth:`save`.

        Raises:
            UserError: missing, unreadable or not heads.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: unreadable attribute heads ({exc})") from None
        return cls.from_dict(data, where=str(path))


def _split_patients(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: the cell belongs to a held-out patient (a seeded share of the patients, at least one)."""
    patients = np.unique(groups)
    rng = np.random.default_rng(seed)
    n_out = min(len(patients) - 1, max(1, round(fraction * len(patients))))
    held = set(rng.choice(patients, size=n_out, replace=False).tolist()) if n_out > 0 else set()
    return np.asarray([g in held for g in groups], dtype=bool)


def fit_attribute_heads(x: np.ndarray, labels: Mapping[str, np.ndarray], groups: np.ndarray,
                        config: ConceptConfig | None = None,
                        encoder: dict[str, Any] | None = None) -> AttributeHeads:  # fmt: skip
    """Train one logistic head per attribute on the cells of some patients; score them on the others.

    Args:
        x: (N, D) cell features.
        labels: per attribute, (N,) values ('' = unknown, left out of that head).
        groups: (N,) patient of each cell (held-out cells come from held-out patients).
        config: settings (:class:`ConceptConfig`).
        encoder: the fingerprint of the features' bank (recorded; checked when the heads are applied).

    Returns:
        Heads trained on the training patients' cells, with ``evaluation`` on the held-out ones: per attribute
        ``macro_f1``, ``cells_train``, ``cells_heldout``, ``classes``; attributes with a single value are
        recorded under ``skipped``.

    Raises:
        UserError: fewer than two patients, or no attribute with two values.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    config = config or ConceptConfig()
    x = np.asarray(x, dtype=np.float32)
    groups = np.asarray(groups)
    rng = np.random.default_rng(config.seed)
    if len(x) > config.max_cells:
        keep = np.sort(rng.choice(len(x), size=config.max_cells, replace=False))
        x, groups = x[keep], groups[keep]
        labels = {a: np.asarray(v)[keep] for a, v in labels.items()}
    if len(np.unique(groups)) < 2:
        raise UserError("attribute heads need the cells of at least two patients (training and held-out)")
    held = _split_patients(groups, config.heldout_fraction, config.seed)
    mean = x[~held].mean(axis=0).astype(np.float64)
    scale = x[~held].std(axis=0).astype(np.float64)
    scale = np.maximum(scale, 0.1 * np.median(scale) + 1e-8)
    z = (x - mean) / scale  # (N, D)
    heads = AttributeHeads((), {}, mean, scale, {}, {}, encoder, {"skipped": {}})
    scores = []
    for a, values in labels.items():
        values = np.asarray(values, dtype=object)
        known = values != ""
        train, test = known & ~held, known & held
        classes = sorted(set(values[train].tolist()))
        if len(classes) < 2:
            heads.evaluation["skipped"][a] = f"one value in the training cells ({classes[0] if classes else 'none'})"
            continue
        clf = LogisticRegression(C=config.c, max_iter=config.max_iter, class_weight="balanced")
        clf.fit(z[train], values[train])
        order = [list(clf.classes_).index(c) for c in classes]
        coef, bias = clf.coef_, clf.intercept_
        if coef.shape[0] > 1:
            coef, bias = coef[order], bias[order]
        heads.attributes += (a,)
        heads.classes[a] = tuple(classes)
        heads.coef[a], heads.intercept[a] = coef.astype(np.float64), bias.astype(np.float64)
        entry: dict[str, Any] = {"classes": classes, "cells_train": int(train.sum()), "cells_heldout": int(test.sum())}
        if test.any():
            pred = clf.predict(z[test])
            present = sorted(set(values[test].tolist()) | set(pred.tolist()))
            entry["macro_f1"] = float(f1_score(values[test], pred, labels=present, average="macro", zero_division=0))
            entry["heldout_support"] = {c: int((values[test] == c).sum()) for c in present}
            scores.append(entry["macro_f1"])
        heads.evaluation[a] = entry
    if not heads.attributes:
        raise UserError("no attribute has two values among the training cells: nothing to learn")
    heads.evaluation["macro_f1"] = float(np.mean(scores)) if scores else None
    heads.evaluation["patients_heldout"] = len(np.unique(groups[held]))
    heads.evaluation["patients_train"] = len(np.unique(groups[~held]))
    return heads


def heads_from_bank(bank: Any, attributes: CellAttributes, bag_ids: Iterable[str],
                    config: ConceptConfig | None = None) -> AttributeHeads:  # fmt: skip
    """Train heads on the listed bags' cells of a bank (their attribute labels in ``attributes``)."""
    config = config or ConceptConfig()
    bag_ids = [b for b in bag_ids if b in attributes.values]
    rng = np.random.default_rng(config.seed)
    total = sum(len(attributes.values[b]) for b in bag_ids)
    share = min(1.0, config.max_cells / max(total, 1))
    xs, ys, gs = [], [], []
    for b in bag_ids:
        vals = attributes.values[b]
        keep = np.flatnonzero(rng.random(len(vals)) < share) if share < 1 else np.arange(len(vals))
        if not len(keep):
            continue
        xs.append(np.asarray(bank.read(b), dtype=np.float32)[keep])
        ys.append(vals[keep])
        gs += [b] * len(keep)
    if not xs:
        raise UserError("no cell with attribute labels in the bank")
    y = np.concatenate(ys)  # (N, A)
    labels = {a: y[:, j] for j, a in enumerate(attributes.columns)}
    return fit_attribute_heads(np.concatenate(xs), labels, np.asarray(gs), config, bank.info.to_dict())


def describe_top_cells(heads: AttributeHeads, x_top: np.ndarray, x_all: np.ndarray,
                       config: ConceptConfig | None = None) -> dict[str, Any]:  # fmt: skip
    """The attributes of a patient's top-attention cells, and those that set them apart.

    Args:
        heads: attribute heads.
        x_top: (k, D) features of the top-attention cells (highest first).
        x_all: (n, D) features of all the patient's cells.
        config: thresholds (``top_share``, ``min_lift``).

    Returns:
        ``{"summary": "high N:C ratio, fine chromatin, Auer rods", "enriched": [{attribute, value, phrase,
        top_share, patient_share}], "cells": [{attribute: value}] (one per top cell)}``.
    """
    config = config or ConceptConfig()
    top = heads.predict(x_top)
    every = heads.predict(x_all)
    enriched = []
    for a in heads.attributes:
        values, counts = np.unique(top[a], return_counts=True)
        for v, c in zip(values, counts, strict=True):
            share_top = c / len(top[a])
            share_all = float(np.mean(every[a] == v))
            if share_top >= config.top_share and share_top >= config.min_lift * share_all:
                enriched.append({"attribute": a, "value": str(v), "phrase": phrase(a, str(v)),
                                 "top_share": round(float(share_top), 3),
                                 "patient_share": round(share_all, 3)})  # fmt: skip
    enriched.sort(key=lambda e: (-e["top_share"], e["patient_share"]))
    summary = ", ".join(e["phrase"] for e in enriched) or "no attribute sets the top cells apart from the others"
    cells = [{a: str(top[a][i]) for a in heads.attributes} for i in range(len(x_top))]
    return {"summary": summary, "enriched": enriched, "cells": cells}


def load_or_fit_heads(source: str | Path, bank: Any, bag_ids: Iterable[str],
                      config: ConceptConfig | None = None) -> AttributeHeads:  # fmt: skip
    """Attribute heads from ``source``: a heads file (``.json``, checked against the bank's encoder) or a cell
    table with attribute columns (``cells.csv``; heads trained on the listed bags' cells of ``bank``).

    Raises:
        UserError: a missing or damaged file, heads from another encoder, a table without attribute columns.
    """
    path = Path(source)
    if path.suffix.lower() == ".json":
        heads = AttributeHeads.load(path)
        heads.check_encoder(bank.info, str(bank.path))
        if len(heads.mean) != bank.dim:
            raise UserError(f"{path}: heads of dimension {len(heads.mean)}, {bank.path} holds {bank.dim}-d features")
        return heads
    bag_ids = list(bag_ids)
    attributes = read_cell_attributes(path, bank, bag_ids)
    heads = heads_from_bank(bank, attributes, bag_ids, config)
    heads.evaluation["source"] = str(path)
    return heads


def concepts_json(heads: AttributeHeads, patients: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``RUN/concepts.json`` (read by the model passport): the heads, their held-out macro-F1 per attribute
    (``scores``) and each described patient's summary."""
    scores = {a: heads.evaluation[a].get("macro_f1") for a in heads.attributes if isinstance(heads.evaluation.get(a),
                                                                                              dict)}  # fmt: skip
    return {**heads.to_dict(), "scores": {"macro_f1": heads.evaluation.get("macro_f1"), **scores},
            "patients": {b: {"summary": p.get("summary"), "enriched": p.get("enriched")}
                         for b, p in patients.items()}}  # fmt: skip
