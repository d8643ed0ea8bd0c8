"""The one metric table: every consumer reads its names, directions and labels from ``milcore.metrics``."""

from __future__ import annotations

import numpy as np
import pytest

from milcore import metrics
from milcore.metrics import classification as cl
from milcore.metrics.weighted import LabelledPredictions, weighted_metrics


def test_scalar_metrics_are_the_table_functions() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 50)
    proba = rng.dirichlet(np.ones(3), 50)
    got = metrics.scalar_metrics(y, proba)
    assert tuple(got) == metrics.SCALAR_METRICS
    assert got["balanced_accuracy"] == cl.balanced_accuracy(y, proba.argmax(1), 3)
    assert got["auroc"] == cl.macro_auroc(y, proba)
    assert got["ece"] == cl.expected_calibration_error(y, proba)


def test_every_group_metric_has_a_weighted_function_equal_to_its_point_function() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 60)
    proba = rng.dirichlet(np.ones(3), 60)
    w = weighted_metrics(LabelledPredictions(y, proba), np.ones((1, 60)))
    point = metrics.scalar_metrics(y, proba)
    for name in metrics.GROUP_METRICS:
        assert w[name][0] == pytest.approx(point[name], abs=1e-12), name


def test_directions_labels_and_lookups() -> None:
    assert metrics.HEADLINE == ("balanced_accuracy", "macro_f1", "auroc", "ece")
    assert metrics.higher_is_better("recall[NPM1]") and not metrics.higher_is_better("fpr[x]")
    assert not metrics.higher_is_better("ece") and metrics.higher_is_better("ood_auroc")
    assert metrics.label("recall[NPM1]") == "recall [NPM1]"
    assert metrics.label("ood_balanced_accuracy", short=True) == "OOD bal. acc."
    assert metrics.label("not_a_metric") == "not_a_metric"
    with pytest.raises(KeyError, match="unknown metric 'nope'"):
        metrics.get_metric("nope")


def test_mean_ci_has_one_return_type_for_both_methods() -> None:
    v = [0.5, 0.6, 0.7, 0.8]
    for method in ("t", "bootstrap"):
        out = metrics.mean_ci(v, method=method)
        assert set(out) == {"mean", "ci95", "n"} and out["n"] == 4 and out["mean"] == pytest.approx(0.65)
        assert out["ci95"][0] < 0.65 < out["ci95"][1]
    with pytest.raises(ValueError, match="method"):
        metrics.mean_ci(v, method="wald")
