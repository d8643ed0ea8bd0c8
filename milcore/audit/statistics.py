"""Resampling statistics of the audit: stratified bootstrap, permutation tests, multiplicity corrections, trends.

- Bootstrap: patients are resampled with replacement *within* strata (the groups of one attribute, with
  unknown values as a stratum of their own), so every resample keeps the group sizes; CIs are percentiles.
- Permutation test of a gap ``metric(group) - metric(rest)``: group membership is shuffled among the
  patients whose attribute is known (same group size); two-sided p = (1 + #{|gap*| >= |gap|}) / (1 + P).
  Permutations run in batches and stop early once a gap is clearly not significant (Besag & Clifford,
  1991, "Sequential Monte Carlo p-values"), which keeps p-values valid and saves most of the work.
- Corrections: Holm (step-down, family-wise error), Bonferroni, Benjamini-Hochberg (false discovery rate).
- Trends and paired effects over seeds: ordinary least squares slope with a t-test; mean differences with
  a t-interval and a one-sample t-test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


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


def percentile_ci(samples: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of finite samples; NaN when fewer than half the samples are finite."""
    s = np.asarray(samples, dtype=float)
    finite = s[np.isfinite(s)]
    if len(finite) < max(1, len(s) / 2):
        return (math.nan, math.nan)
    return (float(np.quantile(finite, alpha / 2)), float(np.quantile(finite, 1 - alpha / 2)))


def permutation_masks(rng: np.random.Generator, mask: np.ndarray, scope: np.ndarray, n: int) -> np.ndarray:
    """(n, N) bool: ``mask.sum()`` patients drawn at random from ``scope``, once per row."""
    pool = np.flatnonzero(scope)
    k = int(mask.sum())
    keys = rng.random((n, len(pool)))
    chosen = np.argpartition(keys, k - 1, axis=1)[:, :k] if 0 < k < len(pool) else (
        np.tile(np.arange(len(pool)), (n, 1))[:, :k])  # fmt: skip
    out = np.zeros((n, len(mask)), dtype=bool)
    rows = np.repeat(np.arange(n), k)
    out[rows, pool[chosen.reshape(-1)]] = True
    return out


def sequential_permutation_p(
    observed: dict[str, float],
    null_batch: Callable[[int, list[str]], dict[str, np.ndarray]],
    n_perm: int,
    batch: int = 250,
    stop_after: int = 30,
    two_sided: bool = True,
) -> dict[str, float]:
    """Monte-Carlo permutation p-values of several statistics computed from the same permutations.

    Args:
        observed: statistic name -> observed value (NaN: not testable, p is NaN).
        null_batch: ``(k, active names)`` -> name -> (k,) statistics of ``k`` fresh permutations (only the
            still active names are needed).
        n_perm: maximum permutations.
        batch: permutations per call of ``null_batch``.
        stop_after: stop once every statistic has at least this many exceedances (its p is then clearly
            above any corrected threshold; the estimate is Besag-Clifford's h / L).
        two_sided: compare absolute values; otherwise large values only.

    Returns:
        name -> p-value in (0, 1].
    """
    names = [k for k, v in observed.items() if np.isfinite(v)]
    exceed = dict.fromkeys(names, 0)
    used = dict.fromkeys(names, 0)
    done = 0
    while done < n_perm and names:
        k = min(batch, n_perm - done)
        null = null_batch(k, list(names))
        for name in names:
            obs = observed[name]
            stat = np.asarray(null[name], dtype=float)
            stat = np.where(np.isfinite(stat), stat, 0.0)  # an undefined resample counts as no gap
            hit = np.abs(stat) >= abs(obs) - 1e-12 if two_sided else stat >= obs - 1e-12
            exceed[name] += int(hit.sum())
            used[name] += k
        done += k
        names = [n for n in names if exceed[n] < stop_after]
    out = {}
    for name, obs in observed.items():
        if not np.isfinite(obs):
            out[name] = math.nan
        elif exceed[name] >= stop_after and used[name] < n_perm:
            out[name] = exceed[name] / used[name]
        else:
            out[name] = (1 + exceed[name]) / (1 + used[name])
    return out


def adjust_pvalues(p: Sequence[float], method: str = "holm") -> np.ndarray:
    """Multiplicity-adjusted p-values (NaN entries are left out of the family and stay NaN).

    Args:
        p: raw p-values of one family.
        method: ``holm``, ``bonferroni`` or ``bh``.
    """
    p = np.asarray(p, dtype=float)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    q = p[ok]
    if method == "bonferroni":
        adj = np.minimum(q * m, 1.0)
    elif method == "holm":
        order = np.argsort(q, kind="mergesort")
        stepped = np.maximum.accumulate(q[order] * (m - np.arange(m)))
        adj = np.empty(m)
        adj[order] = np.minimum(stepped, 1.0)
    elif method == "bh":
        order = np.argsort(q, kind="mergesort")
        ranked = q[order] * m / (np.arange(m) + 1)
        stepped = np.minimum.accumulate(ranked[::-1])[::-1]
        adj = np.empty(m)
        adj[order] = np.minimum(stepped, 1.0)
    else:
        raise ValueError(f"unknown correction {method!r}")
    out[ok] = adj
    return out


def paired_effect(diffs: Sequence[float], alpha: float = 0.05) -> dict[str, float | list[float] | int]:
    """Mean of paired differences with a t-interval and a two-sided one-sample t-test p-value."""
    from scipy import stats

    from milcore.metrics import mean_ci

    out = mean_ci(diffs, alpha)
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) >= 2 and d.std(ddof=1) > 0:
        out["p_value"] = float(stats.ttest_1samp(d, 0.0).pvalue)
    elif len(d) >= 2:
        out["p_value"] = 0.0 if d.mean() != 0 else 1.0
    else:
        out["p_value"] = math.nan
    return out


def linear_trend(x: Sequence[float], y: Sequence[float], alpha: float = 0.05) -> dict[str, float | list[float]]:
    """OLS slope of ``y`` on ``x`` with its t-interval and the two-sided p-value of slope = 0."""
    from scipy import stats

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0:
        return {"slope": math.nan, "ci95": [math.nan, math.nan], "p_value": math.nan, "n": len(x)}
    fit = stats.linregress(x, y)
    half = float(stats.t.ppf(1 - alpha / 2, len(x) - 2) * fit.stderr)
    return {"slope": float(fit.slope), "ci95": [float(fit.slope) - half, float(fit.slope) + half],
            "intercept": float(fit.intercept), "p_value": float(fit.pvalue), "n": len(x)}  # fmt: skip
