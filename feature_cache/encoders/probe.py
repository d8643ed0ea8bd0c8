"""Probing an encoder on labelled cells (``milcore encoder probe``): how much cell-type information its
features hold, read by a linear classifier and by nearest neighbours.

Any registered encoder works, with its default or trained weights. The cells' features are computed
once; then

- **logistic regression** (scikit-learn; standardised features, class-balanced, L2 ``C``) and
- **k-NN** (cosine distance on the features, distance-weighted votes, ``k`` neighbours)

are fitted on the training part and scored on the evaluation part: the data's official split
(``train`` -> ``test``, e.g. BloodMNIST; ``val`` is not used) or, for data without one, stratified
``folds``-fold cross-validation (out-of-fold predictions pooled). Reported for each: accuracy, balanced
accuracy, macro-F1 and one-vs-rest AUROC per class, each with a percentile bootstrap 95% CI over
the evaluated cells, and the confusion matrix.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from feature_cache.config import Config, option

if TYPE_CHECKING:  # numpy is imported where used: the CLI reads the config without loading numpy
    import numpy as np

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", "split", "cv")


@dataclass(frozen=True)
class ProbeConfig(Config):
    """One probe.

    Attributes:
        data: labelled cells: class-per-folder tree, CSV (path, label[, split]) or MedMNIST ``.npz``.
        encoder: registered encoder name.
        weights: its weights file (trained ones carry their input size).
        encoder_options: encoder options (e.g. ``{"image_size": 96}``).
        protocol: ``split`` (train -> test), ``cv``, or ``auto`` (split when the data has train and test).
        folds: cross-validation folds.
        knn_k: neighbours of the k-NN probe.
        c: inverse L2 strength of the logistic regression.
        max_iter: logistic regression iterations.
        n_boot: bootstrap resamples for the CIs.
        max_cells: at most this many cells per split (stratified sample; 0: all).
        batch_size: crops per forward pass.
        device: ``auto``, ``cpu``, ``cuda``...
        seed: random seed (folds, bootstrap, sampling).
    """

    config_key = "probe option"

    data: str
    encoder: str
    weights: str | None = None
    encoder_options: dict[str, Any] = field(default_factory=dict)
    protocol: str = option("auto", choices=PROTOCOLS)
    folds: int = option(5, low=2)
    knn_k: int = option(20, low=1)
    c: float = option(1.0, low=0, low_open=True)
    max_iter: int = option(3000, low=10)
    n_boot: int = option(1000, low=0)
    max_cells: int = option(0, low=0)
    batch_size: int = option(128, low=1)
    device: str = "auto"
    seed: int = option(0, low=0)


def logistic_model(c: float = 1.0, max_iter: int = 3000):
    """Standardise, then class-balanced multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, class_weight="balanced"))


def knn_model(k: int = 20):
    """Cosine k-NN with distance-weighted votes."""
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance", algorithm="brute")


def _point_metrics(y: np.ndarray, prob: np.ndarray, n_classes: int) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    pred = prob.argmax(1)
    auroc = []
    for c in range(n_classes):
        pos = y == c
        auroc.append(float(roc_auc_score(pos, prob[:, c])) if 0 < pos.sum() < len(y) else float("nan"))
    return {"accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, labels=list(range(n_classes)), average="macro", zero_division=0)),
            "auroc": auroc}  # fmt: skip


def evaluate(y: np.ndarray, prob: np.ndarray, classes: tuple[str, ...], n_boot: int = 1000,
             seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Metrics of class probabilities with percentile-bootstrap 95% CIs (cells resampled).

    Args:
        y: (n,) true class indices.
        prob: (n, C) predicted probabilities.
        classes: class names.
        n_boot: resamples (0: no CI).
        seed: bootstrap seed.

    Returns:
        ``{"accuracy": {"value", "ci95"}, "balanced_accuracy": ..., "macro_f1": ..., "auroc": {class:
        {"value", "ci95"}}, "macro_auroc": ..., "confusion": [[...]], "n": n}``.
    """
    import numpy as np
    from sklearn.metrics import confusion_matrix

    k = len(classes)
    point = _point_metrics(y, prob, k)
    boots: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        boots.append(_point_metrics(y[idx], prob[idx], k))

    def ci(values: list[float]) -> list[float]:
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [float("nan")] * 2

    out: dict[str, Any] = {"n": len(y)}
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        out[key] = {"value": point[key], "ci95": ci([b[key] for b in boots])}
    out["auroc"] = {c: {"value": point["auroc"][i], "ci95": ci([b["auroc"][i] for b in boots])}
                    for i, c in enumerate(classes)}  # fmt: skip
    macro = [float(np.nanmean(b["auroc"])) for b in boots]
    out["macro_auroc"] = {"value": float(np.nanmean(point["auroc"])), "ci95": ci(macro)}
    out["confusion"] = confusion_matrix(y, prob.argmax(1), labels=list(range(k))).tolist()
    return out


def _full_proba(model: Any, x: np.ndarray, k: int) -> np.ndarray:
    """``predict_proba`` with a column for every class (a fold may miss one)."""
    import numpy as np

    prob = np.zeros((len(x), k))
    prob[:, model.classes_] = model.predict_proba(x)
    return prob


def probe_split(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                classes: tuple[str, ...], config: ProbeConfig) -> dict[str, Any]:  # fmt: skip
    """Both probes fitted on the training cells, scored on the test cells."""
    k = len(classes)
    out = {}
    for name, model in (("logistic", logistic_model(config.c, config.max_iter)), ("knn", knn_model(config.knn_k))):
        prob = _full_proba(model.fit(x_train, y_train), x_test, k)
        out[name] = evaluate(y_test, prob, classes, config.n_boot, config.seed)
    return out


def probe_cv(x: np.ndarray, y: np.ndarray, classes: tuple[str, ...], config: ProbeConfig) -> dict[str, Any]:
    """Both probes in stratified k-fold cross-validation; metrics of the pooled out-of-fold predictions."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    k = len(classes)
    folds = StratifiedKFold(config.folds, shuffle=True, random_state=config.seed)
    probs = {"logistic": np.zeros((len(y), k)), "knn": np.zeros((len(y), k))}
    for tr, te in folds.split(x, y):
        probs["logistic"][te] = _full_proba(logistic_model(config.c, config.max_iter).fit(x[tr], y[tr]), x[te], k)
        probs["knn"][te] = _full_proba(knn_model(config.knn_k).fit(x[tr], y[tr]), x[te], k)
    return {name: evaluate(y, p, classes, config.n_boot, config.seed) for name, p in probs.items()}


def _sample(cells: Any, n: int, seed: int) -> Any:
    if not n or len(cells) <= n:
        return cells
    from feature_cache.encoders.train_supervised import stratified_split

    _, keep = stratified_split(cells.labels, n / len(cells), seed)
    return cells.subset(keep)


def run_probe(config: ProbeConfig) -> dict[str, Any]:
    """Encode the cells and probe (see the module docstring).

    Returns:
        ``{"protocol", "encoder" (fingerprint), "classes", "cells", "logistic": metrics, "knn": metrics,
        "seconds": {"encode", "probe"}}``.

    Raises:
        UserError: bad data (one line naming the file), unknown encoder or option, weights problems,
            ``protocol="split"`` on data without train and test splits, or too few cells per class for
            the folds.
    """
    import numpy as np

    from feature_cache.devices import resolve_device
    from feature_cache.encoders import check_encoder_options, create_encoder
    from feature_cache.encoders.celldata import read_cells
    from feature_cache.errors import UserError

    device = resolve_device(config.device, option="--device")
    options = check_encoder_options(config.encoder, config.encoder_options)
    cells = read_cells(config.data, labelled=True)
    has_split = (cells.split == "train").any() and (cells.split == "test").any()
    protocol = config.protocol if config.protocol != "auto" else ("split" if has_split else "cv")
    if protocol == "split" and not has_split:
        raise UserError(f"{config.data}: --protocol split needs crops of both the train and the test split")
    encoder = create_encoder(config.encoder, weights=config.weights, device=device, **options)
    t0 = time.perf_counter()
    if protocol == "split":
        train, test = (_sample(cells.of_split(s), config.max_cells, config.seed) for s in ("train", "test"))
        x_train = encoder.encode(train.images, config.batch_size)  # (n, D)
        x_test = encoder.encode(test.images, config.batch_size)
        t1 = time.perf_counter()
        result = probe_split(x_train, train.labels, x_test, test.labels, cells.classes, config)
        sizes = {"train": len(train), "test": len(test)}
    else:
        data = _sample(cells, config.max_cells, config.seed)
        counts = np.bincount(data.labels, minlength=len(cells.classes))
        if counts[counts > 0].min() < config.folds:
            i = int(np.nonzero(counts == counts[counts > 0].min())[0][0])
            raise UserError(f"{config.data}: class {cells.classes[i]} has {counts[i]} crop(s), fewer than the "
                            f"{config.folds} folds")  # fmt: skip
        x = encoder.encode(data.images, config.batch_size)
        t1 = time.perf_counter()
        result = probe_cv(x, data.labels, cells.classes, config)
        sizes = {"cells": len(data)}
    return {"protocol": protocol, "folds": config.folds if protocol == "cv" else None,
            "encoder": encoder.info.to_dict(), "weights": config.weights, "classes": list(cells.classes),
            "cells": sizes, "data": cells.source,
            "data_fingerprint": cells.fingerprint, **result,
            "seconds": {"encode": round(t1 - t0, 2), "probe": round(time.perf_counter() - t1, 2)},
            "config": config.to_dict()}  # fmt: skip


def format_probe(result: dict[str, Any]) -> str:
    """A Markdown table of a probe result."""
    def cell(m: dict[str, Any]) -> str:
        lo, hi = m["ci95"]
        return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [f"encoder {result['encoder']['name']} ({result['encoder']['fingerprint'][:12]}), protocol "
             f"{result['protocol']}, cells {result['cells']}", "",
             "| probe | accuracy | balanced accuracy | macro-F1 | macro AUROC |", "|---|---|---|---|---|"]  # fmt: skip
    for name in ("logistic", "knn"):
        m = result[name]
        lines.append(f"| {name} | {cell(m['accuracy'])} | {cell(m['balanced_accuracy'])} | {cell(m['macro_f1'])} "
                     f"| {cell(m['macro_auroc'])} |")  # fmt: skip
    lines += ["", "| class | logistic AUROC | k-NN AUROC |", "|---|---|---|"]
    for c in result["classes"]:
        lines.append(f"| {c} | {cell(result['logistic']['auroc'][c])} | {cell(result['knn']['auroc'][c])} |")
    return "\n".join(lines)
