"""Issue 19: class-stratified one-sided tests on per-patient scores, and the MDE beside every verdict."""

from __future__ import annotations

import numpy as np
import pytest

from milcore.audit.config import AuditConfig
from milcore.audit.groups import build_groups
from milcore.audit.statistics import (
    minimum_detectable_effect,
    sequential_permutation_test,
    stratified_permutation_masks,
)
from milcore.audit.stratified import audit_predictions
from milcore.metrics.weighted import LabelledPredictions

CLASSES = ["a", "b", "c", "d"]
FAST = {"n_boot": 30, "n_perm": 400, "per_class": True, "intersections": False}


def _audit(y: np.ndarray, proba: np.ndarray, sex: np.ndarray, **config) -> dict:
    cfg = AuditConfig(attributes=("sex",), **(FAST | config))
    groups = build_groups({"sex": sex.astype(object)}, len(y), cfg)
    return audit_predictions(LabelledPredictions(y, proba), CLASSES, groups, cfg)


def _row(audit: dict, group: str, metric: str) -> dict:
    return next(c for c in audit["comparisons"] if c["group"] == group and c["metric"] == metric)


def test_stratified_permutations_keep_the_class_mix_of_the_group() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    scope = rng.random(90) < 0.9
    mask = scope & (rng.random(90) < 0.4)
    masks = stratified_permutation_masks(rng, mask, scope, y, 300)
    assert not (masks & ~scope).any()
    for c in range(3):
        assert (masks[:, y == c].sum(1) == (mask & (y == c)).sum()).all()
    assert len({tuple(r) for r in masks}) > 250


def test_permutation_test_reports_the_spread_of_its_null() -> None:
    rng = np.random.default_rng(1)

    def null(k: int, active: list[str]) -> dict[str, np.ndarray]:
        return {"d": rng.normal(0.0, 2.0, k)}

    t = sequential_permutation_test({"d": 0.1}, null, 2000)["d"]
    assert t.permutations == 250 and t.p > 0.5  # stopped early: clearly not significant
    assert t.null_sd == pytest.approx(2.0, rel=0.15) and abs(t.null_mean) < 0.4


def test_minimum_detectable_effect_is_the_normal_sample_size_formula() -> None:
    from scipy.stats import norm

    assert minimum_detectable_effect(1.0, 0.05) == pytest.approx(norm.ppf(0.95) + norm.ppf(0.8))
    assert minimum_detectable_effect(0.04, 0.05, tests=7, two_sided=True) == pytest.approx(
        0.04 * (norm.ppf(1 - 0.05 / 14) + norm.ppf(0.8)))  # fmt: skip
    assert minimum_detectable_effect(0.1, 0.05, power=0.5, null_mean=0.2) == pytest.approx(0.2 + 0.1 * 1.6449, 1e-4)
    assert np.isnan(minimum_detectable_effect(float("nan"), 0.05))


def _missing_easy_class(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class ``a`` is always right and only men have it; every other class is right for exactly half of each sex."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["F", "M"], n)
    y = np.where(sex == "M", rng.integers(0, 4, n), rng.integers(1, 4, n))
    correct = y == 0
    for s in "FM":
        for c in (1, 2, 3):
            idx = np.flatnonzero((sex == s) & (y == c))
            correct[idx[: len(idx) // 2]] = True
    pred = np.where(correct, y, 1 + (y % 3))
    proba = np.full((n, 4), 0.1)
    proba[np.arange(n), pred] = 0.7
    return y, proba, sex


def test_a_class_absent_from_a_group_is_not_a_gap() -> None:
    """Women lack the easy class: over all classes their balanced accuracy looks 12 points worse (and the audit
    before issue 19 flagged it). Compared on the classes both sexes have, there is no gap and no flag; the audit
    says which test it skipped and why."""
    y, proba, sex = _missing_easy_class()
    audit = _audit(y, proba, sex, primary_metrics=("balanced_accuracy",))
    f = _row(audit, "sex=F", "balanced_accuracy")
    assert f["classes_compared"] == ["b", "c", "d"]
    assert abs(f["gap"]) < 0.02 and not f["flagged"]
    row = next(g for g in audit["groups"] if g["name"] == "sex=F")
    assert row["metrics"]["balanced_accuracy"]["value"] == pytest.approx(0.5, abs=0.02)  # the group's own value
    assert {"metric": "recall[a]", "reason": "no patient of class a in the group"} in row["skipped_tests"]
    assert "class a is absent from the group" in row["notes"][0]
    skipped = _row(audit, "sex=F", "recall[a]")
    assert skipped["p_value"] is None and skipped["skipped"] == "no patient of class a in the group"
    assert "mde" not in skipped
    m = next(g for g in audit["groups"] if g["name"] == "sex=M")
    assert "recall[a]" in {s["metric"] for s in m["skipped_tests"]}  # no woman of class a to compare with


def test_one_sided_tests_count_both_sides_of_a_two_valued_attribute() -> None:
    rng = np.random.default_rng(3)
    n = 300
    y = rng.integers(0, 4, n)
    sex = rng.choice(["F", "M"], n)
    proba = rng.dirichlet(np.ones(4), n)
    proba[np.arange(n), y] += np.where(sex == "F", 0.3, 1.0)
    proba /= proba.sum(1, keepdims=True)
    audit = _audit(y, proba, sex, per_class=False, primary_metrics=("balanced_brier",))
    f, m = _row(audit, "sex=F", "balanced_brier"), _row(audit, "sex=M", "balanced_brier")
    assert f["family"] == "primary" and audit["families"]["primary"]["tests"] == 2
    assert f["test_key"] != m["test_key"] and f["alternative"] == "worse"
    assert f["flagged"] and f["p_value"] < 0.01 and m["p_value"] > 0.9 and not m["flagged"]
    assert f["null_sd"] == m["null_sd"]  # one set of permutations for both sides
    two = _audit(y, proba, sex, per_class=False, alternative="two-sided", primary_metrics=("balanced_brier",))
    assert two["families"]["primary"]["tests"] == 1
    assert _row(two, "sex=F", "balanced_brier")["test_key"] == _row(two, "sex=M", "balanced_brier")["test_key"]


def test_every_primary_verdict_that_is_not_a_flag_carries_its_mde() -> None:
    rng = np.random.default_rng(4)
    n = 240
    y = rng.integers(0, 4, n)
    proba = rng.dirichlet(np.ones(4), n)
    proba[np.arange(n), y] += 0.8
    proba /= proba.sum(1, keepdims=True)
    age = np.where(rng.random(n) < 0.03, 90, rng.integers(20, 86, n))  # the 87-130 band: too small to test
    cfg = AuditConfig(attributes=("sex", "age"), **FAST)
    groups = build_groups({"sex": rng.choice(["F", "M"], n).astype(object), "age": age.astype(str).astype(object)},
                          n, cfg)  # fmt: skip
    audit = audit_predictions(LabelledPredictions(y, proba), CLASSES, groups, cfg)
    quiet = [c for c in audit["comparisons"] if c["family"] == "primary" and not c["flagged"]]
    assert quiet and all(c["mde"] is not None or c.get("mde_note") for c in quiet)
    assert [q["group"] for q in audit["summary"]["not_flagged"]] == [c["group"] for c in quiet]
    for q, c in zip(audit["summary"]["not_flagged"], quiet, strict=True):
        assert "not flagged" in q["text"] and "could go unseen" in q["text"] and q["mde"] == c["mde"]
    sizes = {c["group"]: (c["n_group"], c["mde"]) for c in quiet if c["mde"] is not None}
    small, big = min(sizes.values()), max(sizes.values())
    assert small[1] > big[1]  # smaller groups: larger detectable gaps
    assert "not evidence of fairness" in audit["summary"]["headline"]
    # a Brier score MDE means little to a reader: the headline also gives it in balanced-accuracy points
    ba = [c["mde_balanced_accuracy"] for c in quiet if c.get("mde_balanced_accuracy") is not None]
    assert ba and f"{100 * min(ba):.1f} to {100 * max(ba):.1f} points of balanced accuracy" in (
        audit["summary"]["headline"])
    tiny = next(g for g in audit["groups"] if g["name"] == "age=87-130")
    assert tiny["status"] == "insufficient" and not any(c["group"] == "age=87-130" for c in audit["comparisons"])
    assert not any(q["group"] == "age=87-130" for q in audit["summary"]["not_flagged"])
    assert all(c.get("mde") is not None or c.get("mde_note") for c in audit["parity"] if not c["flagged"])


def test_mde_is_capped_by_the_metric_range() -> None:
    """A group so small that no drop of balanced accuracy would reach 80% power says so instead of a number."""
    rng = np.random.default_rng(5)
    n = 60
    y = rng.integers(0, 4, n)
    proba = rng.dirichlet(np.ones(4), n)  # a weak model: BA near chance, so little room to fall
    sex = np.where(np.arange(n) < 10, "F", "M")
    audit = _audit(y, proba, sex, per_class=False, primary_metrics=("balanced_accuracy",))
    f = _row(audit, "sex=F", "balanced_accuracy")
    assert f["mde"] is None and "no gap within the metric's range" in f["mde_note"]
    line = next(q["text"] for q in audit["summary"]["not_flagged"] if q["group"] == "sex=F")
    assert "a gap of any size could go unseen" in line


def test_a_pre_specified_primary_attribute_makes_a_smaller_family() -> None:
    """primary_attributes=("sex",): the age bands' tests move to the secondary family, the primary family holds
    the two one-sided sex tests (so each passes at alpha / 2, not alpha / 7); naming an attribute not audited
    is a one-line error."""
    from feature_cache.errors import InvalidArgumentError

    rng = np.random.default_rng(6)
    n = 300
    y = rng.integers(0, 4, n)
    proba = rng.dirichlet(np.ones(4), n)
    proba[np.arange(n), y] += 0.8
    proba /= proba.sum(1, keepdims=True)
    cols = {"sex": rng.choice(["F", "M"], n).astype(object), "age": rng.integers(20, 86, n).astype(str).astype(object)}
    runs = {}
    for primary in ((), ("sex",)):
        cfg = AuditConfig(attributes=("sex", "age"), primary_attributes=primary, **(FAST | {"per_class": False}))
        runs[primary] = audit_predictions(LabelledPredictions(y, proba), CLASSES, build_groups(cols, n, cfg), cfg)
    every, sex = runs[()], runs[("sex",)]
    assert every["families"]["primary"]["tests"] == 12  # (2 sexes + 4 testable age bands) x 2 primary metrics
    assert sex["families"]["primary"]["tests"] == 4
    assert {c["attribute"] for c in sex["comparisons"] if c["family"] == "primary"} == {"sex"}
    f_all, f_sex = _row(every, "sex=F", "balanced_log_odds"), _row(sex, "sex=F", "balanced_log_odds")
    assert f_sex["mde"] < f_all["mde"]  # a smaller family detects smaller gaps
    assert all(q["group"].startswith("sex=") for q in sex["summary"]["not_flagged"])
    with pytest.raises(InvalidArgumentError, match="primary_attributes"):
        AuditConfig(attributes=("sex",), primary_attributes=("age",))


def test_the_default_pair_flags_lost_confidence_and_flipped_answers() -> None:
    """Two ways a model can be worse for women, each seen best by one statistic of the default primary pair:
    ``margin`` (the model is less sure of their true class: the log-odds sees it before balanced accuracy does)
    and ``flip`` (their answers are wrong more often, confidence says nothing: only correctness carries it). The
    default family (log-odds and balanced accuracy, Westfall-Young) flags sex=F in both cohorts; each statistic
    alone misses one of them."""
    rng = np.random.default_rng(13)
    n = 400
    y = rng.integers(0, 4, n)
    sex = rng.choice(["F", "M"], n)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), y] += np.where(sex == "F", 2.1, 2.6)  # margin: less sure about women
    margin = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    correct = rng.random(n) < np.where(sex == "F", 0.79, 0.88)  # flip: women's answers wrong more often
    pred = np.where(correct, y, (y + rng.integers(1, 4, n)) % 4)
    logits = rng.normal(0, 0.6, (n, 4))
    logits[np.arange(n), pred] += 2.0
    flip = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    flagged = {}
    for name, proba in (("margin", margin), ("flip", flip)):
        for metrics in (("balanced_log_odds", "balanced_accuracy"), ("balanced_log_odds",), ("balanced_accuracy",)):
            audit = _audit(y, proba, sex, per_class=False, primary_metrics=metrics, n_perm=1000)
            flagged[name, metrics] = "sex=F" in audit["summary"]["primary_flagged"]
    pair = ("balanced_log_odds", "balanced_accuracy")
    assert flagged["margin", pair] and flagged["flip", pair]
    # corrected p of sex=F: margin 0.005 (pair), 0.46 (balanced accuracy alone); flip 0.024 (pair), 0.059 (log-odds)
    assert not flagged["margin", ("balanced_accuracy",)] and not flagged["flip", ("balanced_log_odds",)]
