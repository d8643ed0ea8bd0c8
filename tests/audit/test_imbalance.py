"""``milcore audit experiment`` on a small bank: design, runs, analysis and report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from milcore.cli import main


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """48 patients, 2 classes, 8-dim features with a class signal; women and men, three age bands."""
    import torch

    from feature_cache.bank import EncoderInfo, open_writer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("exp")
    rng = np.random.default_rng(0)
    bank, cohort = root / "bank.h5", root / "cohort.csv"
    lines = ["patient_id,task,sex,age"]
    with open_writer(bank, EncoderInfo("toy", "1", "", "identity", dim=8), mode="w") as w:
        for i in range(48):
            y = i % 2
            x = rng.normal(size=(12, 8))
            x[:4, 0] += 3.0 * y  # diseased bags carry a few shifted cells
            w.append(f"p{i:03d}", x)
            lines.append(
                f"p{i:03d},{'control' if y == 0 else 'aml'},{'F' if (i // 2) % 2 else 'M'},{30 + (i % 3) * 20}"
            )
    cohort.write_text("\n".join(lines) + "\n")
    return bank, cohort


def test_experiment_end_to_end(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    bank, cohort = small_cohort
    out = tmp_path / "exp"
    code = main(["-q", "audit", "experiment", "--bank", str(bank), "--cohort", str(cohort), "--task", "task",
                 "--out", str(out), "--fractions", "0,0.5,1", "--seeds", "2", "--epochs", "3", "--patience", "2",
                 "--age-bands", "18-39,40-59,60-90", "--device", "cpu"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "audit.json").read_text())
    design = result["design"]
    assert design["test"]["all"] == design["test"]["sex=F"] + design["test"]["sex=M"]
    sex_runs = [r for r in result["runs"] if r["experiment"] == "sex"]
    assert len(sex_runs) == 6 and {r["n_train"] for r in sex_runs} == {design["sex_train_size"]}
    assert sorted({r["n_female"] for r in sex_runs}) == [0, design["sex_train_size"] // 2, design["sex_train_size"]]
    age_runs = [r for r in result["runs"] if r["experiment"] == "age"]
    assert {r["excluded"] for r in age_runs} == {"none", "18-39", "40-59", "60-90"}
    assert {r["n_train"] for r in age_runs} == {design["age_train_size"]}
    trends = result["analysis"]["sex"]["trends"]
    assert set(trends["sex=F:balanced_accuracy"]) >= {"slope", "ci95", "p_value"}
    curve = result["analysis"]["sex"]["curves"]["sex=F:balanced_accuracy"]
    assert [p["female_fraction"] for p in curve] == [0, 0.5, 1] and all(p["n"] == 2 for p in curve)
    effects = result["analysis"]["age"]["effects"]
    assert {e["excluded"] for e in effects} == {"18-39", "40-59", "60-90"} and all("p_value" in e for e in effects)
    md = (out / "audit.md").read_text()
    assert "Sex imbalance" in md and "imbalance_balanced_accuracy" in md and "Age bands left out" in md
    assert "data:image/png;base64" in (out / "audit.html").read_text()


def test_experiment_bad_input(small_cohort: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    bank, cohort = small_cohort
    base = ["-q", "audit", "experiment", "--bank", str(bank), "--task", "task", "--device", "cpu"]
    assert main([*base, "--cohort", str(cohort), "--out", str(tmp_path / "a"), "--fractions", "0,2"]) == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert main([*base, "--cohort", str(cohort), "--out", str(tmp_path / "b"), "--train-size", "500"]) == 2
    assert "--train-size 500" in capsys.readouterr().err
    nosex = tmp_path / "nosex.csv"
    nosex.write_text("\n".join(",".join(r.split(",")[:2]) for r in cohort.read_text().splitlines()) + "\n")
    assert main([*base, "--cohort", str(nosex), "--out", str(tmp_path / "c")]) == 2
    assert "no 'sex' column" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists(), "bad input leaves no empty folder"
