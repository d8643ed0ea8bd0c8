"""Bootstrap coverage, permutation p-values, multiplicity corrections and trend tests."""

from __future__ import annotations

import numpy as np
import pytest

from milcore.audit.statistics import (
    adjust_pvalues,
    linear_trend,
    paired_effect,
    permutation_masks,
    sequential_permutation_p,
)
from milcore.metrics import mean_ci
from milcore.metrics.intervals import percentile_ci, stratified_counts
from milcore.metrics.weighted import LabelledPredictions, weighted_metrics


def test_holm_bonferroni_bh_by_hand() -> None:
    p = [0.01, 0.04, 0.03, 0.2, float("nan")]
    # Holm: sorted 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> max-accumulated 0.09, 0.2*1 -> 0.2
    assert adjust_pvalues(p, "holm")[:4].tolist() == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert np.isnan(adjust_pvalues(p, "holm")[4])
    assert adjust_pvalues(p, "bonferroni")[:4].tolist() == pytest.approx([0.04, 0.16, 0.12, 0.8])
    # BH: ranks 1..4 -> 0.01*4/1=0.04, 0.03*4/2=0.06, 0.04*4/3=0.0533, 0.2 -> min from the right: 0.04, 0.0533...
    assert adjust_pvalues(p, "bh")[:4].tolist() == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.2])


def test_stratified_counts_keep_strata_sizes() -> None:
    strata = np.array(["a"] * 5 + ["b"] * 3 + [""] * 2, dtype=object)
    c = stratified_counts(np.random.default_rng(0), strata, 50)
    assert c.shape == (50, 10)
    assert (c[:, :5].sum(1) == 5).all() and (c[:, 5:8].sum(1) == 3).all() and (c[:, 8:].sum(1) == 2).all()


def test_permutation_masks_draw_group_sized_subsets_of_scope() -> None:
    scope = np.array([1, 1, 1, 0, 1, 1, 0, 1], dtype=bool)
    mask = np.array([1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    m = permutation_masks(np.random.default_rng(0), mask, scope, 200)
    assert (m.sum(1) == 2).all() and not (m & ~scope).any()
    assert len({tuple(r) for r in m}) > 5


def test_bootstrap_ci_coverage_on_a_known_accuracy() -> None:
    """95% percentile CIs of a group's balanced accuracy cover the true value about 95% of the time."""
    rng = np.random.default_rng(0)
    n, true_recall, reps = 120, 0.8, 200
    y = np.tile([0, 1], n // 2)
    hits = 0
    for _ in range(reps):
        correct = rng.random(n) < true_recall
        pred = np.where(correct, y, 1 - y)
        proba = np.eye(2)[pred] * 0.8 + 0.1
        boot = weighted_metrics(LabelledPredictions(y, proba), stratified_counts(rng, y, 400), with_auroc=False)
        lo, hi = percentile_ci(boot["balanced_accuracy"])
        hits += lo <= true_recall <= hi
    assert 0.89 <= hits / reps <= 0.99


def test_permutation_p_is_uniform_under_the_null_and_small_under_an_effect() -> None:
    rng = np.random.default_rng(1)
    group = np.zeros(60, dtype=bool)
    group[:30] = True
    scope = np.ones(60, dtype=bool)

    def pvalue(values: np.ndarray) -> float:
        obs = {"d": values[group].mean() - values[~group].mean()}

        def null(k: int, active: list[str]) -> dict[str, np.ndarray]:
            m = permutation_masks(rng, group, scope, k)
            return {"d": (m @ values) / 30 - (~m @ values) / 30}

        return sequential_permutation_p(obs, null, 999)["d"]

    null_ps = [pvalue(rng.normal(size=60)) for _ in range(60)]
    assert np.mean(np.asarray(null_ps) < 0.05) <= 0.15
    assert np.mean(null_ps) == pytest.approx(0.5, abs=0.12)
    shifted = rng.normal(size=60) + np.where(group, -1.5, 0.0)
    assert pvalue(shifted) < 0.005


def test_sequential_stop_keeps_full_resolution_for_significant_statistics() -> None:
    calls = []

    def null(k: int, active: list[str]) -> dict[str, np.ndarray]:
        calls.append((k, tuple(active)))
        return {"big": np.zeros(k), "none": np.zeros(k)}

    p = sequential_permutation_p({"big": 1.0, "none": 0.0, "nan": float("nan")}, null, 1000, batch=100, stop_after=30)
    assert p["big"] == pytest.approx(1 / 1001)  # never exceeded: all 1,000 permutations
    assert p["none"] == pytest.approx(1.0)  # every permutation ties: stopped early, p = h / L = 1
    assert np.isnan(p["nan"]) and sum(k for k, _ in calls) == 1000
    assert calls[0][1] == ("big", "none") and calls[-1][1] == ("big",)  # "none" stopped after the first batch


def test_trend_and_paired_effect() -> None:
    x = np.repeat([0, 0.5, 1.0], 4)
    y = 0.8 - 0.1 * x + np.tile([0.01, -0.01, 0.005, -0.005], 3)
    t = linear_trend(x, y)
    assert t["slope"] == pytest.approx(-0.1, abs=1e-9) and t["p_value"] < 1e-6
    assert t["ci95"][0] < -0.1 < t["ci95"][1]
    e = paired_effect([-0.1, -0.12, -0.08, -0.1])
    assert e["mean"] == pytest.approx(-0.1) and e["p_value"] < 0.01 and e["ci95"][1] < 0
    assert np.isnan(mean_ci([0.5])["ci95"][0])
