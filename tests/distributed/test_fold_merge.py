"""``milcore train --fold K`` + ``milcore report merge`` equal the single-process ``milcore train``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from milcore.cli import main

FAST = ["--model", "abmil", "--epochs", "2", "--patience", "2", "--lr", "2e-3", "--batch-instances", "256",
        "--seed", "3", "--folds", "3"]  # fmt: skip


def _without_times(value: Any) -> Any:
    """``metrics.json`` without wall-clock entries (the only thing a merge may change)."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if "second" not in k and k not in {"bags_per_s"}}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _train(planted: dict, out: Path, *extra: str) -> int:
    return main(["-q", "train", "--bank", str(planted["bank"]), "--cohort", str(planted["cohort"]), "--task", "dx",
                 *FAST, "--out", str(out), *extra])  # fmt: skip


@pytest.fixture(scope="module")
def runs(planted_factory, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("foldmerge")
    planted = planted_factory(root / "data", n_bags=18)
    assert _train(planted, root / "whole") == 0
    for k in range(3):
        assert _train(planted, root / f"fold{k}", "--fold", str(k)) == 0
    return {"root": root, "planted": planted}


def test_merge_equals_single_process_run(runs: dict) -> None:
    root = runs["root"]
    folds = [str(root / f"fold{k}") for k in (2, 0, 1)]  # any order
    assert main(["-q", "report", "merge", *folds, "--out", str(root / "merged")]) == 0
    whole, merged = root / "whole", root / "merged"
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((merged / "metrics.json").read_text())
    assert _without_times(a) == _without_times(b)  # point values, bootstrap CIs, per fold, warnings
    assert "ci" in json.dumps(b)
    with open(whole / "predictions.csv") as fa, open(merged / "predictions.csv") as fb:
        assert list(csv.reader(fa)) == list(csv.reader(fb))
    assert (whole / "splits.json").read_bytes() == (merged / "splits.json").read_bytes()
    for name in ("report.html", "report.md", "attention.h5", "passport.json"):
        assert (merged / name).is_file()
    assert "fold" not in (merged / "config.yaml").read_text().split("run:")[0]


def test_one_fold_run_holds_only_its_fold(runs: dict) -> None:
    one = runs["root"] / "fold1"
    assert (one / "fold_1" / "model.safetensors").is_file() and (one / "fold_1" / "metrics.json").is_file()
    assert not (one / "fold_0").exists() and not (one / "metrics.json").exists()
    assert "fold: 1" in (one / "config.yaml").read_text()


def test_fold_out_of_range_is_one_line(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = _train(runs["planted"], tmp_path / "bad", "--fold", "3")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--fold 3: out of range" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_merge_refuses_missing_duplicate_and_foreign_folds(runs: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    root = runs["root"]
    assert main(["-q", "report", "merge", str(root / "fold0"), str(root / "fold1"), "--out", str(tmp_path / "m")]) == 2
    assert "fold(s) 2 of 3 missing" in capsys.readouterr().err
    assert main(["-q", "report", "merge", str(root / "fold0"), str(root / "fold0"), "--out", str(tmp_path / "m")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["-q", "report", "merge", str(root / "whole"), "--out", str(tmp_path / "m")]) == 2
    assert "records no fold" in capsys.readouterr().err
    other = tmp_path / "seed9"
    assert _train(runs["planted"], other, "--fold", "2", "--seed", "9") == 0
    rc = main(["-q", "report", "merge", str(root / "fold0"), str(root / "fold1"), str(other), "--out",
               str(tmp_path / "m")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "train.seed" in err
    assert not (tmp_path / "m").exists(), "nothing written when refused"
