"""``bootstrap_gain``: the paired, class-stratified bootstrap of one model's gain over another on the same
patients (what decides whether a tuning trial replaces a model's defaults)."""

from __future__ import annotations

import numpy as np
import pytest

from milcore.metrics import SCALAR_METRICS, get_metric
from milcore.metrics.intervals import bootstrap_gain, stratified_counts


def _case(n: int = 60, c: int = 3, seed: int = 0, skill: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    logits = rng.normal(size=(n, c)) + skill * np.eye(c)[y]
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("name", SCALAR_METRICS)
def test_the_gain_is_the_metric_difference_and_its_se_is_that_of_the_explicit_resamples(name: str) -> None:
    """Every scalar metric: the point gain is ``fn(new) - fn(ref)`` in the metric's better direction, and the
    standard error equals the one of the same resamples scored one by one (the weighted fast path, where the
    metric has one, agrees with the explicit patient lists)."""
    metric = get_metric(name)
    y, ref = _case(seed=1, skill=0.5)
    _, new = _case(seed=2, skill=2.0)
    out = bootstrap_gain(name, y, ref, new, n_boot=200, seed=3)
    sign = 1 if metric.higher_is_better else -1
    assert out["gain"] == pytest.approx(sign * (metric.fn(y, new, 10) - metric.fn(y, ref, 10)))
    W = stratified_counts(np.random.default_rng(3), y, 200)
    idx = [np.repeat(np.arange(len(y)), w.astype(int)) for w in W]
    diffs = np.asarray([sign * (metric.fn(y[i], new[i], 10) - metric.fn(y[i], ref[i], 10)) for i in idx])
    assert out["se"] == pytest.approx(diffs.std(ddof=1), rel=1e-6, abs=1e-9)
    assert out["ci95"][0] <= out["ci95"][1]


def test_a_clearly_better_model_gains_many_standard_errors_and_equal_ones_gain_nothing() -> None:
    y, weak = _case(n=90, seed=4, skill=0.2)
    _, strong = _case(n=90, seed=5, skill=3.0)
    clear = bootstrap_gain("auroc", y, weak, strong, n_boot=500, seed=0)
    assert clear["gain"] > 4 * clear["se"] > 0
    assert clear["ci95"][0] > 0
    same = bootstrap_gain("auroc", y, weak, weak.copy(), n_boot=100, seed=0)
    assert same["gain"] == 0 and same["se"] == 0


def test_resamples_keep_every_class_so_a_small_cohort_still_has_an_auroc() -> None:
    """Resampling within classes: 10 patients of 5 classes (2 each) never lose a class, so the AUROC gain is
    defined in every resample (an unstratified bootstrap would leave a class out of most of them)."""
    y, ref = _case(n=10, c=5, seed=6)
    _, new = _case(n=10, c=5, seed=7, skill=2.0)
    out = bootstrap_gain("auroc", y, ref, new, n_boot=300, seed=1)
    assert np.isfinite(out["se"]) and out["se"] > 0


def test_bad_inputs_are_refused() -> None:
    y, p = _case(n=12)
    with pytest.raises(ValueError, match="shapes"):
        bootstrap_gain("auroc", y, p, p[:-1])
    with pytest.raises(ValueError, match="not a metric of one set"):
        bootstrap_gain("recall", y, p, p)
