"""``milcore run``: YAML experiments run their steps in order; bad files get one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feature_cache.errors import UserError
from milcore.cli import main
from milcore.cli.steps import load_steps, step_argv

TINY = """
name: tiny
vars: {out: OUT}
steps:
  - synth: {_: "{out}/cohort", task: all, patients: 6, seed: 0, bag_median: 12, bag_min: 10, bag_max: 20}
  - extract: {source: synthetic, input: "{out}/cohort", encoder: toy, out: "{out}/bank.h5", workers: 0}
  - train: {bank: "{out}/bank.h5", cohort: "{out}/cohort/cohort.csv", task: all, model: mean, folds: 3,
            epochs: 2, out: "{out}/run"}
"""


def test_tiny_experiment_runs_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("OUT", str(tmp_path / "runs")))
    assert main(["run", str(path), "-q"]) == 0
    metrics = json.loads((tmp_path / "runs" / "run" / "metrics.json").read_text())
    assert metrics["folds"] == 3 and "balanced_accuracy" in metrics


def test_step_argv_and_overrides(tmp_path: Path) -> None:
    assert step_argv("train", {"bank": "b.h5", "model_arg": ["a=1", "b=2"], "resume": True, "x": False}) == [
        "train", "--bank", "b.h5", "--model-arg", "a=1", "--model-arg", "b=2", "--resume"]  # fmt: skip
    path = tmp_path / "e.yaml"
    path.write_text(TINY)
    name, steps = load_steps(path, {"out": "elsewhere"})
    assert name == "tiny" and steps[0][1] == "elsewhere/cohort"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: []", "non-empty 'steps'"),
        ("steps:\n  - fly: {}", "unknown command 'fly'"),
        ("steps:\n  - synth: {_: '{nowhere}/x'}", "unknown placeholder {nowhere}"),
        ("steps: [1, 2", "not valid YAML"),
    ],
)
def test_bad_experiment_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_a_failing_step_stops_the_experiment(tmp_path: Path) -> None:
    path = tmp_path / "fail.yaml"
    path.write_text("steps:\n  - synth: {_: out, task: cll}\n  - synth: {_: out2, task: aml}\n")
    assert main(["run", str(path), "-q"]) == 2
    assert not (tmp_path / "out2").exists()


def test_shipped_experiments_parse() -> None:
    from milcore.continual.config import load_config

    root = Path(__file__).resolve().parents[2] / "experiments"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        if f.name.startswith("continual_"):  # `milcore continual --config` files, not step lists
            assert load_config(f) is not None
            with pytest.raises(UserError, match="milcore continual --config"):
                load_steps(f)
            continue
        name, steps = load_steps(f)
        assert name and steps
