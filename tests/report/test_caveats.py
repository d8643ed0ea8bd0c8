"""The rules that stop a report reading like a decision: chance, temperature bounds, small cohorts."""

from __future__ import annotations

import numpy as np
import pytest

from milcore.metrics.calibration import TEMPERATURE_BOUNDS, fit_temperature, temperature_at_bound
from milcore.report import Report
from milcore.report.caveats import (
    MAX_CI_WIDTH,
    add_warnings,
    chance_level,
    class_size_warnings,
    headline_warnings,
    is_at_chance,
    prediction_warnings,
    temperature_warnings,
)
from milcore.report.evaluation import evaluate
from milcore.report.glossary import GLOSSARY, add_glossary


def _codes(warnings: list[dict]) -> list[str]:
    return [w["code"] for w in warnings]


def _m(ba: tuple[float, float, float], auroc: tuple[float, float, float]) -> dict:
    return {"balanced_accuracy": {"value": ba[0], "ci95": [ba[1], ba[2]]},
            "auroc": {"value": auroc[0], "ci95": [auroc[1], auroc[2]]}}  # fmt: skip


def test_chance_levels() -> None:
    assert chance_level("balanced_accuracy", 5) == pytest.approx(0.2)
    assert chance_level("auroc", 5) == 0.5 and chance_level("ece", 5) is None


def test_a_ci_including_chance_is_a_critical_warning() -> None:
    w = headline_warnings(_m((0.20, 0.20, 0.20), (0.46, 0.36, 0.55)), num_classes=5)
    assert "chance" in _codes(w) and is_at_chance(w)
    chance = next(x for x in w if x["code"] == "chance")
    assert chance["severity"] == "critical" and "not distinguishable from chance" in chance["message"]
    assert {"balanced_accuracy", "auroc"} == set(chance["metrics"])
    # AUROC alone touching 0.5 is enough
    assert "chance" in _codes(headline_warnings(_m((0.7, 0.6, 0.8), (0.6, 0.49, 0.7)), num_classes=2))


def test_a_good_model_gets_no_chance_warning() -> None:
    w = headline_warnings(_m((0.90, 0.82, 0.96), (0.95, 0.9, 0.99)), num_classes=2)
    assert not is_at_chance(w) and w == []


def test_below_chance_and_wide_ci() -> None:
    below = headline_warnings(_m((0.1, 0.05, 0.15), (0.2, 0.1, 0.3)), num_classes=2)
    assert "below_chance" in _codes(below) and is_at_chance(below)
    wide = headline_warnings(_m((0.7, 0.51, 0.9), (0.8, 0.7, 0.9)), num_classes=2)
    assert _codes(wide) == ["wide_ci"] and wide[0]["width"] > MAX_CI_WIDTH
    assert headline_warnings(_m((0.7, 0.6, 0.8), (0.8, 0.7, 0.9)), num_classes=2) == []


def test_unknown_ci_falls_back_on_the_point_value() -> None:
    nan = float("nan")
    w = headline_warnings(_m((0.5, nan, nan), (nan, nan, nan)), num_classes=2)
    assert "chance" in _codes(w) and "no_ci" in _codes(w)


def test_single_predicted_class() -> None:
    assert _codes(prediction_warnings(np.array([[5, 0], [4, 0]]), ["a", "b"])) == ["single_predicted_class"]
    assert prediction_warnings(np.array([[5, 1], [1, 4]]), ["a", "b"]) == []


def test_temperature_bounds_are_detected_and_explained() -> None:
    lo, hi = TEMPERATURE_BOUNDS
    assert temperature_at_bound(19.999) == "upper" and temperature_at_bound(hi) == "upper"
    assert temperature_at_bound(lo * 1.0001) == "lower" and temperature_at_bound(1.3) is None
    w = temperature_warnings([0.9, 19.9989, 19.999], ["fold 0", "fold 1", "fold 2"])
    assert _codes(w) == ["temperature_at_bound"] and w[0]["bound"] == "upper"
    assert w[0]["where"] == ["fold 1", "fold 2"] and "uniform" in w[0]["message"]
    low = temperature_warnings([lo], ["fold 0"])
    assert low[0]["bound"] == "lower" and "overconfident" in low[0]["message"]
    assert temperature_warnings([0.8, 1.4], ["fold 0", "fold 1"]) == []


def test_uninformative_logits_run_the_temperature_to_its_upper_bound() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 40)
    t = fit_temperature(rng.normal(size=(40, 5)) * 3, y)
    assert temperature_at_bound(t) == "upper"


def test_class_size_rules() -> None:
    w = class_size_warnings({"a": 2, "b": 12}, folds=3)
    assert _codes(w) == ["class_smaller_than_folds", "small_class"] and w[0]["classes"] == {"a": 2}
    assert _codes(class_size_warnings({"a": 7, "b": 12}, folds=5)) == ["small_class"]
    assert class_size_warnings({"a": 30, "b": 30}, folds=5) == []


def test_evaluate_carries_its_warnings() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 60)
    chance = evaluate(y, np.full((60, 3), 1 / 3) + rng.normal(0, 1e-3, (60, 3)), ["a", "b", "c"], n_boot=50)
    assert is_at_chance(chance["warnings"])
    good = np.eye(3)[y] * 0.8 + 0.2 / 3
    assert not is_at_chance(evaluate(y, good, ["a", "b", "c"], n_boot=50)["warnings"])


def test_warning_box_and_glossary_render_in_both_formats() -> None:
    rep = Report("r")
    add_warnings(rep, headline_warnings(_m((0.2, 0.2, 0.2), (0.5, 0.4, 0.6)), num_classes=5))
    add_glossary(rep, ["ECE", "T", "Holm"])
    html, (md, _) = rep.to_html(), rep.to_markdown()
    assert "not distinguishable from chance" in html and "class='warn'" in html
    assert "> **Warning" in md and "not distinguishable from chance" in md
    for term in ("ECE", "T", "Holm"):
        assert GLOSSARY[term] in md
    with pytest.raises(KeyError):
        add_glossary(Report("x"), ["no such term"])
    add_warnings(rep2 := Report("ok"), [])
    assert "class='warn'" not in rep2.to_html()


def test_pluralisation() -> None:
    from milcore.report import plural

    assert plural(1, "test") == "1 test" and plural(2, "test") == "2 tests" and plural(0, "patient") == "0 patients"
    assert plural(1, "class", "classes") == "1 class" and plural(1200, "bag") == "1,200 bags"


def test_imbalance_experiment_at_chance_is_flagged() -> None:
    from milcore.audit.report_imbalance import experiment_warnings

    def result(bas: list[float], aurocs: list[float]) -> dict:
        pairs = zip(bas, aurocs, strict=True)
        runs = [{"test": {"all": {"balanced_accuracy": b, "auroc": a, "n": 20}}} for b, a in pairs]
        return {"classes": ["control", "aml"], "runs": runs}

    chance = experiment_warnings(result([0.5, 0.45, 0.55, 0.5], [0.48, 0.52, 0.5, 0.55]))
    assert is_at_chance(chance) and "imbalance on a chance-level model are not meaningful" in chance[0]["message"]
    assert experiment_warnings(result([0.9, 0.88, 0.92, 0.9], [0.95, 0.96, 0.97, 0.94])) == []


def test_one_class_present_uses_the_model_classes_for_chance() -> None:
    from milcore.report.caveats import chance_classes

    assert chance_classes([0, 12, 0], 3) == 3 and chance_classes([5, 12, 0], 3) == 2
    y = np.zeros(30, dtype=int)  # an external set of one class, all predicted right
    report = evaluate(y, np.tile([0.9, 0.05, 0.05], (30, 1)), ["a", "b", "c"], n_boot=50)
    assert not is_at_chance(report["warnings"])
