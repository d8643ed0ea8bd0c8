"""``milcore synth`` in-process: the documented form, bad input, nothing half-written."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from feature_cache.sources.synthetic import list_tasks
from milcore.cli import main

TINY = ["--bag-median", "15", "--bag-min", "10", "--bag-max", "30"]


def test_synth_writes_the_documented_layout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "cohort"
    with caplog.at_level(logging.INFO):
        code = main(["synth", "--task", "aml", "--patients", "6", "--seed", "1", "--sites", "2",
                     "--bias", "sex=F:0.5", *TINY, str(out)])  # fmt: skip
    assert code == 0
    assert {"cohort.csv", "cells.csv", "synth.json"} <= {p.name for p in out.iterdir()}
    with open(out / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["site"] for r in rows} <= {"0", "1"}
    assert all((out / r["patient_id"]).is_dir() for r in rows)
    assert str(out) in caplog.text


@pytest.mark.parametrize("task", list_tasks())
def test_synth_offers_every_registered_task(tmp_path: Path, task: str) -> None:
    out = tmp_path / "cohort"
    assert main(["synth", "--task", task, "--patients", "2", "-q", *TINY, str(out)]) == 0
    with open(out / "cohort.csv", newline="") as f:
        assert task in next(csv.reader(f)), "the label column is named after the task"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "cll"], "invalid choice: 'cll'"),
        (["--task", "aml", "--patients", "-3"], "must be >= 1, got -3"),
        (["--task", "aml", "--patients", "ten"], "expected a whole number"),
        (["--task", "aml", "--bias", "sex=Q:0.5"], "sex must be F or M"),
        (["--task", "aml", "--sites", "2", "--bias", "site=5:0.5"], "site 5 does not exist"),
        (["--task", "aml", "--witness-median", "1.5"], "must be in [0, 1]"),
        (["--task", "aml", "--bag-min", "50", "--bag-max", "20"], "bag"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "cohort"
    assert main(["synth", *argv, str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_existing_output_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["synth", "--task", "all", "--patients", "2", *TINY, str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["synth", "--task", "all", "--patients", "2", "--overwrite", "-q", *TINY, str(out)]) == 0
    assert (out / "cohort.csv").exists() and not (out / "notes.txt").exists()


def test_unwritable_output_location(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["synth", "--task", "anemia", "--patients", "2", *TINY, str(blocker / "cohort")]) == 2
    assert "a-file" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.ERROR):
        assert main(["synth", "--debug", "--task", "aml", "--patients", "2", *TINY, str(blocker / "x")]) == 2
    assert "Traceback" in caplog.text
