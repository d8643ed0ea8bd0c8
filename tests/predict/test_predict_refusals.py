"""``milcore predict`` refuses what it cannot trust, before writing anything (issue 13 #4, #5, #7 and the task case)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from milcore.cli import main
from milcore.data.predictions import read_predictions


def _predict(*args: str) -> int:
    return main(["predict", *args])


def _nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created by a failed predict"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temporary files left"


def _cohort_with(tmp_path: Path, planted: dict, rename: dict[str, str] | None = None,
                 relabel: dict[str, str] | None = None) -> Path:  # fmt: skip
    """A copy of the planted cohort with columns renamed and/or labels of 'dx' replaced."""
    with open(planted["cohort"], newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if relabel:
            r["dx"] = relabel.get(r["dx"], r["dx"])
        for old, new in (rename or {}).items():
            r[new] = r.pop(old)
    path = tmp_path / "cohort_copy.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_interrupted_run_is_refused_unless_allow_partial(run_copy: Path, planted: dict, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Issue 13 #4: before, predict silently used the 2 finished folds of a 3-fold run."""
    shutil.rmtree(run_copy / "fold_2")
    (run_copy / "metrics.json").unlink()
    out = tmp_path / "pred"
    assert _predict("--checkpoint", str(run_copy), "--bank", str(planted["bank"]), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "incomplete training run" in err and "2 of 3 fold checkpoints" in err and "--allow-partial" in err
    _nothing_written(out)
    with caplog.at_level(logging.INFO):
        assert _predict("--checkpoint", str(run_copy), "--bank", str(planted["bank"]), "--out", str(out),
                        "--allow-partial", "--cohort", str(planted["cohort"]), "--task", "dx") == 0  # fmt: skip
    assert "ensemble of 2 of 3 folds" in caplog.text
    meta = json.loads((out / "predictions.json").read_text())
    assert meta["ensemble"]["partial"] is True and meta["ensemble"]["description"].startswith("ensemble of 2 of 3")
    assert meta["ensemble"]["runs"][0]["folds_used"] == [0, 1] and meta["ensemble"]["runs"][0]["folds_expected"] == 3
    assert json.loads((out / "metrics.json").read_text())["ensemble"].startswith("ensemble of 2 of 3 folds")
    audit = tmp_path / "audit"
    assert main(["audit", "--run", str(out), "--cohort", str(planted["cohort"]), "--out", str(audit), "-q",
                 "--boot", "20", "--permutations", "20"]) == 0  # fmt: skip
    assert "ensemble of 2 of 3 folds" in (audit / "audit.md").read_text()
    assert json.loads((audit / "audit.json").read_text())["input"]["partial"] is True
    assert main(["explain", "--run", str(out), "--out", str(tmp_path / "explain"), "-q"]) == 0
    assert "PARTIAL: these predictions come from an ensemble of 2 of 3 folds" in (
        tmp_path / "explain" / "explain.md").read_text()  # fmt: skip


def test_run_without_final_metrics_is_incomplete(run_copy: Path, planted: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (run_copy / "metrics.json").unlink()  # every fold finished, the run did not
    out = tmp_path / "pred"
    assert _predict("--checkpoint", str(run_copy), "--bank", str(planted["bank"]), "--out", str(out)) == 2
    assert "no final metrics.json" in capsys.readouterr().err
    _nothing_written(out)


def test_complete_run_and_explicit_fold_are_accepted(finished_run: Path, planted: dict, tmp_path: Path) -> None:
    assert _predict("--checkpoint", str(finished_run), "--bank", str(planted["bank"]), "--out",
                    str(tmp_path / "a"), "-q") == 0  # fmt: skip
    meta = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert meta["ensemble"]["partial"] is False and meta["ensemble"]["description"] == "ensemble of 3 folds"
    assert _predict("--checkpoint", str(finished_run / "fold_1"), "--bank", str(planted["bank"]), "--out",
                    str(tmp_path / "b"), "-q") == 0  # fmt: skip
    assert len(json.loads((tmp_path / "b" / "predictions.json").read_text())["checkpoints"]) == 1


def test_labels_are_written_from_the_cohort(finished_run: Path, planted: dict, tmp_path: Path) -> None:
    """Issue 13 #5: predict --cohort --task wrote an empty label column."""
    out = tmp_path / "pred"
    assert _predict("--checkpoint", str(finished_run), "--bank", str(planted["bank"]), "--out", str(out),
                    "--cohort", str(planted["cohort"]), "--task", "dx", "-q") == 0  # fmt: skip
    table = read_predictions(out)
    with open(planted["cohort"], newline="") as f:
        truth = {r["patient_id"]: r["dx"] for r in csv.DictReader(f)}
    assert [table.classes[i] for i in table.labels] == [truth[b] for b in table.bag_ids]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == len(truth) and "instance" in metrics


def test_task_of_another_column_is_refused(finished_run: Path, planted: dict, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Same classes, other column: the checkpoint's task ('dx') must be named."""
    cohort = _cohort_with(tmp_path, planted, rename={"dx": "relapse"})
    out = tmp_path / "pred"
    args = ["--checkpoint", str(finished_run), "--bank", str(planted["bank"]), "--out", str(out), "--cohort",
            str(cohort), "--task", "relapse"]  # fmt: skip
    assert _predict(*args) == 2
    err = capsys.readouterr().err
    assert "'relapse'" in err and "'dx'" in err and "control, sick" in err
    _nothing_written(out)
    assert _predict(*args, "--allow-task-rename", "-q") == 0
    assert (read_predictions(out).labels >= 0).all()


def test_labels_outside_the_classes_are_refused_before_writing(finished_run: Path, planted: dict, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Issue 13 #7: before, predict exited 2 AFTER writing predictions.csv and attention.h5."""
    cohort = _cohort_with(tmp_path, planted, relabel={"sick": "AML"})
    out = tmp_path / "pred"
    assert _predict("--checkpoint", str(finished_run), "--bank", str(planted["bank"]), "--out", str(out),
                    "--cohort", str(cohort), "--task", "dx") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "AML" in err and "control, sick" in err and str(cohort) in err
    _nothing_written(out)


@pytest.mark.parametrize("task", ["sex", "nope"])
def test_wrong_task_column_leaves_nothing(finished_run: Path, planted: dict, tmp_path: Path, task: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "pred"
    assert _predict("--checkpoint", str(finished_run), "--bank", str(planted["bank"]), "--out", str(out),
                    "--cohort", str(planted["cohort"]), "--task", task, "--allow-task-rename") == 2  # fmt: skip
    assert task in capsys.readouterr().err
    _nothing_written(out)


def test_no_task_given_logs_and_records_the_checkpoint_task(finished_run: Path, planted: dict, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "pred"
    with caplog.at_level(logging.INFO):
        assert _predict("--checkpoint", str(finished_run), "--bank", str(planted["bank"]), "--out", str(out)) == 0
    assert "checkpoint task 'dx', classes control, sick" in caplog.text
    meta = json.loads((out / "predictions.json").read_text())
    assert meta["task"] == "dx" and meta["classes"] == ["control", "sick"] and meta["label_column"] is None


def test_other_encoder_leaves_nothing(finished_run: Path, planted_factory, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    other = planted_factory(tmp_path / "other", encoder="another")
    out = tmp_path / "pred"
    assert _predict("--checkpoint", str(finished_run), "--bank", str(other["bank"]), "--out", str(out)) == 2
    assert "encoder mismatch" in capsys.readouterr().err
    _nothing_written(out)


def test_existing_out_is_refused_and_kept(finished_run: Path, planted: dict, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "pred"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["--checkpoint", str(finished_run), "--bank", str(planted["bank"]), "--out", str(out)]
    assert _predict(*args) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "precious.txt").read_text() == "keep me"
    assert _predict(*args, "--overwrite", "-q") == 0
    assert not (out / "precious.txt").exists() and (out / "predictions.csv").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _predict("--checkpoint", str(finished_run), "--bank", str(planted["bank"]), "--out", str(empty), "-q") == 0


def test_nan_predictions_on_disk_are_refused_by_readers(finished_run: Path, planted: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A prediction folder written by an older milcore from a corrupted checkpoint must not be audited."""
    out = tmp_path / "pred"
    assert _predict("--checkpoint", str(finished_run), "--bank", str(planted["bank"]), "--out", str(out),
                    "--cohort", str(planted["cohort"]), "--task", "dx", "-q") == 0  # fmt: skip
    lines = (out / "predictions.csv").read_text().splitlines()
    cells = lines[1].split(",")
    last_prob = max(i for i, name in enumerate(lines[0].split(",")) if name.startswith("prob_"))
    cells[last_prob] = "nan"  # a probability column (uncertainty and referral columns follow them)
    (out / "predictions.csv").write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    assert main(["audit", "--run", str(out), "--cohort", str(planted["cohort"]), "--out", str(tmp_path / "a")]) == 2
    assert "non-finite probabilities" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_ensemble_probabilities_are_the_mean_of_the_folds(finished_run: Path, planted: dict, tmp_path: Path) -> None:
    tables = []
    for k in range(3):
        assert _predict("--checkpoint", str(finished_run / f"fold_{k}"), "--bank", str(planted["bank"]), "--out",
                        str(tmp_path / f"f{k}"), "-q") == 0  # fmt: skip
        tables.append(read_predictions(tmp_path / f"f{k}").proba)
    assert _predict("--checkpoint", str(finished_run), "--bank", str(planted["bank"]), "--out", str(tmp_path / "e"),
                    "-q") == 0  # fmt: skip
    assert np.allclose(read_predictions(tmp_path / "e").proba, np.mean(tables, axis=0), atol=2e-6)
