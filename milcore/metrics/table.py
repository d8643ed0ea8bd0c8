"""The metric table: every metric the engine reports, written once.

Each :class:`Metric` names a metric, says whether higher is better, how reports label it (``label`` in
sentences and headings, ``short`` in table columns), how it is computed from one set of labelled
predictions (``fn(y_true (n,), proba (n, C), n_bins) -> float``) and, where the audit needs it, from many
weightings of the patients at once (``weighted(pred, counts) -> (R,)`` or ``(R, C)``, see
:mod:`milcore.metrics.weighted`). The training headline, ``metrics.json``, the audit, the benchmark and
every report read their metric names, directions and labels from :data:`TABLE`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from milcore.metrics import classification as cl
from milcore.metrics import weighted as wt


@dataclass(frozen=True)
class Metric:
    """One reported metric.

    Attributes:
        name: key in every JSON output (``balanced_accuracy``).
        higher_is_better: the direction of "better".
        label: how prose and headings name it (``balanced accuracy``).
        short: how a table column names it (``bal. acc.``).
        fn: ``(y_true, proba, n_bins) -> float`` on one set of predictions; ``None`` for metrics computed
            from something else (attention, groups).
        weighted: group-weighted version (``(LabelledPredictions, WeightedCounts) -> array``), or ``None``.
        headline: one of the training run's headline metrics (mean ± sd over folds in ``metrics.json``).
        per_class: one value per class (``recall[CLASS]`` in the audit).
        chance: the metric has a chance level (the caveats compare its CI with it).
        worst: the worst value the metric can take (the audit's minimum detectable effect cannot exceed the
            distance to it): 0 for higher-is-better rates, 1 for lower-is-better ones, infinity for the log-loss.
    """

    name: str
    higher_is_better: bool
    label: str
    short: str
    fn: Callable[[np.ndarray, np.ndarray, int], float] | None = None
    weighted: Callable[[Any, Any], np.ndarray] | None = None
    headline: bool = False
    per_class: bool = False
    chance: bool = False
    worst: float | None = None

    def __post_init__(self) -> None:
        if self.worst is None:
            object.__setattr__(self, "worst", 0.0 if self.higher_is_better else 1.0)


def _pred(proba: np.ndarray) -> np.ndarray:
    return np.asarray(proba).argmax(axis=1)


_ROWS = (
    Metric("balanced_accuracy", True, "balanced accuracy", "bal. acc.",
           lambda y, p, bins: cl.balanced_accuracy(y, _pred(p), p.shape[1]), wt.weighted_balanced_accuracy,
           headline=True, chance=True),
    Metric("macro_f1", True, "macro-F1", "macro-F1", lambda y, p, bins: cl.macro_f1(y, _pred(p), p.shape[1]),
           wt.weighted_macro_f1, headline=True),
    Metric("auroc", True, "AUROC", "AUROC", lambda y, p, bins: cl.macro_auroc(y, p), wt.weighted_auroc,
           headline=True, chance=True),
    Metric("accuracy", True, "accuracy", "acc.", lambda y, p, bins: cl.accuracy(y, _pred(p))),
    Metric("ece", False, "ECE", "ECE", lambda y, p, bins: cl.expected_calibration_error(y, p, bins), wt.weighted_ece,
           headline=True),
    Metric("balanced_log_loss", False, "class-balanced log-loss", "bal. log-loss",
           lambda y, p, bins: cl.balanced_log_loss(y, p), wt.weighted_balanced_log_loss, worst=math.inf),
    Metric("balanced_brier", False, "class-balanced Brier score", "bal. Brier",
           lambda y, p, bins: cl.balanced_brier(y, p), wt.weighted_balanced_brier),
    Metric("balanced_log_odds", True, "class-balanced true-class log-odds", "bal. log-odds",
           lambda y, p, bins: cl.balanced_log_odds(y, p), wt.weighted_balanced_log_odds, worst=-cl.LOG_ODDS_CLIP),
    Metric("ece_uncalibrated", False, "ECE before temperature scaling", "raw ECE"),
    Metric("instance_auroc", True, "attention instance-AUROC", "inst. AUROC"),
    Metric("recall", True, "recall", "recall", weighted=wt.weighted_recall, per_class=True),
    Metric("fpr", False, "false-positive rate", "FPR", weighted=wt.weighted_fpr, per_class=True),
    Metric("selection_rate", True, "selection rate", "sel. rate", weighted=wt.weighted_selection_rate,
           per_class=True),
    Metric("equalized_odds_difference", False, "equalized-odds difference", "EOD"),
    Metric("demographic_parity_difference", False, "demographic-parity difference", "DPD"),
)  # fmt: skip

#: Every metric by name, in report order.
TABLE: dict[str, Metric] = {m.name: m for m in _ROWS}
#: Metrics of one set of predictions (``scalar_metrics``), in ``metrics.json`` order.
SCALAR_METRICS: tuple[str, ...] = tuple(m.name for m in _ROWS if m.fn is not None)
#: The training run's headline (mean ± sd over folds), also what the imbalance experiment and the benchmark record.
HEADLINE: tuple[str, ...] = tuple(m.name for m in _ROWS if m.headline)
#: Scalar metrics with a group-weighted function: what an audit can test per group.
GROUP_METRICS: tuple[str, ...] = tuple(m.name for m in _ROWS if m.weighted is not None and not m.per_class)
#: Per-class metrics of the audit (``recall[CLASS]``, ...).
PER_CLASS_METRICS: tuple[str, ...] = tuple(m.name for m in _ROWS if m.per_class)
#: Metrics with a chance level.
CHANCE_METRICS: tuple[str, ...] = tuple(m.name for m in _ROWS if m.chance)


def get_metric(name: str) -> Metric:
    """The table entry of ``name``; a per-class name such as ``recall[NPM1]`` or a prefixed one such as
    ``ood_auroc`` (benchmark: held-out site) finds its base metric.

    Raises:
        KeyError: not a metric of the table.
    """
    base = name.split("[", 1)[0]
    if base not in TABLE and base.startswith("ood_"):
        base = base[len("ood_"):]
    if base not in TABLE:
        raise KeyError(f"unknown metric {name!r} (known: {', '.join(TABLE)})")
    return TABLE[base]


def higher_is_better(name: str) -> bool:
    """Whether higher is better for ``name`` (``auroc``, ``recall[NPM1]``, ...)."""
    return get_metric(name).higher_is_better


def label(name: str, short: bool = False) -> str:
    """How reports name a metric (``short``: a table column); a per-class name keeps its class
    (``recall [NPM1]``); a name outside the table is returned as it is."""
    try:
        m = get_metric(name)
    except KeyError:
        return name
    text = m.short if short else m.label
    if name.startswith("ood_"):
        text = f"OOD {text}"
    if "[" in name:
        text += " [" + name.split("[", 1)[1]
    return text


def scalar_metrics(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 10) -> dict[str, float]:
    """Every :data:`SCALAR_METRICS` value of one set of labelled predictions.

    Args:
        y_true: (n,) integer labels.
        proba: (n, C) probabilities.
        n_bins: equal-width confidence bins of the ECE.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba)
    return {name: TABLE[name].fn(y_true, proba, n_bins) for name in SCALAR_METRICS}
