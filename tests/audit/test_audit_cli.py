"""``milcore audit`` in-process: result files, flags on a planted effect, none without, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from milcore.cli import main

FAST = ["--permutations", "400", "--boot", "100"]


@pytest.fixture(scope="module")
def biased(tmp_path_factory: pytest.TempPathFactory, audit_case) -> tuple[Path, Path, Path, dict]:
    """300 patients, women classified correctly 68% of the time, men 88% (a 20-point gap)."""
    root = tmp_path_factory.mktemp("biased")
    run, cohort = audit_case(root, 300, 0, 0.68, 0.88)
    out = root / "audit"
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(cohort), "--out", str(out), *FAST]) == 0
    return run, cohort, out, json.loads((out / "audit.json").read_text())


def test_audit_files_and_schema(biased) -> None:
    _, _, out, audit = biased
    assert (out / "audit.html").exists() and (out / "audit.md").exists()
    html = (out / "audit.html").read_text()
    assert "data:image/png;base64" in html and "http://" not in html and "https://" not in html
    md = (out / "audit.md").read_text()
    assert "forest_balanced_accuracy" in md and "recall_heatmap" in md
    assert "sex=F" in md and "## Summary" in md
    for c in audit["comparisons"]:
        for key in ("group", "metric", "gap", "gap_ci95", "p_corrected", "flagged", "n_group"):
            assert key in c
        assert isinstance(c["flagged"], bool)
    assert {c["metric"] for c in audit["comparisons"]} >= {"balanced_accuracy", "auroc", "ece", "recall[NPM1]",
                                                          "fpr[control]"}  # fmt: skip
    assert audit["families"]["primary"]["tests"] >= 2
    assert {p["metric"] for p in audit["parity"]} == {"equalized_odds_difference", "demographic_parity_difference"}


def test_planted_female_effect_is_flagged(biased) -> None:
    _, _, _, audit = biased
    primary = {(c["group"], c["metric"]): c for c in audit["comparisons"] if c["family"] == "primary"
               and c["attribute"] == "sex"}  # fmt: skip
    # each sex is tested on both primary statistics (the true-class log-odds and balanced accuracy)
    assert set(primary) == {(g, m) for g in ("sex=F", "sex=M") for m in audit["config"]["primary_metrics"]}
    assert audit["config"]["primary_metrics"] == ["balanced_log_odds", "balanced_accuracy"]
    ba = primary["sex=F", "balanced_accuracy"]
    assert ba["flagged"] and ba["worse"] and ba["gap"] < -0.1 and ba["gap_ci95"][1] < 0 and ba["p_corrected"] < 0.05
    assert not any(primary["sex=M", m]["flagged"] or primary["sex=M", m]["worse"]  # the better side is not flagged
                   for m in audit["config"]["primary_metrics"])  # fmt: skip
    brier = next(c for c in audit["comparisons"] if c["group"] == "sex=F" and c["metric"] == "balanced_brier")
    assert brier["family"] == "secondary" and brier["worse"] and brier["gap_ci95"][0] > 0  # a higher Brier score
    assert "sex=F" in audit["summary"]["primary_flagged"]
    assert "sex=F" in audit["summary"]["headline"]


def test_no_effect_no_primary_flag(tmp_path: Path, audit_case) -> None:
    run, cohort = audit_case(tmp_path, 200, 5, 0.8, 0.8)
    out = tmp_path / "audit"
    options = ["--permutations", "300", "--boot", "50", "--no-intersections"]
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(cohort), "--out", str(out), *options]) == 0
    audit = json.loads((out / "audit.json").read_text())
    assert audit["summary"]["primary_flagged"] == []
    # the report does not read silence as fairness: every primary verdict that is not a flag carries its MDE
    md = (out / "audit.md").read_text()
    assert "not evidence of fairness" in audit["summary"]["headline"] and "not evidence of fairness" in md
    quiet = audit["summary"]["not_flagged"]
    primary = [c for c in audit["comparisons"] if c["family"] == "primary" and c["p_value"] is not None]
    assert len(quiet) == len(primary) > 0
    assert "## Detectable gaps" in md and all(q["text"] in md for q in quiet)
    sexes = [q for q in quiet if q["group"].startswith("sex")]
    assert sexes and all(q["mde"] is not None and "could go unseen here" in q["text"] for q in sexes)
    # one verdict per group and primary metric, each with its own MDE (balanced accuracy's in points)
    assert {(q["group"], q["metric"]) for q in sexes} == {(g, m) for g in ("sex=F", "sex=M")
                                                          for m in ("balanced_log_odds", "balanced_accuracy")}
    assert all(" points could go unseen" in q["text"] for q in sexes if q["metric"] == "balanced_accuracy")
    assert "flagged when any of its tests is" in md
    shown = [c for c in audit["comparisons"] if c["metric"] == "balanced_accuracy" and c["level"] == "attribute"
             and c["p_value"] is not None and c["mde"] is not None]  # fmt: skip
    assert shown and md.count("no (MDE ") >= len(shown)  # the comparison table's verdict column


def test_small_groups_are_insufficient(biased, tmp_path: Path) -> None:
    run, cohort, _, _ = biased
    out = tmp_path / "a"
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(cohort), "--out", str(out), "--min-group", "30",
                 "--permutations", "100", "--boot", "50", "--attributes", "age"]) == 0  # fmt: skip
    audit = json.loads((out / "audit.json").read_text())
    small = [g for g in audit["groups"] if g["n"] < 30]
    assert small and all(g["status"] == "insufficient" for g in small)
    assert not any(c["group"] in {g["name"] for g in small} for c in audit["comparisons"])


def test_refuses_to_overwrite_and_keeps_the_old_audit(biased) -> None:
    run, cohort, out, _ = biased
    before = (out / "audit.json").read_text()
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(cohort), "--out", str(out)]) == 2
    assert (out / "audit.json").read_text() == before


def test_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str], audit_case) -> None:
    run, cohort = audit_case(tmp_path, 40, 1, 0.8, 0.8)
    other = tmp_path / "other.csv"
    other.write_text("patient_id,sex\nzz,F\n")
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(other), "--out", str(tmp_path / "o1")]) == 2
    assert "no bag id in common" in capsys.readouterr().err
    nosex = tmp_path / "nosex.csv"
    nosex.write_text("\n".join(line.rsplit(",", 2)[0] for line in cohort.read_text().splitlines()) + "\n")
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(nosex), "--out", str(tmp_path / "o2"),
                 "--permutations", "50", "--boot", "20"]) == 0  # fmt: skip
    audit = json.loads((tmp_path / "o2" / "audit.json").read_text())
    assert audit["attributes"]["missing"] == ["sex", "site"] and audit["attributes"]["audited"] == ["age"]
    assert main(["-q", "audit", "--run", str(tmp_path / "nowhere"), "--cohort", str(cohort), "--out",
                 str(tmp_path / "o3")]) == 2  # fmt: skip
    assert "predictions.csv" in capsys.readouterr().err
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(cohort), "--out", str(tmp_path / "o4"),
                 "--age-bands", "old"]) == 2  # fmt: skip
    assert "LOW-HIGH" in capsys.readouterr().err
    unlabelled = tmp_path / "unl"
    unlabelled.mkdir()
    lines = (run / "predictions.csv").read_text().splitlines()
    rows = [lines[0]] + [",".join([*r.split(",")[:2], "", *r.split(",")[3:]]) for r in lines[1:]]
    (unlabelled / "predictions.csv").write_text("\n".join(rows) + "\n")
    assert main(["-q", "audit", "--run", str(unlabelled), "--cohort", str(cohort), "--out", str(tmp_path / "o5")]) == 2
    assert "no prediction has a label" in capsys.readouterr().err


@pytest.mark.slow
def test_false_alarm_rate_over_seeds(tmp_path: Path, audit_case) -> None:
    """Unbiased predictions: seeds with any flag (both families) stay within the stated 2 x alpha = 10%."""
    from milcore.audit.config import AuditConfig
    from milcore.audit.run import audit_run

    flagged = []
    for seed in range(20):
        run, cohort = audit_case(tmp_path / str(seed), 200, 100 + seed, 0.8, 0.8)
        audit = audit_run(run, cohort, tmp_path / str(seed) / "audit",
                          AuditConfig(n_boot=100, n_perm=1000, seed=seed))  # fmt: skip
        flagged.append(bool(audit["summary"]["flagged_groups"]))
    assert np.mean(flagged) <= 0.15  # 10% stated; 3 of 20 allowed for Monte-Carlo noise


def test_issue19_flags_reach_the_audit(biased, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--primary-metrics, --alternative, --no-permute-within-class and --mde-power are recorded and used."""
    run, cohort, _, default = biased
    assert default["config"]["primary_metrics"] == ["balanced_log_odds", "balanced_accuracy"]
    assert default["config"]["alternative"] == "worse"
    assert default["config"]["permute_within_class"] is True
    out = tmp_path / "old"
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(cohort), "--out", str(out), "--permutations",
                 "200", "--boot", "20", "--no-intersections", "--attributes", "sex", "--primary-metrics",
                 "balanced_accuracy", "--alternative", "two-sided", "--no-permute-within-class",
                 "--mde-power", "0.9", "--primary-attributes", "sex"]) == 0  # fmt: skip
    audit = json.loads((out / "audit.json").read_text())
    assert audit["config"]["mde_power"] == 0.9 and audit["config"]["permute_within_class"] is False
    assert audit["config"]["primary_attributes"] == ["sex"]
    f = next(c for c in audit["comparisons"] if c["group"] == "sex=F" and c["family"] == "primary")
    assert f["metric"] == "balanced_accuracy" and f["alternative"] == "two-sided"
    assert audit["families"]["primary"]["tests"] == 1  # two-sided: one test for the two sexes
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(cohort), "--out", str(tmp_path / "bad"),
                 "--alternative", "less"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert any("--alternative" in line and "worse" in line for line in err)
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(cohort), "--out", str(tmp_path / "bad2"),
                 "--attributes", "sex", "--primary-attributes", "age"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "primary_attributes" in err[0] and "age" in err[0]
    assert not (tmp_path / "bad2").exists()  # refused before anything was written
