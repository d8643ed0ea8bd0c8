"""Resampling statistics of the audit: stratified bootstrap, permutation tests, multiplicity corrections, trends.

- Bootstrap: patients are resampled with replacement *within* strata (the groups of one attribute, with
  unknown values as a stratum of their own; :func:`milcore.metrics.intervals.stratified_counts`), so every
  resample keeps the group sizes; CIs are percentiles.
- Permutation test of a gap ``metric(group) - metric(rest)``: group membership is shuffled among the
  patients whose attribute is known, within each true class (:func:`stratified_permutation_masks`: every
  permutation keeps the group's class mix, so a group is never flagged for holding harder classes) or,
  as before issue 19, over all of them (:func:`permutation_masks`); one-sided p (the group worse) =
  (1 + #{gap* at least as bad as gap}) / (1 + P), two-sided with absolute values. Permutations run in
  batches and stop early once a gap is clearly not significant (Besag & Clifford, 1991, "Sequential Monte
  Carlo p-values"), which keeps p-values valid and saves most of the work.
- Minimum detectable effect (:func:`minimum_detectable_effect`): the gap a test finds with the given power
  at its share of the family's alpha, ``(z_{1 - alpha / (k m)} + z_power) * sd0`` with ``sd0`` the spread
  of the permutation null of that very test (normal approximation; ``k`` = 2 when two-sided).
- Corrections: Holm (step-down, family-wise error), Bonferroni, Benjamini-Hochberg (false discovery rate), each
  optionally weighted, and Westfall-Young step-down min-P (:func:`westfall_young`, Westfall & Young 1993) on
  joint permutations (:func:`class_permutations`: one within-class shuffle moves every group of a family),
  which uses the tests' real joint null: never less power than Holm on the same permutations, more where
  tests are positively dependent. Written here: statsmodels' ``multipletests`` has no permutation-based
  procedure, and no maintained Python package found offers step-down min-P for arbitrary statistics.
- Trends and paired effects over seeds: ordinary least squares slope with a t-test; mean differences with
  a t-interval and a one-sample t-test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


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


def stratified_permutation_masks(rng: np.random.Generator, mask: np.ndarray, scope: np.ndarray, strata: np.ndarray,
                                 n: int) -> np.ndarray:  # fmt: skip
    """(n, N) bool: within each stratum, as many patients of ``scope`` as ``mask`` holds there, drawn at random.

    With the true class as the stratum, every permuted group keeps the class mix of the real one.

    Args:
        rng: random generator.
        mask: (N,) bool, the group.
        scope: (N,) bool, the patients the group is drawn from (``mask`` must lie inside it).
        strata: (N,) stratum per patient (e.g. the true class).
        n: permutations.
    """
    out = np.zeros((n, len(mask)), dtype=bool)
    for value in np.unique(strata[scope]):
        inside = scope & (strata == value)
        out |= permutation_masks(rng, mask & inside, inside, n)
    return out


@dataclass
class PermutationTest:
    """The outcome of one sequential permutation test.

    Attributes:
        p: p-value in (0, 1] (NaN: not testable).
        null_sd: standard deviation of the statistic over the permutations drawn (its null spread).
        null_mean: mean of the statistic over the permutations drawn.
        permutations: permutations drawn before the test stopped.
    """

    p: float
    null_sd: float = math.nan
    null_mean: float = math.nan
    permutations: int = 0


def sequential_permutation_test(
    observed: dict[str, float],
    null_batch: Callable[[int, list[str]], dict[str, np.ndarray]],
    n_perm: int,
    batch: int = 250,
    stop_after: int = 30,
    two_sided: bool = True,
) -> dict[str, PermutationTest]:
    """Monte-Carlo permutation tests of several statistics computed from the same permutations.

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
        name -> its test (p-value, and the mean and spread of the null statistics drawn).
    """
    names = [k for k, v in observed.items() if np.isfinite(v)]
    exceed = dict.fromkeys(names, 0)
    used = dict.fromkeys(names, 0)
    moments = {name: np.zeros(3) for name in names}  # count, sum, sum of squares of the finite null values
    done = 0
    while done < n_perm and names:
        k = min(batch, n_perm - done)
        null = null_batch(k, list(names))
        for name in names:
            obs = observed[name]
            stat = np.asarray(null[name], dtype=float)
            finite = stat[np.isfinite(stat)]
            moments[name] += (len(finite), finite.sum(), (finite**2).sum())
            stat = np.where(np.isfinite(stat), stat, 0.0)  # an undefined resample counts as no gap
            hit = np.abs(stat) >= abs(obs) - 1e-12 if two_sided else stat >= obs - 1e-12
            exceed[name] += int(hit.sum())
            used[name] += k
        done += k
        names = [n for n in names if exceed[n] < stop_after]
    out = {}
    for name, obs in observed.items():
        if not np.isfinite(obs):
            out[name] = PermutationTest(math.nan)
            continue
        if exceed[name] >= stop_after and used[name] < n_perm:
            p = exceed[name] / used[name]
        else:
            p = (1 + exceed[name]) / (1 + used[name])
        count, total, squares = moments[name]
        mean = total / count if count else math.nan
        sd = math.sqrt(max(squares / count - mean**2, 0.0) * count / (count - 1)) if count > 1 else math.nan
        out[name] = PermutationTest(p, sd, mean, used[name])
    return out


def sequential_permutation_p(
    observed: dict[str, float],
    null_batch: Callable[[int, list[str]], dict[str, np.ndarray]],
    n_perm: int,
    batch: int = 250,
    stop_after: int = 30,
    two_sided: bool = True,
) -> dict[str, float]:
    """The p-values of :func:`sequential_permutation_test` (same arguments): name -> p in (0, 1]."""
    tests = sequential_permutation_test(observed, null_batch, n_perm, batch, stop_after, two_sided)
    return {name: t.p for name, t in tests.items()}


def minimum_detectable_effect(null_sd: float, alpha: float, tests: int = 1, power: float = 0.8,
                              two_sided: bool = False, null_mean: float = 0.0,
                              p_threshold: float | None = None) -> float:  # fmt: skip
    """The smallest effect a test finds with probability ``power`` (normal approximation of its null).

    A single real effect in a family of ``tests`` is found when its p-value passes ``alpha / tests`` (the
    first step of Holm, of Bonferroni and of Benjamini-Hochberg), so the statistic must exceed
    ``null_mean + z_{1 - alpha / (k tests)} * sd`` (k = 2 when two-sided); it does so ``power`` of the time when
    the effect is ``z_power * sd`` beyond that (the null's spread taken as the effect's too).

    Args:
        null_sd: spread of the test statistic without an effect (e.g. over the permutations).
        alpha: the family's significance level.
        tests: tests in the family.
        power: wanted probability of finding the effect.
        two_sided: the test is two-sided.
        null_mean: where the statistic sits without an effect (0 for a gap; a parity range is positive).
        p_threshold: the raw p-value the test must pass, when the correction says it directly (Westfall-Young's
            first step, :func:`westfall_young_threshold`); replaces ``alpha / tests``.

    Returns:
        The effect (in the statistic's units); NaN when ``null_sd`` is not a number.
    """
    from scipy.stats import norm

    if not np.isfinite(null_sd) or tests < 1:
        return math.nan
    level = alpha / tests if p_threshold is None else p_threshold
    z_alpha = float(norm.ppf(1 - level / (2 if two_sided else 1)))
    return float(null_mean + (z_alpha + float(norm.ppf(power))) * null_sd)


def adjust_pvalues(p: Sequence[float], method: str = "holm", weights: Sequence[float] | None = None) -> np.ndarray:
    """Multiplicity-adjusted p-values (NaN entries are left out of the family and stay NaN).

    Args:
        p: raw p-values of one family.
        method: ``holm``, ``bonferroni`` or ``bh``.
        weights: positive weight per p-value (``None``: equal): weighted Bonferroni and Holm (Holm 1979: a test
            of weight w gets the share w / (sum of the weights still in play) of alpha) and weighted
            Benjamini-Hochberg (Genovese, Roeder & Wasserman 2006: p / w with weights of mean 1).
    """
    p = np.asarray(p, dtype=float)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    w = _weights(None if weights is None else np.asarray(weights, dtype=float)[ok], m)  # mean 1 over the family
    q = p[ok] / w
    if method == "bonferroni":
        adj = np.minimum(q * m, 1.0)
    elif method == "holm":
        order = np.argsort(q, kind="mergesort")
        remaining = np.cumsum(w[order][::-1])[::-1]  # the weights still in play at each step (m - i when equal)
        stepped = np.maximum.accumulate(q[order] * remaining)
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


def class_permutations(rng: np.random.Generator, strata: np.ndarray, n: int) -> np.ndarray:
    """(n, N) int: ``n`` permutations of the patients, each shuffling patients only within their stratum.

    ``masks[:, perm]`` moves every patient's attributes (all of them together) to another patient of the same
    stratum, so each permuted group keeps its size and class mix, and the groups of a family keep the overlap
    they have (the same draw serves every group: Westfall-Young's joint null).

    Args:
        rng: random generator.
        strata: (N,) stratum per patient (the true class).
        n: permutations.
    """
    strata = np.asarray(strata)
    out = np.tile(np.arange(len(strata)), (n, 1))
    for value in np.unique(strata):
        idx = np.flatnonzero(strata == value)
        keys = rng.random((n, len(idx)))
        out[:, idx] = idx[np.argsort(keys, axis=1)]
    return out


def permutation_pvalues(observed: np.ndarray, null: np.ndarray, two_sided: bool = False) -> np.ndarray:
    """(m,) Monte-Carlo p-values ``(1 + #{null >= observed}) / (1 + B)`` of m statistics from (B, m) null draws.

    A NaN null value counts as no effect (0); a NaN observed statistic gets a NaN p-value.
    """
    obs = np.asarray(observed, dtype=float)
    null = np.nan_to_num(np.asarray(null, dtype=float), nan=0.0)
    if two_sided:
        obs, null = np.abs(obs), np.abs(null)
    hits = (null >= obs[None] - 1e-12).sum(0)
    p = (1 + hits) / (1 + null.shape[0])
    return np.where(np.isfinite(obs), p, np.nan)


def _null_pvalues(null: np.ndarray) -> np.ndarray:
    """(B, m): each null draw's p-value against the draws of its own column, ``#{null[:, j] >= null[b, j]} / B``."""
    B = null.shape[0]
    ranks = np.empty_like(null)
    for j in range(null.shape[1]):
        s = np.sort(null[:, j])
        ranks[:, j] = B - np.searchsorted(s, null[:, j] - 1e-12, side="left")
    return ranks / B


def westfall_young(observed: np.ndarray, null: np.ndarray, two_sided: bool = False,
                   weights: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Step-down min-P adjusted p-values (Westfall & Young 1993, Algorithm 2.8) from joint permutations.

    Every column of ``null`` must come from the *same* permutations (one draw shuffles the membership of every
    group of the family at once), so the adjustment uses the tests' real joint null distribution: strong
    control of the family-wise error like Holm's, never less power than Holm on the same permutations (up to
    ``1 / (1 + B)``), and more where the tests are positively dependent (overlapping groups). With ``weights``,
    the weighted version of Westfall, Kropf & Finos (2004): each p-value is divided by its weight (a test of
    weight 2 passes at twice the p-value of a test of weight 1), which keeps the family-wise error control.

    Args:
        observed: (m,) statistics, larger = stronger evidence (NaN: not testable, adjusted p NaN).
        null: (B, m) the statistics of B joint permutations.
        two_sided: compare absolute values.
        weights: (m,) positive weights (``None``: equal).

    Returns:
        (m,) adjusted p-values in (0, 1].
    """
    obs = np.asarray(observed, dtype=float)
    out = np.full(len(obs), np.nan)
    ok = np.flatnonzero(np.isfinite(obs))
    if len(ok) == 0:
        return out
    null = np.nan_to_num(np.asarray(null, dtype=float)[:, ok], nan=0.0)
    if two_sided:
        null = np.abs(null)
    w = _weights(weights, len(obs))[ok]
    raw = permutation_pvalues(obs[ok], null, two_sided) / w
    null_p = _null_pvalues(null) / w  # (B, m')
    order = np.argsort(raw, kind="mergesort")
    # successive minima from the least significant test: q[b, i] = min over the tests ranked i and after
    q = np.minimum.accumulate(null_p[:, order[::-1]], axis=1)[:, ::-1]  # (B, m')
    adj = (1 + (q <= raw[order][None] * (1 + 1e-9)).sum(0)) / (1 + null.shape[0])
    adj = np.minimum(np.maximum.accumulate(adj), 1.0)
    out[ok[order]] = adj
    return out


def _weights(weights: np.ndarray | None, m: int) -> np.ndarray:
    """(m,) weights scaled to mean 1 (equal weights when ``None``); raises ValueError unless all positive."""
    if weights is None:
        return np.ones(m)
    w = np.asarray(weights, dtype=float)
    if w.shape != (m,) or not (np.isfinite(w) & (w > 0)).all():
        raise ValueError(f"weights must be {m} positive numbers")
    return w * m / w.sum()


def westfall_young_threshold(null: np.ndarray, alpha: float, two_sided: bool = False,
                             weights: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """(m,) the raw p-value each test must pass at the first step of :func:`westfall_young` (the one real effect
    of its family): its weight times the ``alpha`` quantile of the smallest weighted null p-value over the family
    (``alpha / m`` for m exclusive tests of equal weight, larger when they are positively dependent)."""
    null = np.nan_to_num(np.asarray(null, dtype=float), nan=0.0)
    if null.size == 0:
        return np.full(null.shape[-1] if null.ndim == 2 else 0, np.nan)
    if two_sided:
        null = np.abs(null)
    w = _weights(weights, null.shape[1])
    smallest = (_null_pvalues(null) / w).min(1)  # (B,)
    return w * float(np.quantile(smallest, alpha, method="lower"))
