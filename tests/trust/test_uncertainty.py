"""Uncertainty scores, risk-coverage curves, MC-dropout and abstention (``milcore predict --abstain-above``)."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feature_cache.errors import InvalidArgumentError, UserError
from milcore.cli import main
from milcore.metrics.classification import balanced_accuracy
from milcore.trust.uncertainty import (
    check_threshold,
    least_confidence,
    mutual_information,
    predictive_entropy,
    referral_summary,
    risk_coverage,
    uncertainty_scores,
)


# ----------------------------------------------------------------------------- scores
def test_scores_are_normalised_to_zero_one() -> None:
    uniform = np.full((2, 4), 0.25)
    onehot = np.eye(4)[[0, 3]]
    assert np.allclose(predictive_entropy(uniform), 1.0) and np.allclose(predictive_entropy(onehot), 0.0)
    assert np.allclose(least_confidence(uniform), 1.0) and np.allclose(least_confidence(onehot), 0.0)
    agree = np.stack([onehot, onehot])
    assert np.allclose(mutual_information(agree), 0.0)
    two = np.eye(2)
    disagree = np.stack([two[[0]], two[[1]]])  # (K=2, B=1, C=2): one model says 0, the other 1
    assert np.allclose(mutual_information(disagree), 1.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), st.integers(1, 6), st.integers(0, 10_000))
def test_scores_stay_in_range(c: int, b: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    members = rng.dirichlet(np.full(c, 0.3), size=(3, b))  # (K, B, C)
    for values in (predictive_entropy(members[0]), least_confidence(members[0]), mutual_information(members)):
        assert values.shape == (b,) and np.all(values >= 0) and np.all(values <= 1)


def test_single_model_has_no_disagreement_and_says_why() -> None:
    u = uncertainty_scores(["a", "b"], np.array([[0.9, 0.1], [0.5, 0.5]]))
    assert set(u.scores) == {"entropy", "least_confidence"}
    assert "two or more" in u.notes["disagreement"] and "mc_dropout" in u.notes
    with pytest.raises(UserError, match="not available"):
        u.score("disagreement")


# ----------------------------------------------------------------------------- risk-coverage
def _brute_force_risk(y: np.ndarray, p: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Mean risk at every coverage over all orders that sort the scores (ties in every order)."""
    n = len(y)
    curves = []
    for perm in itertools.permutations(range(n)):
        if np.all(np.diff(s[list(perm)]) >= 0):
            err = (y[list(perm)] != p[list(perm)]).cumsum()
            curves.append(err / np.arange(1, n + 1))
    return np.mean(curves, axis=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.sampled_from([0.0, 0.3, 0.3, 0.9])),
                min_size=1, max_size=6))
def test_risk_is_the_expectation_over_tied_orders(rows: list[tuple[int, int, float]]) -> None:
    y = np.asarray([r[0] for r in rows])
    pred = np.asarray([r[1] for r in rows])
    s = np.asarray([r[2] for r in rows])
    proba = np.eye(3)[pred] * 0.8 + 0.2 / 3
    rc = risk_coverage(y, proba, s)
    assert np.allclose(rc.risk, _brute_force_risk(y, pred, s))
    assert math.isclose(rc.aurc, float(rc.risk.mean()))


def test_constant_score_is_a_random_ranking_and_a_perfect_one_the_oracle() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    pred = np.where(rng.random(60) < 0.7, y, (y + 1) % 3)
    proba = np.eye(3)[pred]
    wrong = (pred != y).astype(float)
    flat = risk_coverage(y, proba, np.zeros(60))
    assert math.isclose(flat.aurc, flat.random_aurc) and math.isclose(flat.random_aurc, wrong.mean())
    perfect = risk_coverage(y, proba, wrong + rng.random(60) * 0.1)  # every error ranked last
    assert math.isclose(perfect.aurc, perfect.oracle_aurc)
    assert perfect.aurc < flat.aurc


def test_coverage_for_a_target_is_the_largest_reachable_by_a_threshold() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 80)
    s = np.round(rng.random(80), 1)  # many ties
    pred = np.where(rng.random(80) < 1 - s, y, 1 - y)  # uncertain patients are wrong more often
    proba = np.eye(2)[pred]
    rc = risk_coverage(y, proba, s)
    hit = rc.coverage_for(0.8)
    best = None
    for t in np.unique(s):  # every threshold a user can give: keep s <= t
        keep = s <= t
        if balanced_accuracy(y[keep], pred[keep], 2) >= 0.8:
            best = keep.mean()
    assert hit is not None and math.isclose(hit["coverage"], best)
    assert hit["referred"] == round((1 - best) * 80)
    kept = s <= hit["threshold"]
    assert math.isclose(kept.mean(), hit["coverage"])
    assert rc.coverage_for(1.01) is None


def test_unlabelled_patients_are_left_out() -> None:
    rc = risk_coverage(np.array([-1, 0, 1]), np.eye(2)[[0, 0, 1]], np.array([0.1, 0.2, 0.3]))
    assert rc.n == 2 and rc.random_aurc == 0.0


# ----------------------------------------------------------------------------- abstention
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x"])
def test_threshold_outside_the_range_is_refused(bad) -> None:
    with pytest.raises(InvalidArgumentError, match="--abstain-above"):
        check_threshold(bad)


def test_referral_counts_and_accepted_metrics() -> None:
    u = uncertainty_scores(["a", "b", "c", "d"], np.array([[0.99, 0.01], [0.6, 0.4], [0.5, 0.5], [0.1, 0.9]]))
    out = referral_summary(u, "entropy", 0.5, labels=np.array([0, 1, 1, 1]), predicted=np.array([0, 0, 0, 1]))
    assert out["referred_ids"] == ["b", "c"] and out["referred"] == 2 and out["patients"] == 4
    assert out["sentence"] == "2 of 4 patients referred for review (entropy above 0.5)"
    assert out["accepted"] == {"n": 2, "balanced_accuracy": 1.0, "accuracy": 1.0}
    assert out["referred_errors"] == 2


# ----------------------------------------------------------------------------- MC dropout
def test_mc_dropout_samples_only_models_with_dropout(planted: dict) -> None:
    import torch

    from milcore.data.store import open_bags
    from milcore.models import create_aggregator
    from milcore.training.config import TrainConfig
    from milcore.training.trainer import Trainer
    from milcore.trust.uncertainty import dropout_note, has_dropout, mc_dropout_proba

    data = open_bags(planted["bank"], planted["cohort"], "dx").view([f"p{i:03d}" for i in range(6)])
    trainer = Trainer(TrainConfig(device="cpu", batch_instances=256), data.dim, 2)
    torch.manual_seed(0)
    plain = create_aggregator("abmil", in_dim=data.dim, num_classes=2).eval()
    assert not has_dropout(plain) and mc_dropout_proba(plain, data, trainer) is None
    assert "no dropout" in dropout_note([plain])
    model = create_aggregator("abmil", in_dim=data.dim, num_classes=2, dropout=0.5).eval()
    state = torch.get_rng_state()
    a = mc_dropout_proba(model, data, trainer, samples=4, seed=3)
    b = mc_dropout_proba(model, data, trainer, samples=4, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is untouched
    assert a.shape == (4, 6, 2) and np.allclose(a, b) and a.std(axis=0).max() > 1e-4
    assert not model.training and not any(m.training for m in model.modules())
    deterministic = trainer.predict(model, data, with_attention=False).logits
    assert np.allclose(deterministic, trainer.predict(model, data, with_attention=False).logits)
    assert dropout_note([plain, model]) is None
    assert has_dropout(create_aggregator("transmil", in_dim=data.dim, num_classes=2, dropout=0.2))  # functional


# ----------------------------------------------------------------------------- a training run
def test_run_records_out_of_fold_uncertainty(dropout_run: Path) -> None:
    metrics = json.loads((dropout_run / "metrics.json").read_text())
    u = metrics["uncertainty"]
    assert set(u["scores"]) == {"entropy", "least_confidence", "mc_dropout"}
    assert "one fold model" in u["skipped"]["disagreement"]
    for v in u["scores"].values():
        assert v["n"] == 18 and 0 <= v["oracle_aurc"] <= v["aurc"] <= 1
        assert math.isclose(v["random_aurc"], 1 - metrics["pooled"]["metrics"]["accuracy"]["value"])
    with open(dropout_run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(0 <= float(r["uncertainty_entropy"]) <= 1 and r["uncertainty_mc_dropout"] for r in rows)
    report = (dropout_run / "report.md").read_text()
    assert "## Uncertainty and abstention" in report and "referred for review" in report
    assert "Risk-coverage" not in report or "report_files" in report


def test_run_without_dropout_says_mc_dropout_was_skipped(plain_run: Path) -> None:
    u = json.loads((plain_run / "metrics.json").read_text())["uncertainty"]
    assert "mc_dropout" not in u["scores"] and "no dropout" in u["skipped"]["mc_dropout"]
    with open(plain_run / "predictions.csv", newline="") as f:
        assert "uncertainty_mc_dropout" not in (csv.DictReader(f).fieldnames or [])


# ----------------------------------------------------------------------------- milcore predict
def test_predict_refers_uncertain_patients(dropout_run: Path, planted: dict, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "pred"
    rc = main(["predict", "--checkpoint", str(dropout_run), "--bank", str(planted["bank"]), "--cohort",
               str(planted["cohort"]), "--task", "dx", "--out", str(out), "--abstain-above", "0.3",
               "--mc-samples", "3"])  # fmt: skip
    assert rc == 0
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    entropy = np.asarray([float(r["uncertainty_entropy"]) for r in rows])
    referred = np.asarray([int(r["referred"]) for r in rows])
    assert np.array_equal(referred, (entropy > 0.3).astype(int))
    assert all(r["uncertainty_disagreement"] and r["uncertainty_mc_dropout"] for r in rows)
    meta = json.loads((out / "predictions.json").read_text())
    k = int(referred.sum())
    assert meta["abstention"]["referred"] == k and meta["abstention"]["patients"] == 18
    assert meta["abstention"]["referred_ids"] == [r["bag_id"] for r in rows if r["referred"] == "1"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["abstention"]["referred"] == k and metrics["abstention"]["accepted"]["n"] == 18 - k
    assert set(metrics["uncertainty"]["scores"]) == {"entropy", "least_confidence", "disagreement", "mc_dropout"}
    assert f"{k} of 18 patients referred for review (entropy above 0.3)" in capsys.readouterr().err
    report = (out / "report.md").read_text()  # the prediction folder's report says how many and shows the curve
    assert (out / "report.html").exists() and "## Referred for review" in report
    assert f"{k} of 18 patients referred for review (entropy above 0.3)" in report
    assert all(b in report for b in meta["abstention"]["referred_ids"])
    assert "## Uncertainty and abstention" in report and "report_files/" in report and "out-of-fold" not in report


def test_predict_reports_the_coverage_for_a_requested_balanced_accuracy(dropout_run: Path, planted: dict,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    from milcore.trust.uncertainty import risk_coverage

    out = tmp_path / "pred"
    rc = main(["predict", "--checkpoint", str(dropout_run), "--bank", str(planted["bank"]), "--cohort",
               str(planted["cohort"]), "--task", "dx", "--out", str(out), "--mc-samples", "0",
               "--coverage-target", "0.8", "--coverage-target", "0.975"])  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    entropy = metrics["uncertainty"]["scores"]["entropy"]
    assert list(entropy["coverage_for_balanced_accuracy"]) == ["0.8", "0.9", "0.95", "0.975"]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = json.loads((out / "predictions.json").read_text())["classes"]
    labels = np.asarray([classes.index(r["label"]) for r in rows])
    proba = np.asarray([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    rc_ = risk_coverage(labels, proba, np.asarray([float(r["uncertainty_entropy"]) for r in rows]), "entropy")
    for t in (0.8, 0.975):
        got, want = entropy["coverage_for_balanced_accuracy"][f"{t:g}"], rc_.coverage_for(t)  # csv rounds to 1e-6
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=2e-6) for k in got)
    report = (out / "report.md").read_text()
    assert "Balanced accuracy 0.975" in report and "Balanced accuracy 0.8" in report


@pytest.mark.parametrize(("args", "message"), [
    (["--coverage-target", "0"], "--coverage-target 0.0: a balanced accuracy must lie in (0, 1]"),
    (["--coverage-target", "1.5"], "--coverage-target 1.5: a balanced accuracy must lie in (0, 1]"),
    (["--coverage-target", "nan"], "must lie in (0, 1]"),
    (["--coverage-target", "high"], "invalid float value"),
    (["--abstain-above", "1.2"], "--abstain-above 1.2: outside the range"),
    (["--abstain-above", "-1"], "outside the range"),
    (["--abstain-above", "0.5", "--abstain-score", "disagreement", "--single"], "two or more models"),
    (["--abstain-above", "0.5", "--abstain-score", "mc_dropout", "--mc-samples", "0"], "--mc-samples is 0"),
    (["--abstain-above", "0.5", "--abstain-score", "nope"], "invalid choice"),
])  # fmt: skip
def test_bad_abstention_options_leave_nothing(dropout_run: Path, planted: dict, tmp_path: Path,
                                              capsys: pytest.CaptureFixture, args: list[str],
                                              message: str) -> None:  # fmt: skip
    checkpoint = dropout_run / "fold_0" if "--single" in args else dropout_run
    args = [a for a in args if a != "--single"]
    out = tmp_path / "pred"
    rc = main(["predict", "--checkpoint", str(checkpoint), "--bank", str(planted["bank"]), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_mc_dropout_abstention_is_refused_without_dropout(plain_run: Path, planted: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "pred"
    rc = main(["predict", "--checkpoint", str(plain_run), "--bank", str(planted["bank"]), "--out", str(out),
               "--abstain-above", "0.5", "--abstain-score", "mc_dropout"])  # fmt: skip
    assert rc == 2 and "no dropout" in capsys.readouterr().err and not out.exists()
