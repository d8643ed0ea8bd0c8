"""Issue 13 item 15: a model at chance must not read like a decision (training run, predict, audit)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from milcore.crossval import train_run
from milcore.training.config import RunSpec, TrainConfig

FAST = {"epochs": 6, "patience": 6, "min_epochs": 1, "lr": 5e-3, "batch_instances": 256, "device": "cpu",
        "num_workers": 0}  # fmt: skip
CHANCE_CLASSES = ("a", "b", "c", "d", "e")


def _train(bank: dict, out: Path, folds: int = 3) -> dict:
    spec = RunSpec(str(bank["bank"]), str(bank["cohort"]), "dx", folds=folds, n_boot=100)
    return train_run(spec, TrainConfig(model="mean", **FAST), out).metrics


@pytest.fixture(scope="module")
def chance_run(report_bank_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's repro: five classes, labels shuffled against noise features."""
    root = tmp_path_factory.mktemp("chance")
    bank = report_bank_factory(root / "bank", n_bags=60, classes=CHANCE_CLASSES, signal=False, seed=1)
    _train(bank, root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def good_run(report_bank_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("good")
    bank = report_bank_factory(root / "bank", n_bags=40, signal=True)
    _train(bank, root / "run")
    return root / "run"


def _codes(payload: dict) -> set[str]:
    return {w["code"] for w in payload["warnings"]}


def test_chance_run_says_so_in_metrics_json(chance_run: Path) -> None:
    metrics = json.loads((chance_run / "metrics.json").read_text())
    lo, _ = metrics["pooled"]["metrics"]["balanced_accuracy"]["ci95"]
    assert lo <= 1 / 5 + 1e-9, "the repro must really be at chance"
    assert "chance" in _codes(metrics)
    at_bound = [r["fold"] for r in metrics["per_fold"] if r["temperature"] > 19.9]
    assert bool(at_bound) == ("temperature_at_bound" in _codes(metrics))
    for w in metrics["warnings"]:
        assert {"code", "severity", "message"} <= set(w)


def test_chance_run_report_warns_at_the_top(chance_run: Path) -> None:
    for name in ("report.html", "report.md"):
        text = (chance_run / name).read_text()
        warn = text.find("not distinguishable from chance on this cohort")
        assert 0 <= warn < text.find("Headline"), f"{name}: the chance warning must come before the metrics"
        assert "pooled out-of-fold" in text and "Terms" in text  # glossary block
        assert "temperature" in text.lower()


def test_good_run_has_no_chance_warning(good_run: Path) -> None:
    metrics = json.loads((good_run / "metrics.json").read_text())
    assert metrics["balanced_accuracy"] >= 0.8
    assert not {"chance", "below_chance", "single_predicted_class"} & _codes(metrics)
    assert all(w["severity"] != "critical" for w in metrics["warnings"])
    assert "not distinguishable from chance" not in (good_run / "report.html").read_text()


def test_small_classes_are_reported(report_bank_factory, tmp_path: Path) -> None:
    # (a class smaller than the folds is refused by make_folds before training; see test_caveats for that rule)
    bank = report_bank_factory(tmp_path / "bank", n_bags=24, classes=("a", "b", "c", "d", "e", "f"), seed=3)
    metrics = _train(bank, tmp_path / "run", folds=3)
    assert "small_class" in _codes(metrics)
    small = next(w for w in metrics["warnings"] if w["code"] == "small_class")
    assert small["classes"] == dict.fromkeys("abcdef", 4)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Fewer than 10 patients in 6 classes" in md and md.find("Fewer than 10") < md.find("Headline")


def test_audit_of_a_chance_run_does_not_reassure(chance_run: Path) -> None:
    from milcore.audit.config import AuditConfig
    from milcore.audit.run import audit_run

    cohort = chance_run.parent / "bank" / "cohort.csv"
    audit = audit_run(chance_run, cohort, chance_run.parent / "audit",
                      AuditConfig(n_boot=100, n_perm=100, min_group_size=10))  # fmt: skip
    head = audit["summary"]["headline"]
    assert "not meaningful" in head and "chance" in head
    assert not head.startswith("No subgroup is significantly worse")
    assert "chance" in {w["code"] for w in audit["warnings"]}
    on_disk = json.loads((chance_run.parent / "audit" / "audit.json").read_text())
    assert on_disk["warnings"] == audit["warnings"]
    md = (chance_run.parent / "audit" / "audit.md").read_text()
    assert md.find("not distinguishable from chance") < md.find("Per group")


def _write_case(folder: Path, n: int, accuracy: float, seed: int = 0) -> tuple[Path, Path]:
    """Predictions of 4 classes correct at ``accuracy``; nobody aged 87+ is female (an empty intersection)."""
    from milcore.data.predictions import PredictionTable, write_predictions

    rng = np.random.default_rng(seed)
    classes = ["c0", "c1", "c2", "c3"]
    y = rng.integers(0, 4, n)
    pred = np.where(rng.random(n) < accuracy, y, (y + rng.integers(1, 4, n)) % 4)
    logits = rng.normal(0, 0.5, (n, 4))
    logits[np.arange(n), pred] += 2.0
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    sex = np.where(np.arange(n) % 2 == 0, "F", "M")
    age = np.where(np.arange(n) % 2 == 0, 30 + np.arange(n) % 40, 50 + np.arange(n) % 45)
    ids = [f"p{i:04d}" for i in range(n)]
    write_predictions(folder / "run", PredictionTable(ids, classes, proba, y, np.arange(n) % 5))
    lines = ["patient_id,dx,age,sex"] + [f"{b},{classes[c]},{a},{s}" for b, c, a, s in zip(ids, y, age, sex,
                                                                                           strict=True)]  # fmt: skip
    (folder / "cohort.csv").write_text("\n".join(lines) + "\n")
    return folder / "run", folder / "cohort.csv"


def test_audit_of_a_good_model_has_no_chance_warning_and_drops_empty_rows(tmp_path: Path) -> None:
    from milcore.audit.config import AuditConfig
    from milcore.audit.run import audit_run

    run, cohort = _write_case(tmp_path, 240, accuracy=0.85)
    audit = audit_run(run, cohort, tmp_path / "audit", AuditConfig(n_boot=100, n_perm=100))
    assert "chance" not in {w["code"] for w in audit["warnings"]}
    assert "not meaningful" not in audit["summary"]["headline"]
    assert all(g["n"] > 0 for g in audit["groups"]), "rows with n = 0 are dropped"
    assert "sex=F & age=87-130" in audit["empty_groups"]
    md = (tmp_path / "audit" / "audit.md").read_text()
    assert "| sex=F & age=87-130 | 0 |" not in md and "n=0)" not in md
    assert " 1 tests" not in md and "Terms" in md and "Holm" in md


def test_audit_of_a_chance_model_from_simulated_predictions(tmp_path: Path) -> None:
    from milcore.audit.config import AuditConfig
    from milcore.audit.run import audit_run

    run, cohort = _write_case(tmp_path, 200, accuracy=0.25, seed=2)
    audit = audit_run(run, cohort, tmp_path / "audit", AuditConfig(n_boot=100, n_perm=100))
    assert "chance" in {w["code"] for w in audit["warnings"]}
    assert "not meaningful" in audit["summary"]["headline"]
    html = (tmp_path / "audit" / "audit.html").read_text()
    assert "class='warn'" in html and html.find("class='warn'") < html.find("Per group")


def test_audit_says_when_groups_are_too_small(tmp_path: Path) -> None:
    from milcore.audit.config import AuditConfig
    from milcore.audit.run import audit_run

    run, cohort = _write_case(tmp_path, 30, accuracy=0.9, seed=4)
    audit = audit_run(run, cohort, tmp_path / "audit", AuditConfig(n_boot=50, n_perm=50, min_group_size=20))
    codes = {w["code"] for w in audit["warnings"]}
    assert {"small_groups", "no_testable_group"} <= codes
    assert "No subgroup could be tested" in audit["summary"]["headline"]
    assert "significantly worse" not in audit["summary"]["headline"]


def test_predict_scoring_of_a_chance_model_carries_the_warning(chance_run: Path, tmp_path: Path) -> None:
    from milcore.cli import main

    bank = chance_run.parent / "bank"
    rc = main(["-q", "predict", "--checkpoint", str(chance_run), "--bank", str(bank / "bank.h5"), "--out",
               str(tmp_path / "pred"), "--cohort", str(bank / "cohort.csv"), "--task", "dx",
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    # predict's metrics.json is evaluate()'s output: the same rules, the same warnings list
    assert "chance" in _codes(metrics), metrics["metrics"]["balanced_accuracy"]
