"""The benchmark helpers of attribute-trained encoders: a synthetic cohort as an encoder-training table, and the
attribute-head score the ``attributes`` part of ``bench_trust_cells.py`` explains."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from feature_cache.encoders.celldata import read_cells
from feature_cache.sources.synthetic import SynthConfig, write_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    write_cohort(SynthConfig(task="aml", patients=6, seed=3, bag_median=12, bag_range=(10, 14)), out)
    return out


def test_cell_table_reads_as_labelled_cells_with_every_attribute(cohort: Path, tmp_path: Path,
                                                                 load_benchmark) -> None:  # fmt: skip
    table = load_benchmark("synthetic_cell_table")
    n, cols = table.write_table(cohort, tmp_path / "t.csv", "all")
    with open(cohort / "cells.csv", newline="") as f:
        truth = list(csv.DictReader(f))
    assert n == len(truth) and "auer_rods" in cols and "nc_ratio" in cols and len(cols) == len(set(cols))
    cells = read_cells(tmp_path / "t.csv", attributes=cols)
    assert len(cells) == n and set(cells.classes) == {r["cell_type"] for r in truth}
    for a in cols:  # every value as the generator recorded it, cell by cell
        assert [cells.attribute_values[a][i] for i in cells.attributes[a]] == [r[a] for r in truth]
    n2, none = table.write_table(cohort, tmp_path / "plain.csv")
    assert n2 == n and none == []
    with pytest.raises(SystemExit, match="no attribute column spots"):
        table.write_table(cohort, tmp_path / "x.csv", "auer_rods,spots")


def test_attribute_score_is_the_log_odds_of_the_value(load_benchmark) -> None:
    bench = load_benchmark("bench_trust_cells")
    torch.manual_seed(0)
    heads = {"nc_ratio.weight": torch.randn(3, 5), "nc_ratio.bias": torch.randn(3)}
    score = bench.AttributeScore(heads, {"nc_ratio": ["high", "low", "mid"]}, "nc_ratio", "low")
    feats = torch.randn(4, 5)
    p = torch.softmax(feats @ heads["nc_ratio.weight"].T + heads["nc_ratio.bias"], 1)[:, 1]
    torch.testing.assert_close(score.value(feats, 0, 0), torch.log(p / (1 - p)))


@pytest.mark.parametrize("task", ["aml", "auer"])
def test_trust_cells_benchmark_reads_the_task_and_its_control_from_the_cohort(task: str, tmp_path: Path,
                                                                              load_benchmark) -> None:  # fmt: skip
    from types import SimpleNamespace

    from feature_cache.sources.synthetic_vocab import TASKS

    bench = load_benchmark("bench_trust_cells")
    out = tmp_path / "cohort"
    write_cohort(SynthConfig(task=task, patients=6, seed=1, bag_median=10, bag_range=(10, 12)), out)
    with open(out / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = list(TASKS[task].classes)
    table = SimpleNamespace(bag_ids=[r["patient_id"] for r in rows], classes=classes,
                            labels=[classes.index(r[task]) for r in rows])  # fmt: skip
    assert bench._task(out) == (task, TASKS[task].control)
    sick = bench._sick(out, table)
    assert sick == [r["patient_id"] for r in rows if r[task] != TASKS[task].control] and 0 < len(sick) < len(rows)
