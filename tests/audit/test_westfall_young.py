"""Issue 19: Westfall-Young step-down min-P on joint within-class permutations, and alpha shared by attribute."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milcore.audit.config import AuditConfig
from milcore.audit.groups import build_groups
from milcore.audit.statistics import (
    adjust_pvalues,
    class_permutations,
    minimum_detectable_effect,
    permutation_pvalues,
    westfall_young,
    westfall_young_threshold,
)
from milcore.audit.stratified import audit_predictions
from milcore.metrics.weighted import LabelledPredictions


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 8), B=st.integers(20, 300), mix=st.floats(-0.9, 0.99),
       weighted=st.booleans())  # fmt: skip
def test_westfall_young_is_never_less_powerful_than_holm_on_the_same_permutations(seed, m, B, mix, weighted) -> None:
    """On the same permutations, every Westfall-Young adjusted p-value is at most Holm's on the raw permutation
    p-values (weighted Holm with the same weights) plus one permutation's worth, 1 / (1 + B)."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=(B, 1))
    null = mix * common + np.sqrt(1 - mix**2 if abs(mix) < 1 else 0.0) * rng.normal(size=(B, m))  # (B, m) dependent
    null = np.round(null, 1)  # ties, as discrete statistics have
    observed = rng.normal(1.5, 1.5, m)
    weights = rng.uniform(0.2, 3.0, m) if weighted else None
    raw = permutation_pvalues(observed, null)
    wy = westfall_young(observed, null, weights=weights)
    holm = adjust_pvalues(raw, "holm", weights)
    assert np.all(wy <= holm + 1 / (1 + B) + 1e-12)
    assert np.all(wy >= raw.min() - 1e-12) and np.all((wy > 0) & (wy <= 1))


def test_westfall_young_counts_identical_tests_once() -> None:
    """Five copies of one test are one test: Westfall-Young leaves its p-value as it is, Holm multiplies it by 5."""
    rng = np.random.default_rng(0)
    column = rng.normal(size=(999, 1))
    null, observed = np.repeat(column, 5, 1), np.full(5, 2.6)
    raw = permutation_pvalues(observed, null)
    assert westfall_young(observed, null) == pytest.approx(raw)
    assert adjust_pvalues(raw, "holm") == pytest.approx(np.minimum(5 * raw, 1))
    assert westfall_young_threshold(null, 0.05) == pytest.approx(np.full(5, 0.05), abs=0.002)
    exclusive = np.concatenate([column, -column], 1)  # "F worse" and "M worse": mirror images, nothing to gain
    assert westfall_young_threshold(exclusive, 0.05) == pytest.approx(np.full(2, 0.025), abs=0.002)
    assert np.isnan(westfall_young(np.array([np.nan, 2.0]), null[:, :2]))[0]


def test_weighted_holm_and_bonferroni_give_each_test_its_share_of_alpha() -> None:
    """Holm (1979) weighted: a test of weight w passes at alpha w / (sum of the weights still in play)."""
    p = [0.01, 0.02, 0.03]
    assert adjust_pvalues(p, "holm", [2, 1, 1]) == pytest.approx([0.02, 0.04, 0.04])
    assert adjust_pvalues(p, "bonferroni", [2, 1, 1]) == pytest.approx([0.02, 0.08, 0.12])
    assert adjust_pvalues(p, "holm", [1, 1, 1]) == pytest.approx(adjust_pvalues(p, "holm"))
    with pytest.raises(ValueError, match="positive"):
        adjust_pvalues(p, "holm", [1, 0, 1])


def _gaps(scores: np.ndarray, y: np.ndarray, masks: np.ndarray, scope: np.ndarray) -> np.ndarray:
    """(..., G) class-balanced mean score of each group minus that of the rest of its scope (larger = worse)."""
    onehot = np.eye(y.max() + 1)[y]  # (n, C)
    inside = masks.astype(float)  # (..., G, n)
    outside = (scope & ~masks).astype(float)
    mean_in = (inside @ (onehot * scores[:, None])) / np.maximum(inside @ onehot, 1)
    mean_out = (outside @ (onehot * scores[:, None])) / np.maximum(outside @ onehot, 1)
    return (mean_in - mean_out).mean(-1)


def test_westfall_young_keeps_the_family_wise_error_under_the_null() -> None:
    """300 cohorts whose per-patient scores depend on the class only, audited for sex (F, M) and three age bands
    that overlap the sexes, one-sided, on joint within-class permutations: the family-wise error of Westfall-Young
    (equal weights and by attribute) stays at alpha, while testing each group at alpha (no correction) would not."""
    rng = np.random.default_rng(19)
    alpha, cohorts, B, n = 0.1, 300, 199, 120
    errors = {"equal": 0, "attributes": 0, "uncorrected": 0}
    weights = np.array([1 / 4, 1 / 4, 1 / 6, 1 / 6, 1 / 6])  # sex shares alpha / 2, the age bands the other half
    for _ in range(cohorts):
        y = rng.integers(0, 3, n)
        scores = rng.gamma(2.0, 0.1 + 0.1 * y)  # skewed, class-dependent, no group effect
        sex = rng.random(n) < 0.5
        band = rng.integers(0, 3, n)
        known = rng.random(n) < 0.95  # a few patients without the attributes
        masks = np.stack([sex, ~sex, band == 0, band == 1, band == 2]) & known  # (5, n)
        observed = _gaps(scores, y, masks, known)
        perms = class_permutations(rng, y, B)  # (B, n): every group moved by the same shuffle
        assert (np.sort(y[perms], axis=1) == np.sort(y)).all() and (y[perms] == y).all()
        null = _gaps(scores, y, masks[:, perms].transpose(1, 0, 2), known[perms][:, None, :])  # (B, 5)
        errors["equal"] += bool((westfall_young(observed, null) < alpha).any())
        errors["attributes"] += bool((westfall_young(observed, null, weights=weights) < alpha).any())
        errors["uncorrected"] += bool((permutation_pvalues(observed, null) < alpha).any())
    bound = alpha + 2.5 * np.sqrt(alpha * (1 - alpha) / cohorts)
    assert errors["equal"] / cohorts <= bound and errors["attributes"] / cohorts <= bound
    assert errors["uncorrected"] / cohorts > 0.25  # the check can fail: five tests at alpha each err far more often


def _cohort(n: int = 400, seed: int = 7, female_margin: float = 0.4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    sex = rng.choice(["F", "M"], n)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), y] += np.where(sex == "F", 1.6 - female_margin, 1.6)
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cols = {"sex": sex.astype(object), "age": rng.integers(20, 86, n).astype(str).astype(object)}
    return LabelledPredictions(y, proba), cols


@pytest.mark.parametrize("weights", ["tests", "attributes"])
def test_the_audit_corrects_its_primary_family_by_westfall_young(weights: str) -> None:
    pred, cols = _cohort()
    cfg = AuditConfig(attributes=("sex", "age"), correction="westfall-young", primary_weights=weights, n_boot=30,
                      n_perm=500, per_class=False, intersections=False)  # fmt: skip
    audit = audit_predictions(pred, list("abcd"), build_groups(cols, len(pred), cfg), cfg)
    fam = audit["families"]
    assert fam["primary"]["correction"] == "westfall-young" and fam["secondary"]["correction"] == "holm"
    assert fam["primary"]["joint_permutations"] == 500 and fam["primary"]["tests"] == 12  # 6 groups x 2 metrics
    primary = [c for c in audit["comparisons"] if c["family"] == "primary"]
    assert all(c["joint_permutations"] and c["permutations"] == 500 for c in primary)
    f = next(c for c in primary if c["group"] == "sex=F")
    assert f["flagged"] and f["p_corrected"] < 0.01 and "sex=F" in audit["summary"]["primary_flagged"]
    thresholds = fam["primary"]["first_step_p"]
    for c in primary:  # each MDE is sized at the p-value its test must pass in this very procedure
        assert c["mde"] == pytest.approx(minimum_detectable_effect(c["null_sd"], 0.05, 12, 0.8,
                                                                   p_threshold=thresholds[c["test_key"]]))  # fmt: skip
    sex_t = [t for k, t in thresholds.items() if k.startswith("sex=")]
    age_t = [t for k, t in thresholds.items() if k.startswith("age=")]
    # a group's two statistics (log-odds, balanced accuracy) are positively dependent: each test passes at more
    # than its Bonferroni share, at most twice it (what one statistic per group would get), up to the resolution
    # of 500 permutations (0.002)
    if weights == "attributes":  # sex shares alpha / 2 among its 4 tests, the 4 age bands' 8 tests the other half
        assert all(0.05 / 8 <= t <= 0.05 / 4 + 0.002 for t in sex_t)
        assert all(0.05 / 16 <= t <= 0.05 / 8 + 0.002 for t in age_t)
    else:  # 12 tests: alpha / 12 if the tests were exclusive
        assert all(0.05 / 12 <= t <= 0.05 / 6 + 0.002 for t in sex_t + age_t)


def test_weights_by_attribute_under_holm_set_each_tests_share() -> None:
    pred, cols = _cohort(female_margin=0.0)
    cfg = AuditConfig(attributes=("sex", "age"), correction="holm", primary_weights="attributes", n_boot=30, n_perm=300,
                      per_class=False, intersections=False)  # fmt: skip
    audit = audit_predictions(pred, list("abcd"), build_groups(cols, len(pred), cfg), cfg)
    shares = audit["families"]["primary"]["first_step_p"]
    assert sum(shares.values()) == pytest.approx(0.05)
    # sex: alpha / 2 over 2 groups x 2 primary metrics; age: alpha / 2 over 4 bands x 2 metrics
    assert {round(v, 6) for v in shares.values()} == {round(0.05 / 8, 6), round(0.05 / 16, 6)}
    assert audit["families"]["secondary"]["weights"] == "tests"
    secondary = audit["families"]["secondary"]
    assert secondary["alpha_per_test"] == pytest.approx(0.05 / secondary["tests"])


def test_cli_audit_with_westfall_young_says_how_it_corrected(tmp_path, audit_case) -> None:
    import json

    from milcore.cli import main

    run, cohort = audit_case(tmp_path, 200, 5, 0.8, 0.8)
    out = tmp_path / "audit"
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(cohort), "--out", str(out), "--permutations", "300",
                 "--boot", "30", "--no-intersections", "--correction", "westfall-young", "--primary-weights",
                 "attributes"]) == 0  # fmt: skip
    audit = json.loads((out / "audit.json").read_text())
    assert audit["config"]["correction"] == "westfall-young" and audit["config"]["primary_weights"] == "attributes"
    assert audit["families"]["primary"]["correction"] == "westfall-young"
    md = (out / "audit.md").read_text()
    assert "Westfall-Young step-down min-P in the primary family" in md and "shared equally among the audited" in md
    assert "**Westfall-Young**" in md or "Westfall-Young:" in md  # the glossary explains it
    assert "after Westfall-Young (primary family; Holm in the secondary) correction" in audit["summary"]["headline"]


def test_two_statistics_per_group_keep_the_family_wise_error_under_the_null() -> None:
    """The default primary family (issue 19, round 3) tests every group on two statistics at once, a continuous
    per-patient score and the 0/1 error derived from it, all on the same joint within-class permutations. Under
    the null (scores depend on the class only), 300 cohorts audited for sex (F, M) and three age bands, 10 tests:
    Westfall-Young by attribute keeps the family-wise error at alpha; testing each at alpha would not. Because
    a group's two statistics are positively dependent, each test's first-step threshold is well above the
    Bonferroni share of its attribute (the pair costs less than two independent tests)."""
    rng = np.random.default_rng(23)
    alpha, cohorts, B, n = 0.1, 300, 199, 120
    errors = {"attributes": 0, "uncorrected": 0}
    weights = np.array([1 / 8] * 4 + [1 / 12] * 6)  # sex: alpha / 2 over 2 groups x 2 statistics; age: the rest
    ratios = []
    for _ in range(cohorts):
        y = rng.integers(0, 3, n)
        scores = rng.gamma(2.0, 0.1 + 0.1 * y)  # skewed, class-dependent, no group effect
        wrong = (scores > np.quantile(scores, 0.8)).astype(float)  # the 0/1 error: the highest scores are wrong
        sex = rng.random(n) < 0.5
        band = rng.integers(0, 3, n)
        known = rng.random(n) < 0.95
        masks = np.stack([sex, ~sex, band == 0, band == 1, band == 2]) & known  # (5, n)
        order = [0, 1, 0, 1, 2, 3, 4, 2, 3, 4]  # columns: sex (score, score, error, error), then the age bands'
        which = [0, 0, 1, 1, 0, 0, 0, 1, 1, 1]  # 0: the score, 1: the error
        perms = class_permutations(rng, y, B)
        obs_both = [_gaps(s, y, masks, known) for s in (scores, wrong)]  # (5,) each
        null_both = [_gaps(s, y, masks[:, perms].transpose(1, 0, 2), known[perms][:, None, :]) for s in (scores, wrong)]
        observed = np.array([obs_both[w][g] for g, w in zip(order, which, strict=True)])
        null = np.stack([null_both[w][:, g] for g, w in zip(order, which, strict=True)], 1)  # (B, 10)
        errors["attributes"] += bool((westfall_young(observed, null, weights=weights) < alpha).any())
        errors["uncorrected"] += bool((permutation_pvalues(observed, null) < alpha).any())
        shares = weights / weights.sum() * alpha
        ratios.append(westfall_young_threshold(null, alpha, weights=weights)[:4] / shares[:4])
    bound = alpha + 2.5 * np.sqrt(alpha * (1 - alpha) / cohorts)
    assert errors["attributes"] / cohorts <= bound
    assert errors["uncorrected"] / cohorts > 0.25  # the check can fail: ten tests at alpha each err far more often
    assert np.mean(ratios) > 1.1  # dependence pays: the sex tests pass at more than their Bonferroni share
