"""The rare-witness suite on real BloodMNIST cells: exact witness counts, split separation, the summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from feature_cache.errors import InvalidArgumentError
from milcore.bench.rare_witness import check_rare_options, make_rare_witness_bags, rare_witness_summary
from milcore.bench.suites import BLOODMNIST_NPZ
from milcore.cli import main

ABSENT = f"BloodMNIST not found at {BLOODMNIST_NPZ} (../shared/data is absent)"
needs_bloodmnist = pytest.mark.skipif(not BLOODMNIST_NPZ.exists(), reason=ABSENT)


@needs_bloodmnist
@pytest.mark.parametrize("split", ["train", "test"])
def test_bags_hold_exactly_one_to_three_witnesses_of_their_own_split(tmp_path: Path, split: str) -> None:
    from feature_cache.sources.bloodmnist import CELL_TYPES, load_split

    folder = make_rare_witness_bags(BLOODMNIST_NPZ, tmp_path, split, 40, "erythroblast", (1, 3), seed=3)
    _, labels = load_split(BLOODMNIST_NPZ, split)
    meta = json.loads((folder / "bags.json").read_text())
    assert meta["config"]["split"] == split and len(meta["bags"]) == 40
    with open(folder / "cohort.csv", newline="") as f:
        cohort = {r["patient_id"]: r for r in csv.DictReader(f)}
    with open(folder / "cells.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    positives = 0
    for bag, idx in meta["bags"].items():
        idx = np.asarray(idx)
        assert 20 <= len(idx) <= 60 and len(set(idx.tolist())) == len(idx), "no cell twice in a bag"
        witnesses = int((labels[idx] == CELL_TYPES.index("erythroblast")).sum())
        flagged = sum(int(c["is_diagnostic"]) for c in cells if c["patient_id"] == bag)
        assert witnesses == flagged == int(cohort[bag]["n_diagnostic"])
        if cohort[bag]["left_shift"] == "positive":
            positives += 1
            assert 1 <= witnesses <= 3
        else:
            assert witnesses == 0
        assert cohort[bag]["split"] == split
    assert positives == 20


def test_bad_witness_options_are_one_line_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(InvalidArgumentError, match="--witness neutrophil: choose a cell type outside the background"):
        check_rare_options("neutrophil", (1, 3))
    with pytest.raises(InvalidArgumentError, match="--witnesses 1-25: need 1 <= LOW <= HIGH < 20"):
        check_rare_options("erythroblast", (1, 25))
    npz = tmp_path / "fake.npz"
    npz.write_bytes(b"")  # exists: the option check comes first
    rc = main(["bench", "bloodmnist-bags", "--npz", str(npz), "--witnesses", "1-3", "--witness", "lymphocyte",
               "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--witness lymphocyte" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert main(["bench", "bloodmnist-bags", "--witnesses", "3-1", "--out", str(tmp_path / "o")]) == 2
    assert "--witnesses: expected 1 <= LOW <= HIGH, got '3-1'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--witnesses", "1-3", "--encoder", "no_such_encoder"], "--encoder no_such_encoder: unknown encoder"),
        (["--witnesses", "1-3", "--weights", "w.safetensors"], "--weights w.safetensors: give the encoder"),
        (["--witnesses", "1-3", "--encoder", "compact_cnn", "--weights", "missing.safetensors"],
         "--weights missing.safetensors: no such file"),
        (["--encoder", "compact_cnn"], "--encoder/--weights: only for the rare-witness suite"),
    ],
)  # fmt: skip
def test_encoder_options_are_checked_before_anything_is_written(tmp_path: Path, capsys, extra, message) -> None:
    npz = tmp_path / "fake.npz"
    npz.write_bytes(b"")
    rc = main(["bench", "bloodmnist-bags", "--npz", str(npz), "--witness", "erythroblast", *extra,
               "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_summary_pairs_with_abmil_and_checks_the_targets() -> None:
    def run(model: str, fold: int, bag: float, inst: float | None) -> dict:
        return {"impl": "milcore", "model": model, "variant": "default", "seed": 0, "fold": fold, "status": "ok",
                "ood_auroc": bag, "ood_instance_auroc": inst}  # fmt: skip

    runs = [run("abmil", 0, 0.70, 0.95), run("abmil", 1, 0.74, 0.97), run("clam_sb", 0, 0.90, 0.93),
            run("clam_sb", 1, 0.92, 0.95), run("mean", 0, 0.6, None), run("mean", 1, 0.6, None)]  # fmt: skip
    summary = rare_witness_summary({"runs": runs})
    by = {m["model"]: m for m in summary["models"]}
    assert by["abmil"]["gap"] == pytest.approx(0.24) and "vs_abmil" not in by["abmil"]
    assert by["clam_sb"]["vs_abmil"]["difference"] == pytest.approx(0.19)
    assert by["mean"]["instance_auroc"]["mean"] is None and by["mean"]["gap"] is None
    t = summary["targets"]
    assert t["best_model"] == "clam_sb"
    assert t["bag_within_0.05_of_instance"]["met"] and t["at_least_0.05_above_abmil"]["met"]


@needs_bloodmnist
def test_tiny_suite_trains_on_train_split_and_scores_the_test_split(tmp_path: Path, capsys) -> None:
    rc = main(["bench", "bloodmnist-bags", "--witnesses", "1-3", "--size", "tiny", "--models", "abmil,mean",
               "--peers", "none", "--folds", "3", "--seeds", "0", "--epochs", "2", "--workers", "1", "--threads", "1",
               "--device", "cpu", "--out", str(tmp_path / "rw")])  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "rw" / "bench.json").read_text())
    assert result["spec"]["ood_site"] == "test" and result["spec"]["site_column"] == "split"
    assert result["ood_bags"] == 16 and result["bags"] == 30
    assert all(b.startswith("rw-test-") for b in result["ood_bag_ids"])
    for split in result["splits"]["0"]:
        assert not any(b.startswith("rw-test-") for part in ("train", "val", "test") for b in split[part])
    models = {m["model"]: m for m in result["rare_witness"]["models"]}
    assert set(models) == {"abmil", "mean"} and models["abmil"]["bag_auroc"]["mean"] is not None
    assert models["abmil"]["instance_auroc"]["ci95"] is not None
    assert "Rare witnesses: test-split bags" in capsys.readouterr().out
    assert result["case"]["encoder"] == "toy" and result["case"]["weights"] is None  # the size's encoder
