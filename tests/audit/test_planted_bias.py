"""End to end on the synthetic generator: a planted female effect is flagged by the audit of a trained ABMIL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from milcore.cli import main


@pytest.mark.slow
def test_planted_female_bias_is_flagged(tmp_path: Path) -> None:
    """``--bias sex=F:0.1`` leaves women's diseased smears about one diagnostic cell in 60: the audit flags sex=F."""
    import torch

    torch.set_num_threads(1)
    cohort, bank, run, out = tmp_path / "cohort", tmp_path / "bank.h5", tmp_path / "run", tmp_path / "audit"
    assert main(["-q", "synth", str(cohort), "--task", "aml", "--patients", "200", "--seed", "3",
                 "--bias", "sex=F:0.1", "--bag-median", "60", "--bag-max", "200"]) == 0  # fmt: skip
    assert main(["-q", "extract", "--source", "synthetic", "--input", str(cohort), "--encoder", "morphology",
                 "--out", str(bank), "--device", "cpu"]) == 0  # fmt: skip
    assert main(["-q", "train", "--bank", str(bank), "--cohort", str(cohort / "cohort.csv"), "--task", "aml",
                 "--model", "abmil", "--epochs", "15", "--patience", "5", "--out", str(run),
                 "--device", "cpu"]) == 0  # fmt: skip
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(cohort / "cohort.csv"), "--out", str(out),
                 "--permutations", "1000", "--boot", "200"]) == 0  # fmt: skip
    audit = json.loads((out / "audit.json").read_text())
    f = next(c for c in audit["comparisons"] if c["group"] == "sex=F" and c["metric"] == "balanced_accuracy")
    assert f["gap"] < 0 and f["flagged"], f
    assert "sex=F" in audit["summary"]["primary_flagged"]
    assert not any(g.startswith("sex=M") for g in audit["summary"]["primary_flagged"])
