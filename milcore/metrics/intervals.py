"""Uncertainty of metrics: bootstrap CIs over patients, the paired bootstrap of a gain, mean ± sd over folds, the CI
of a mean."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from milcore.metrics.table import get_metric, scalar_metrics
from milcore.metrics.weighted import LabelledPredictions, weighted_counts

#: How :func:`mean_ci` builds its interval.
MEAN_CI_METHODS = ("t", "bootstrap")


def bootstrap_ci(
    y_true: np.ndarray,
    proba: np.ndarray,
    fn: Callable[[np.ndarray, np.ndarray], dict[str, float]] = scalar_metrics,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    strata: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of every metric ``fn`` returns, resampling patients with replacement.

    Args:
        y_true: (n,) labels.
        proba: (n, C) probabilities.
        fn: metrics of one resample.
        n_boot: number of resamples.
        alpha: 1 - confidence level.
        seed: random seed.
        strata: (n,) optional groups resampled separately (keeps class or subgroup sizes fixed).

    Returns:
        ``{metric: (low, high)}``; NaN bounds where a metric is undefined in most resamples.
    """
    rng = np.random.default_rng(seed)
    n = len(y_true)
    if n == 0:
        return {}
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == g) for g in np.unique(strata)]
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        for k, v in fn(y_true[idx], proba[idx]).items():
            samples.setdefault(k, []).append(v)
    return {k: percentile_ci(np.asarray(values, dtype=float), alpha) for k, values in samples.items()}


def percentile_ci(samples: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of finite samples; NaN when fewer than half the samples are finite."""
    s = np.asarray(samples, dtype=float)
    finite = s[np.isfinite(s)]
    if len(finite) < max(1, len(s) / 2):
        return (math.nan, math.nan)
    return (float(np.quantile(finite, alpha / 2)), float(np.quantile(finite, 1 - alpha / 2)))


def stratified_counts(rng: np.random.Generator, strata: np.ndarray, n_boot: int) -> np.ndarray:
    """(B, n) bootstrap multiplicities: each stratum's patients resampled with replacement within it.

    Args:
        rng: random generator.
        strata: (n,) stratum label per patient (any hashable values).
        n_boot: resamples B.
    """
    strata = np.asarray(strata, dtype=object).astype(str)
    counts = np.zeros((n_boot, len(strata)))
    for value in np.unique(strata):
        idx = np.flatnonzero(strata == value)
        counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return counts


def bootstrap_gain(name: str, y_true: np.ndarray, proba_ref: np.ndarray, proba_new: np.ndarray, n_boot: int = 1000,
                   seed: int = 0, n_bins: int = 10) -> dict[str, Any]:  # fmt: skip
    """How much better metric ``name`` is for ``proba_new`` than for ``proba_ref`` on the same patients, and the
    standard error of that gain: a paired bootstrap, the patients resampled with replacement within each
    true class (every resample scores both sets of predictions on the same patients and keeps every class).

    Args:
        name: a scalar metric of :data:`milcore.metrics.TABLE` (``auroc``, ``balanced_accuracy``, ...).
        y_true: (n,) labels.
        proba_ref: (n, C) the reference predictions (a model's defaults, say).
        proba_new: (n, C) the candidate's predictions of the same patients.
        n_boot: resamples.
        seed: random seed.
        n_bins: confidence bins of the ECE.

    Returns:
        ``{"gain", "se", "ci95": [low, high], "n_boot"}``: the gain in the metric's better direction
        (positive: ``proba_new`` is better), its bootstrap standard deviation and percentile interval; NaN
        ``se`` and bounds where the metric is undefined in more than half the resamples.
    """
    metric = get_metric(name)
    if metric.fn is None:
        raise ValueError(f"bootstrap_gain: {name!r} is not a metric of one set of predictions")
    y = np.asarray(y_true, dtype=np.int64)
    ref, new = np.asarray(proba_ref, dtype=float), np.asarray(proba_new, dtype=float)
    if ref.shape != new.shape or ref.shape[0] != len(y):
        raise ValueError(f"bootstrap_gain: predictions of shapes {ref.shape} and {new.shape} for {len(y)} labels")
    sign = 1.0 if metric.higher_is_better else -1.0
    gain = sign * (metric.fn(y, new, n_bins) - metric.fn(y, ref, n_bins))
    W = stratified_counts(np.random.default_rng(seed), y, n_boot)  # (B, n)
    if metric.weighted is not None:  # every resample at once
        values = []
        for p in (ref, new):
            pred = LabelledPredictions(y, p, n_bins)
            values.append(np.asarray(metric.weighted(pred, weighted_counts(pred, W)), dtype=float))
        diffs = sign * (values[1] - values[0])  # (B,)
    else:
        idx = [np.repeat(np.arange(len(y)), w.astype(np.int64)) for w in W]
        diffs = np.asarray([sign * (metric.fn(y[i], new[i], n_bins) - metric.fn(y[i], ref[i], n_bins)) for i in idx])
    low, high = percentile_ci(diffs)  # NaN where fewer than half the resamples are finite
    finite = diffs[np.isfinite(diffs)]
    se = float(finite.std(ddof=1)) if math.isfinite(low) and len(finite) > 1 else math.nan
    return {"gain": float(gain), "se": se, "ci95": [low, high], "n_boot": n_boot}


def aggregate_folds(fold_metrics: Sequence[dict[str, float]]) -> dict[str, dict[str, float | list[float]]]:
    """Mean ± sd (ddof=1) of each scalar metric over folds (and seeds), NaNs ignored."""
    names = sorted({k for m in fold_metrics for k in m})
    out: dict[str, dict[str, float | list[float]]] = {}
    for k in names:
        values = np.asarray([m.get(k, math.nan) for m in fold_metrics], dtype=float)
        finite = values[np.isfinite(values)]
        out[k] = {
            "mean": float(finite.mean()) if len(finite) else math.nan,
            "sd": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0 if len(finite) else math.nan,
            "values": values.tolist(),
        }
    return out


def mean_ci(values: Sequence[float] | np.ndarray, alpha: float = 0.05, *, method: str = "t", n_boot: int = 2000,
            seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Mean of the finite ``values`` with a ``1 - alpha`` confidence interval.

    Args:
        values: repeated measurements (runs, folds x seeds); NaN and Inf are dropped.
        alpha: 1 - confidence level.
        method: ``t`` (Student-t interval: repeated trainings of one condition) or ``bootstrap``
            (percentile interval of ``n_boot`` resampled means, seeded by ``seed``: no normality assumed).

    Returns:
        ``{"mean", "ci95": [low, high], "n"}``; NaN bounds for fewer than two finite values.
    """
    if method not in MEAN_CI_METHODS:
        raise ValueError(f"mean_ci: method must be one of {', '.join(MEAN_CI_METHODS)}, got {method!r}")
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "ci95": [math.nan, math.nan], "n": n}
    if method == "bootstrap":
        means = v[np.random.default_rng(seed).integers(0, n, (n_boot, n))].mean(axis=1)
        return {"mean": mean, "ci95": [float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))],
                "n": n}  # fmt: skip
    from scipy import stats

    half = float(stats.t.ppf(1 - alpha / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}
