"""End to end on the synthetic generator: a planted female effect is flagged by the audit of a trained ABMIL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from milcore.cli import main


def _standardized_copy(src: Path, dst: Path) -> None:
    """The bank with every feature z-scored over all cells (morphology features have very different scales)."""
    from feature_cache.bank import open_reader, open_writer

    bank = open_reader(src)
    ids = list(bank.bag_ids())
    x, ptr = bank.read_packed(ids)
    x = np.asarray(x, dtype=np.float32)  # (N, D)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    with open_writer(dst, bank.info, mode="w") as w:
        for i, b in enumerate(ids):
            w.append(b, (x[ptr[i] : ptr[i + 1]] - mu) / sd)


@pytest.mark.slow
def test_planted_female_bias_is_flagged(tmp_path: Path) -> None:
    """``--bias sex=F:0.1``: women's diseased smears carry a tenth of the diagnostic cells; the audit names sex=F.

    A diagnostic-cell median of 0.3 keeps the task learnable from cheap morphology features in a few minutes
    (measured: balanced accuracy 0.96 for men, 0.67 for women).
    """
    import torch

    torch.set_num_threads(1)
    cohort, raw, bank = tmp_path / "cohort", tmp_path / "raw.h5", tmp_path / "bank.h5"
    run, out = tmp_path / "run", tmp_path / "audit"
    assert main(["-q", "synth", str(cohort), "--task", "aml", "--patients", "200", "--seed", "3", "--bias", "sex=F:0.1",
                 "--witness-median", "0.3", "--bag-median", "50", "--bag-max", "150"]) == 0  # fmt: skip
    assert main(["-q", "extract", "--source", "synthetic", "--input", str(cohort), "--encoder", "morphology",
                 "--out", str(raw), "--device", "cpu"]) == 0  # fmt: skip
    _standardized_copy(raw, bank)
    assert main(["-q", "train", "--bank", str(bank), "--cohort", str(cohort / "cohort.csv"), "--task", "aml",
                 "--model", "abmil", "--epochs", "25", "--patience", "6", "--lr", "1e-3", "--out", str(run),
                 "--device", "cpu"]) == 0  # fmt: skip
    assert main(["-q", "audit", "--run", str(run), "--cohort", str(cohort / "cohort.csv"), "--out", str(out),
                 "--permutations", "1000", "--boot", "200"]) == 0  # fmt: skip
    audit = json.loads((out / "audit.json").read_text())
    f = next(c for c in audit["comparisons"] if c["group"] == "sex=F" and c["metric"] == "balanced_accuracy")
    assert f["gap"] < -0.1, f  # the planted effect, in balanced accuracy
    primary = [c for c in audit["comparisons"] if c["group"] == "sex=F" and c["family"] == "primary"]
    assert {c["metric"] for c in primary} == {"balanced_log_odds", "balanced_accuracy"}, primary
    assert all(c["worse"] for c in primary) and any(c["flagged"] for c in primary), primary
    assert "sex=F" in audit["summary"]["primary_flagged"]
    assert not any(g.startswith("sex=M") for g in audit["summary"]["flagged_groups"])
