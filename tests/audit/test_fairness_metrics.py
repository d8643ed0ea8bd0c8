"""The audit's weighted metrics against hand-computed values, the training metrics and fairlearn."""

from __future__ import annotations

import numpy as np
import pytest

from milcore import metrics as tm
from milcore.metrics import classification as cl
from milcore.metrics.weighted import LabelledPredictions, flatten, parity_differences, weighted_metrics

# 8 patients, 3 classes. Group A = first 4, group B = last 4.
Y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
PROBA = np.array([
    [0.7, 0.2, 0.1],  # 0 -> 0 correct, conf 0.7
    [0.1, 0.6, 0.3],  # 1 -> 1 correct, conf 0.6
    [0.5, 0.1, 0.4],  # 2 -> 0 wrong,   conf 0.5
    [0.2, 0.7, 0.1],  # 0 -> 1 wrong,   conf 0.7
    [0.1, 0.8, 0.1],  # 1 -> 1 correct, conf 0.8
    [0.1, 0.1, 0.8],  # 2 -> 2 correct, conf 0.8
    [0.9, 0.05, 0.05],  # 0 -> 0 correct, conf 0.9
    [0.3, 0.4, 0.3],  # 1 -> 1 correct, conf 0.4
])  # fmt: skip
A = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=float)
B = 1 - A


def test_group_a_by_hand() -> None:
    m = weighted_metrics(LabelledPredictions(Y, PROBA), A[None])
    # group A: true 0,1,2,0; predicted 0,1,0,1. recall: class0 1/2, class1 1/1, class2 0/1 -> BA 0.5
    assert m["balanced_accuracy"][0] == pytest.approx(0.5)
    assert m["recall"][0].tolist() == pytest.approx([0.5, 1.0, 0.0])
    # FPR: class0 predicted for patient 2 (neg of 0: patients 1,2 -> 1/2); class1 predicted for patient 3
    # (negatives of class 1: patients 0,2,3 -> 1/3); class2 never predicted -> 0/3
    assert m["fpr"][0].tolist() == pytest.approx([0.5, 1 / 3, 0.0])
    # selection rates: predicted 0 twice, 1 twice, 2 never
    assert m["selection_rate"][0].tolist() == pytest.approx([0.5, 0.5, 0.0])
    # F1: class0 tp1, true2, pred2 -> 0.5; class1 tp1 true1 pred2 -> 2/3; class2 tp0 true1 pred0 -> 0
    assert m["macro_f1"][0] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    # ECE, 10 bins: bin 7 (0.7, 0.7): acc (1 + 0)/2, conf 0.7 -> |0.5-0.7|*2; bin 6 (0.6): |1-0.6|;
    # bin 5 (0.5): |0-0.5| -> (0.4 + 0.4 + 0.5) / 4
    assert m["ece"][0] == pytest.approx((0.4 + 0.4 + 0.5) / 4)
    # AUROC one vs rest. class0 scores: pos {0.7, 0.2} vs neg {0.1, 0.5}: pairs won 0.7>0.1,0.7>0.5,0.2>0.1 -> 3/4
    # class1: pos {0.6} vs neg {0.2, 0.1, 0.7} -> 2/3; class2: pos {0.4} vs neg {0.1, 0.3, 0.1} -> 1
    assert m["auroc"][0] == pytest.approx((0.75 + 2 / 3 + 1.0) / 3)
    assert m["n"][0] == 4


def test_group_b_and_support() -> None:
    m = weighted_metrics(LabelledPredictions(Y, PROBA), B[None])
    assert m["balanced_accuracy"][0] == pytest.approx(1.0)
    assert m["support"][0].tolist() == [1, 2, 1]


@pytest.mark.parametrize("num_classes", [2, 4])
def test_matches_training_metrics_on_random_groups(num_classes: int) -> None:
    rng = np.random.default_rng(num_classes)
    n = 120
    y = rng.integers(0, num_classes, n)
    proba = rng.dirichlet(np.ones(num_classes), n)
    proba[np.arange(n), y] += rng.random(n)  # some signal
    proba /= proba.sum(1, keepdims=True)
    pred = LabelledPredictions(y, proba)
    masks = rng.random((5, n)) < 0.5
    m = weighted_metrics(pred, masks.astype(float))
    for r, mask in enumerate(masks):
        ref = tm.scalar_metrics(y[mask], proba[mask])
        for k in ("balanced_accuracy", "macro_f1", "auroc", "ece"):
            assert m[k][r] == pytest.approx(ref[k], abs=1e-9), k


def test_bootstrap_counts_equal_repeated_patients() -> None:
    rng = np.random.default_rng(0)
    pred = LabelledPredictions(Y, PROBA)
    counts = rng.multinomial(8, np.full(8, 1 / 8), size=6).astype(float)
    m = weighted_metrics(pred, counts)
    for r, c in enumerate(counts):
        idx = np.repeat(np.arange(8), c.astype(int))
        ref = tm.scalar_metrics(Y[idx], PROBA[idx])
        for k in ("balanced_accuracy", "macro_f1", "ece"):
            assert m[k][r] == pytest.approx(ref[k], abs=1e-9)
        if np.isfinite(ref["auroc"]):
            assert m["auroc"][r] == pytest.approx(ref["auroc"], abs=1e-9)


def test_auroc_with_ties_matches_training_metric() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 60)
    proba = np.round(rng.dirichlet(np.ones(3), 60), 1)  # many tied scores
    W = rng.multinomial(60, np.full(60, 1 / 60), size=4).astype(float)
    got = weighted_metrics(LabelledPredictions(y, proba), W)["auroc"]
    for r, w in enumerate(W):
        idx = np.repeat(np.arange(60), w.astype(int))
        assert got[r] == pytest.approx(cl.macro_auroc(y[idx], proba[idx]), abs=1e-12)


def test_parity_differences_by_hand() -> None:
    m = weighted_metrics(LabelledPredictions(Y, PROBA), np.stack([A, B]), with_auroc=False)
    d = parity_differences(m)
    # TPR ranges: class0 |0.5-1|=0.5, class1 |1-1|=0, class2 |0-1|=1; FPR ranges: class0 |0.5-0|=0.5,
    # class1 |1/3 - 0|=1/3, class2 0 -> EOD = 1.0. Selection: A [.5,.5,0], B [.25,.5,.25] -> DPD 0.25
    assert d["equalized_odds_difference"] == pytest.approx(1.0)
    assert d["demographic_parity_difference"] == pytest.approx(0.25)


def test_flatten_names() -> None:
    m = weighted_metrics(LabelledPredictions(Y, PROBA), A[None])
    flat = flatten(m, ["a", "b", "c"])
    assert flat["recall[c]"][0] == 0.0 and "fpr[a]" in flat and "selection_rate[b]" in flat


def test_against_fairlearn_metricframe() -> None:
    fairlearn = pytest.importorskip("fairlearn.metrics")
    from sklearn.metrics import balanced_accuracy_score, recall_score

    rng = np.random.default_rng(3)
    n = 200
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.5 + (y - 0.5) * rng.random(n), 0, 1)
    proba = np.stack([1 - p1, p1], 1)
    sex = rng.choice(["F", "M"], n)
    y_pred = proba.argmax(1)
    frame = fairlearn.MetricFrame(metrics={"ba": balanced_accuracy_score, "tpr": recall_score},
                                  y_true=y, y_pred=y_pred, sensitive_features=sex)  # fmt: skip
    masks = np.stack([sex == "F", sex == "M"]).astype(float)
    m = weighted_metrics(LabelledPredictions(y, proba), masks)
    assert m["balanced_accuracy"].tolist() == pytest.approx(frame.by_group["ba"].loc[["F", "M"]].tolist())
    assert m["recall"][:, 1].tolist() == pytest.approx(frame.by_group["tpr"].loc[["F", "M"]].tolist())
    d = parity_differences(m)
    assert d["equalized_odds_difference"] == pytest.approx(
        fairlearn.equalized_odds_difference(y, y_pred, sensitive_features=sex)
    )
    assert d["demographic_parity_difference"] == pytest.approx(
        fairlearn.demographic_parity_difference(y, y_pred, sensitive_features=sex)
    )


def test_gaps_and_ratios_by_hand() -> None:
    from milcore.audit.config import AuditConfig
    from milcore.audit.groups import build_groups
    from milcore.audit.stratified import audit_predictions

    sex = np.asarray(["F"] * 4 + ["M"] * 4, dtype=object)
    config = AuditConfig(attributes=("sex",), min_group_size=2, n_boot=50, n_perm=50, per_class=False)
    groups = build_groups({"sex": sex}, 8, config)
    audit = audit_predictions(LabelledPredictions(Y, PROBA), ["a", "b", "c"], groups, config)
    f = next(c for c in audit["comparisons"] if c["group"] == "sex=F" and c["metric"] == "balanced_accuracy")
    overall = (2 / 3 + 1.0 + 0.5) / 3  # class 0: 2 of 3 right, class 1: 3 of 3, class 2: 1 of 2
    assert audit["overall"]["metrics"]["balanced_accuracy"]["value"] == pytest.approx(overall)
    assert f["value"] == pytest.approx(0.5) and f["rest"] == pytest.approx(1.0)
    assert f["gap"] == pytest.approx(-0.5) and f["ratio"] == pytest.approx(0.5)
    assert f["gap_vs_overall"] == pytest.approx(0.5 - overall)
    assert f["ratio_vs_overall"] == pytest.approx(0.5 / overall)
    assert f["best_group"] == "sex=M" and f["gap_vs_best"] == pytest.approx(-0.5)
    assert f["worse"] and f["n_group"] == 4 and f["n_rest"] == 4
    m = next(c for c in audit["comparisons"] if c["group"] == "sex=M" and c["metric"] == "balanced_accuracy")
    # one-sided (the default): "F worse" and "M worse" are two tests of the family, from one set of permutations
    assert m["test_key"] != f["test_key"] and m["null_sd"] == f["null_sd"]
    assert audit["families"]["primary"]["tests"] == 4  # two sexes x two primary metrics (log-odds, balanced accuracy)
    two = audit_predictions(LabelledPredictions(Y, PROBA), ["a", "b", "c"], groups,
                            config.replace(alternative="two-sided"))  # fmt: skip
    f, m = (next(c for c in two["comparisons"] if c["group"] == g and c["metric"] == "balanced_accuracy")
            for g in ("sex=F", "sex=M"))  # fmt: skip
    assert m["p_value"] == f["p_value"] and m["test_key"] == f["test_key"]  # one test, seen from both sides
    assert two["families"]["primary"]["tests"] == 2  # one two-sided test per primary metric
