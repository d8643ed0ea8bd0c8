"""The external-cohort workflow end to end, in process (issue 13 #5 and the explain --crops case):
synth cohort A and an external cohort B, extract both with the toy encoder, train on A, predict B with
its labels, audit the predictions and explain them (with and without --crops)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from milcore.cli import main

QUICK_AUDIT = ["--boot", "20", "--permutations", "20", "--min-group", "2"]


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Cohorts A (training) and B (external), their banks, a 3-fold run on A and labelled predictions on B."""
    root = tmp_path_factory.mktemp("external")
    small = ["--bag-median", "16", "--bag-min", "8", "--bag-max", "24", "--crop-size", "32", "-q"]
    for name, n, seed in (("A", 12, 0), ("B", 8, 1)):
        assert main(["synth", "--task", "all", "--patients", str(n), "--seed", str(seed), *small,
                     str(root / name)]) == 0  # fmt: skip
        assert main(["extract", "--source", "synthetic", "--input", str(root / name), "--encoder", "toy", "--out",
                     str(root / f"{name}.h5"), "--device", "cpu", "-q"]) == 0  # fmt: skip
    assert main(["train", "--bank", str(root / "A.h5"), "--cohort", str(root / "A" / "cohort.csv"), "--task", "all",
                 "--model", "abmil", "--folds", "3", "--epochs", "2", "--device", "cpu", "--out", str(root / "run"),
                 "-q"]) == 0  # fmt: skip
    assert main(["predict", "--checkpoint", str(root / "run"), "--bank", str(root / "B.h5"), "--cohort",
                 str(root / "B" / "cohort.csv"), "--task", "all", "--out", str(root / "pred"), "-q"]) == 0  # fmt: skip
    return {"root": root, "run": root / "run", "pred": root / "pred", "cohort_b": root / "B" / "cohort.csv",
            "crops_b": root / "B"}  # fmt: skip


def test_predict_records_the_external_labels(external: dict[str, Path]) -> None:
    rows = (external["pred"] / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 8 and all(r.split(",")[2] in ("control", "ALL") for r in rows), "empty label column"
    meta = json.loads((external["pred"] / "predictions.json").read_text())
    assert meta["task"] == "all" and meta["labelled"] == 8 and meta["ensemble"]["description"] == "ensemble of 3 folds"
    assert json.loads((external["pred"] / "metrics.json").read_text())["n"] == 8


def test_audit_of_a_predict_folder(external: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "audit"
    assert main(["audit", "--run", str(external["pred"]), "--cohort", str(external["cohort_b"]), "--out", str(out),
                 *QUICK_AUDIT, "-q"]) == 0  # fmt: skip
    audit = json.loads((out / "audit.json").read_text())
    assert audit["input"]["patients"] == 8 and audit["input"]["kind"] == "predict"
    assert (out / "audit.html").exists()


@pytest.mark.parametrize("crops", [False, True])
def test_explain_a_predict_folder(external: dict[str, Path], tmp_path: Path, crops: bool) -> None:
    out = tmp_path / "explain"
    extra = ["--crops", str(external["crops_b"])] if crops else []
    assert main(["explain", "--run", str(external["pred"]), "--out", str(out), *extra, "-q"]) == 0
    summary = json.loads((out / "explain.json").read_text())
    assert len(summary["patients"]) == 8 and summary["missing_crops"] == 0
    assert Path(summary["crops"]) == external["crops_b"]  # found beside the cohort when not given
    assert "data:image/png;base64" in (out / "explain.html").read_text()


def test_explain_crops_pointing_at_the_wrong_folder_is_an_error(
    external: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: grey tiles and exit 0."""
    wrong = tmp_path / "not_the_crops"
    (wrong / "somebody").mkdir(parents=True)
    out = tmp_path / "explain"
    assert main(["explain", "--run", str(external["pred"]), "--crops", str(wrong), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(wrong) in err and "no crop found" in err and ".png" in err
    assert not out.exists()
    assert main(["explain", "--run", str(external["pred"]), "--crops", str(tmp_path / "absent"), "--out",
                 str(out)]) == 2  # fmt: skip
    assert "no such folder" in capsys.readouterr().err


def test_explain_with_some_crops_missing_warns_and_marks_them(external: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    crops = tmp_path / "crops"
    shutil.copytree(external["crops_b"], crops)
    first = json.loads((external["pred"] / "predictions.json").read_text())
    assert first["bags"] == 8
    victims = sorted(p for p in crops.glob("*/*.png"))[::3]
    for p in victims:
        p.unlink()
    out = tmp_path / "explain"
    assert main(["explain", "--run", str(external["pred"]), "--crops", str(crops), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "MISSING" in err and "gallery tiles have no crop" in err
    summary = json.loads((out / "explain.json").read_text())
    assert summary["missing_crops"] > 0
    assert "MISSING crops (crossed tiles)" in (out / "explain.md").read_text()


def test_explain_refuses_a_bank_that_no_longer_matches(external: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    pred = tmp_path / "pred"
    shutil.copytree(external["pred"], pred)
    meta = json.loads((pred / "predictions.json").read_text())
    meta["bank"] = str(external["root"] / "A.h5")  # same bag ids (synthetic numbering), other cells
    (pred / "predictions.json").write_text(json.dumps(meta))
    assert main(["explain", "--run", str(pred), "--out", str(tmp_path / "x")]) == 2
    assert "do not match" in capsys.readouterr().err
