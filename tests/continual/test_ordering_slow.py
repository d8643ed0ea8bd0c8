"""Slow: the targets' ordering on a planted 4-task class-incremental stream, averaged over 3 seeds.

Eight classes, each marked by ~5% witness cells of its own kind in bags of ~100 cells, arrive two per
task; the memory is tight (about 4 cells per stored bag), so which cells a pseudo-bag keeps matters.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from milcore.cli import main


@pytest.mark.slow
def test_milreplay_ordering(stream_bank_factory, tmp_path):
    torch.set_num_threads(1)
    bank = stream_bank_factory(tmp_path / "bank", classes=8, per_class=20, sites=1, dim=12, size=(80, 120),
                               rate=0.05, seed=5)  # fmt: skip
    tasks = [[f"c{2 * t}", f"c{2 * t + 1}"] for t in range(4)]
    config = {
        "name": "ordering",
        "data": {"bank": str(bank["bank"]), "cohort": str(bank["cohort"]), "label": "dx"},
        "scenario": {"kind": "class_incremental", "tasks": tasks, "test_fraction": 0.3},
        "model": {"name": "abmil", "args": {"embed_dim": 32, "attention_dim": 16}},
        "train": {"epochs": 25, "lr": 0.003, "batch_instances": 800, "device": "cpu"},
        "memory": {"budget": 480, "per_bag": 4},
        "strategies": {"finetune": {}, "joint": {}, "replay_random": {}, "milreplay": {}},
        "seeds": [0, 1, 2],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["-q", "continual", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    s = json.loads((tmp_path / "run" / "continual.json").read_text())
    acc = {n: s[n]["average_accuracy"] for n in s}
    assert acc["milreplay"] >= acc["finetune"] + 0.15, acc
    assert acc["milreplay"] >= acc["joint"] - 0.10, acc
    assert acc["milreplay"] > acc["replay_random"], acc
    assert s["milreplay"]["average_forgetting"] < s["finetune"]["average_forgetting"], s
