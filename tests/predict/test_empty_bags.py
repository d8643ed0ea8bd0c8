"""A bag stored with no cell carries no evidence: training and prediction leave it out, never guess it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from feature_cache.errors import UserError
from milcore.cli import main
from milcore.data.cohort import join_bank, read_cohort


def _bank_with_empty_bags(folder: Path, empty: tuple[str, ...]) -> tuple[Path, Path]:
    from feature_cache.bank import EncoderInfo, open_writer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    info = EncoderInfo(name="toy", version="1", weights_sha256="", transform="none", dim=8)
    rows = []
    with open_writer(folder / "ext.h5", info, mode="w") as w:
        for i in range(4):
            bag = f"q{i}"
            n = 0 if bag in empty else 30
            w.append(bag, rng.normal(size=(n, 8)).astype(np.float32), cell_id=np.arange(n))
            rows.append(f"{bag},{['control', 'sick'][i % 2]}")
    (folder / "ext.csv").write_text("patient_id,dx\n" + "\n".join(rows) + "\n")
    return folder / "ext.h5", folder / "ext.csv"


def test_join_leaves_empty_bags_out_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, cohort = _bank_with_empty_bags(tmp_path, ("q1",))
    table, report = join_bank(read_cohort(cohort, "dx"), ["q0", "q1", "q2", "q3"], sizes=[30, 0, 30, 30])
    assert list(table.bag_ids) == ["q0", "q2", "q3"] and report.empty == ["q1"]
    assert "no cell in the bank" in caplog.text and "no cell in the bank" in report.summary()
    with pytest.raises(UserError, match="every labelled bag in the bank has no cell"):
        join_bank(read_cohort(cohort, "dx"), ["q0", "q1", "q2", "q3"], sizes=[0, 0, 0, 0])


def test_predict_never_guesses_a_bag_without_cells(finished_run: Path, tmp_path: Path) -> None:
    bank, cohort = _bank_with_empty_bags(tmp_path, ("q1",))
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(finished_run), "--bank", str(bank), "--out", str(out),
                 "--cohort", str(cohort), "--task", "dx", "-q"]) == 0  # fmt: skip
    lines = (out / "predictions.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["q0", "q2", "q3"], "the empty bag got a prediction"
    assert json.loads((out / "predictions.json").read_text())["not_predicted"] == {"no_cells": ["q1"]}


def test_predict_refuses_a_bank_of_empty_bags(finished_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    bank, _ = _bank_with_empty_bags(tmp_path, ("q0", "q1", "q2", "q3"))
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(finished_run), "--bank", str(bank), "--out", str(out), "-q"]) == 2
    assert "no bag has a cell" in capsys.readouterr().err
    assert not out.exists()
