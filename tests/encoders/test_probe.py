"""``milcore encoder probe``: the numbers are scikit-learn's, the CIs bracket them, the CLI writes probe.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from feature_cache.encoders.probe import ProbeConfig, evaluate, knn_model, logistic_model, probe_cv, probe_split
from milcore.cli import main
from tests.encoders.cellsets import write_class_tree

CLASSES = ("a", "b", "c")


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 6)) + np.eye(3, 6)[y] * 1.5
    return x, y


def test_split_probe_equals_scikit_learn() -> None:
    xtr, ytr = blobs(90, 0)
    xte, yte = blobs(60, 1)
    config = ProbeConfig(data="-", encoder="-", n_boot=40, knn_k=5)
    out = probe_split(xtr, ytr, xte, yte, CLASSES, config)
    for name, model in (("logistic", logistic_model()), ("knn", knn_model(5))):
        prob = model.fit(xtr, ytr).predict_proba(xte)
        pred = prob.argmax(1)
        m = out[name]
        assert m["accuracy"]["value"] == pytest.approx(accuracy_score(yte, pred))
        assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(yte, pred))
        assert m["macro_f1"]["value"] == pytest.approx(f1_score(yte, pred, average="macro"))
        for c, cls in enumerate(CLASSES):
            assert m["auroc"][cls]["value"] == pytest.approx(roc_auc_score(yte == c, prob[:, c]))
            lo, hi = m["auroc"][cls]["ci95"]
            assert lo <= hi
        lo, hi = m["balanced_accuracy"]["ci95"]
        assert lo <= m["balanced_accuracy"]["value"] <= hi
        assert np.asarray(m["confusion"]).sum() == len(yte)


def test_cv_probe_pools_out_of_fold_predictions() -> None:
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x, y = blobs(90, 2)
    config = ProbeConfig(data="-", encoder="-", n_boot=0, folds=3, seed=4)
    out = probe_cv(x, y, CLASSES, config)
    prob = cross_val_predict(logistic_model(), x, y, cv=StratifiedKFold(3, shuffle=True, random_state=4),
                             method="predict_proba")  # fmt: skip
    assert out["logistic"]["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, prob.argmax(1)))
    assert out["logistic"]["macro_auroc"]["value"] == pytest.approx(
        np.mean([roc_auc_score(y == c, prob[:, c]) for c in range(3)]))


def test_bootstrap_ci_shrinks_with_more_cells() -> None:
    x, y = blobs(600, 3)
    prob = logistic_model().fit(x[:300], y[:300]).predict_proba(x[300:])
    small = evaluate(y[300:330], prob[:30], CLASSES, n_boot=200)
    large = evaluate(y[300:], prob, CLASSES, n_boot=200)
    width = lambda m: m["accuracy"]["ci95"][1] - m["accuracy"]["ci95"][0]  # noqa: E731
    assert width(large) < width(small)


def test_cli_probe_on_a_crop_folder(tmp_path: Path, capsys) -> None:
    tree = write_class_tree(tmp_path / "tree", n_per_class=10, size=20, kinds=3)
    rc = main(["encoder", "probe", "--data", str(tree), "--encoder", "toy", "--folds", "3", "--n-boot", "20",
               "--knn-k", "3", "--device", "cpu", "--out", str(tmp_path / "p"), "-q"])  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert result["protocol"] == "cv" and result["classes"] == ["brown", "large_nucleus", "small_nucleus"]
    assert result["encoder"]["name"] == "toy" and result["cells"] == {"cells": 30}
    assert result["logistic"]["balanced_accuracy"]["value"] > 0.6  # the drawn types differ in colour and size
    assert "| logistic |" in capsys.readouterr().out


def test_cli_probe_split_needs_train_and_test(tmp_path: Path, capsys) -> None:
    tree = write_class_tree(tmp_path / "tree", n_per_class=6, size=20)
    rc = main(["encoder", "probe", "--data", str(tree), "--encoder", "toy", "--protocol", "split", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(tree) in err[0] and "split" in err[0]
