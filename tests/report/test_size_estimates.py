"""Issue 13 items 15-16 for ``bench`` and ``continual``: the size is announced first; bench reports chance."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from milcore.training.config import TrainConfig

FAST = TrainConfig(epochs=3, patience=3, min_epochs=1, lr=5e-3, batch_instances=256, device="cpu", num_workers=0)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_bench_announces_its_size_and_warns_at_chance(report_bank_factory, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    from milcore.bench.aggregators import BenchSpec, run_benchmark
    from milcore.bench.report import write_outputs

    bank = report_bank_factory(tmp_path / "bank", n_bags=30, classes=("a", "b", "c"), signal=False, seed=5)
    spec = BenchSpec(str(bank["bank"]), str(bank["cohort"]), "dx", models=("mean",), peers=(), folds=3,
                     seeds=(0,), train=FAST)  # fmt: skip
    with caplog.at_level(logging.INFO):
        result = run_benchmark(spec)
    messages = _messages(caplog)
    first = next(i for i, m in enumerate(messages) if "1 model x 3 folds x 1 seed = 3 trainings" in m)
    assert "30 bags" in messages[first] and "3 epochs" in messages[first]
    assert any("first training took" in m for m in messages[first:])
    codes = {w["code"] for w in result["warnings"]}
    assert "chance" in codes and all(w.get("model") == "mean" for w in result["warnings"] if w["code"] == "chance")
    paths = write_outputs(result, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["warnings"] == json.loads(json.dumps(result["warnings"]))
    md = paths["markdown"].read_text()
    assert md.find("not distinguishable from chance") < md.find("Accuracy and cost") and "Terms" in md


def test_bench_of_a_learnable_bank_has_no_chance_warning(report_bank_factory, tmp_path: Path) -> None:
    from milcore.bench.aggregators import BenchSpec, run_benchmark

    bank = report_bank_factory(tmp_path / "bank", n_bags=30, signal=True, seed=6)
    spec = BenchSpec(str(bank["bank"]), str(bank["cohort"]), "dx", models=("abmil",), peers=(), folds=3,
                     seeds=(0,), train=TrainConfig(epochs=10, patience=10, min_epochs=1, lr=5e-3,
                                                   batch_instances=256, device="cpu", num_workers=0))  # fmt: skip
    result = run_benchmark(spec)
    assert result["summary"][0]["metrics"]["balanced_accuracy"]["mean"] >= 0.7
    assert not {"chance", "below_chance"} & {w["code"] for w in result["warnings"]}


def test_continual_announces_its_size(tmp_path: Path, report_bank_factory, caplog: pytest.LogCaptureFixture) -> None:
    from milcore.cli import main

    bank = report_bank_factory(tmp_path / "bank", n_bags=32, classes=("c0", "c1", "c2", "c3"), seed=7)
    config = {
        "name": "size", "data": {"bank": str(bank["bank"]), "cohort": str(bank["cohort"]), "label": "dx"},
        "scenario": {"kind": "class_incremental", "tasks": [["c0", "c1"], ["c2", "c3"]], "test_fraction": 0.3},
        "model": {"name": "mean", "args": {}}, "train": {"epochs": 2, "lr": 0.005, "batch_instances": 256,
                                                         "device": "cpu"},
        "memory": {"budget": 60, "per_bag": 5}, "strategies": {"finetune": {}, "replay_random": {}}, "seeds": [0, 1],
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with caplog.at_level(logging.INFO):
        assert main(["continual", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    messages = _messages(caplog)
    first = next(i for i, m in enumerate(messages) if "2 strategies x 2 seeds x 2 tasks = 8 task trainings" in m)
    assert "2 epochs" in messages[first] and "bags" in messages[first]
    assert any("first task training took" in m for m in messages[first:])
