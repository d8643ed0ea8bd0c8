"""cross_validate in memory, cross_validate(out=...) and 'milcore train' are one recipe with one result."""

from __future__ import annotations

from pathlib import Path

import pytest

from feature_cache.errors import InvalidArgumentError, UserError
from milcore.crossval import CVResult, cross_validate, train_run
from milcore.data.store import FeatureStore, open_bags
from milcore.training.config import RunSpec, TrainConfig

CONFIG = TrainConfig(model="mean", epochs=3, patience=3, min_epochs=1, lr=2e-3, batch_instances=512, device="cpu",
                     num_workers=0)  # fmt: skip


def _rows(cv: CVResult) -> list[tuple]:
    return [(r["fold"], r["best_epoch"], round(r["temperature"], 9), round(r["balanced_accuracy"], 12),
             round(r["auroc"], 12)) for r in cv.metrics["per_fold"]]  # fmt: skip


def test_in_memory_and_cli_paths_agree(planted: dict, tmp_path: Path) -> None:
    data = open_bags(planted["bank"], planted["cohort"], "dx")
    memory = cross_validate(CONFIG, data, folds=3, seed=0, n_boot=50)
    assert memory.out is None and len(memory.folds) == 3 and memory.task == "dx"
    assert sorted(memory.predictions.bag_ids) == sorted(data.bag_ids), "every bag predicted once, out of fold"
    assert list(tmp_path.iterdir()) == []
    cli = train_run(RunSpec(str(planted["bank"]), str(planted["cohort"]), "dx", folds=3, n_boot=50), CONFIG,
                    tmp_path / "cli")  # fmt: skip
    assert _rows(memory) == _rows(cli)
    assert memory.metrics["pooled"]["metrics"] == cli.metrics["pooled"]["metrics"]
    assert "mean on dx, 3-fold CV: balanced accuracy" in memory.summary()


@pytest.mark.slow
def test_cross_validate_writes_the_run_folder_milcore_train_writes(planted: dict, tmp_path: Path) -> None:
    data = open_bags(planted["bank"], planted["cohort"], "dx")
    py = cross_validate(CONFIG, data, folds=3, seed=0, n_boot=50, out=tmp_path / "py")
    cli = train_run(RunSpec(str(planted["bank"]), str(planted["cohort"]), "dx", folds=3, n_boot=50), CONFIG,
                    tmp_path / "cli")  # fmt: skip
    assert _rows(py) == _rows(cli) and py.out == tmp_path / "py"
    names = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert sorted(p.name for p in (tmp_path / "py").iterdir()) == names and "metrics.json" in names


def test_a_run_folder_needs_a_registered_model_and_a_cohort(planted: dict, tmp_path: Path) -> None:
    data = open_bags(planted["bank"], planted["cohort"], "dx")
    with pytest.raises(InvalidArgumentError, match="a run folder stores registered aggregators"):
        cross_validate(CONFIG, data, folds=3, model=lambda d, c: None, out=tmp_path / "x")
    bare = FeatureStore(data.bank, data.bag_ids, labels=data.labels, classes=data.classes)
    with pytest.raises(UserError, match="a run folder records the bags' cohort table"):
        cross_validate(CONFIG, bare, folds=3, out=tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
