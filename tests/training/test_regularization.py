"""Input standardisation stored in the model, instance dropout, and the streamed feature moments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from feature_cache.bank import open_reader
from feature_cache.errors import InvalidArgumentError
from milcore.crossval import train_run
from milcore.data.store import FeatureStore
from milcore.models import create_aggregator, list_aggregators
from milcore.models.input_norm import attach_input_norm, has_input_norm, normalize_input
from milcore.training.checkpoint import load_checkpoint, save_checkpoint
from milcore.training.config import RunSpec, TrainConfig


def test_moments_match_numpy_in_memory_and_streaming(planted: dict) -> None:
    bank = open_reader(planted["bank"])
    ids = bank.bag_ids()[:7]
    x, _ = bank.read_packed(ids)
    for budget in (1 << 30, 0):  # in memory, then streamed from the bank
        store = FeatureStore(bank, ids, memory_budget_bytes=budget)
        mean, std = store.moments(budget=50)  # several batches
        np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(std, x.astype(np.float64).std(0), rtol=1e-4, atol=1e-5)


def test_instance_dropout_keeps_the_fraction_and_at_least_one_cell(planted: dict) -> None:
    bank = open_reader(planted["bank"])
    store = FeatureStore(bank, bank.bag_ids())
    sizes = store.sizes
    rng = np.random.default_rng(0)
    batch = store.gather(np.arange(len(store)), 0, rng, keep=0.3)
    kept = np.diff(batch.ptr.numpy())
    np.testing.assert_array_equal(kept, np.maximum(1, np.round(sizes * 0.3)).astype(int))
    batch = store.gather(np.arange(3), 10, np.random.default_rng(0), keep=0.5)  # the cap applies after keep
    np.testing.assert_array_equal(np.diff(batch.ptr.numpy()), np.minimum(10, np.round(sizes[:3] * 0.5)))
    full = store.gather(np.arange(3), 0, None, keep=0.5)  # no generator: evaluation sees every cell
    np.testing.assert_array_equal(np.diff(full.ptr.numpy()), sizes[:3])
    rows = [len(b.x) for b in store.batches(np.arange(len(store)), 64, seed=1, keep=0.25)]
    assert sum(rows) == int(np.maximum(1, np.round(sizes * 0.25)).sum()) and max(rows) <= 64


@pytest.mark.parametrize("name", list_aggregators())
def test_attached_norm_equals_standardised_inputs(name: str) -> None:
    torch.manual_seed(0)
    model = create_aggregator(name, in_dim=6, num_classes=3).eval()
    x, ptr = torch.randn(15, 6) * 4 + 2, torch.tensor([0, 9, 15])
    coords = torch.rand(15, 2) * 100
    mean, std = x.mean(0), x.std(0)
    expected = model(((x - mean) / std), ptr, coords).logits
    assert not has_input_norm(model)
    attach_input_norm(model, mean, std)
    assert has_input_norm(model)
    torch.testing.assert_close(model(x, ptr, coords).logits, expected)
    torch.testing.assert_close(normalize_input(model, x), (x - mean) / std)


def test_norm_statistics_travel_with_the_checkpoint(tmp_path: Path) -> None:
    model = create_aggregator("abmil", in_dim=4, num_classes=2).eval()
    attach_input_norm(model, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 0.0, 1.0, 0.5]))
    assert model.input_std[1] == pytest.approx(1e-6)  # a constant feature is centred, never divided by 0
    x, ptr = torch.randn(10, 4), torch.tensor([0, 10])
    save_checkpoint(tmp_path, model, classes=["a", "b"], encoder=None)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["input_norm"] is True
    loaded, _ = load_checkpoint(tmp_path)
    torch.testing.assert_close(loaded(x, ptr).logits, model(x, ptr).logits)
    plain = create_aggregator("abmil", in_dim=4, num_classes=2)
    save_checkpoint(tmp_path / "plain", plain, classes=["a", "b"], encoder=None)
    again, card = load_checkpoint(tmp_path / "plain")
    assert card["input_norm"] is False and not has_input_norm(again)


def test_training_with_norm_and_dropout_learns_and_predicts(planted: dict, tmp_path: Path) -> None:
    # scale the planted features far from unit variance: standardisation must undo it
    spec = RunSpec(str(planted["bank"]), str(planted["cohort"]), "dx", folds=3, n_boot=50)
    cfg = TrainConfig(model="abmil", epochs=10, patience=10, lr=2e-3, batch_instances=256, input_norm="standardize",
                      instance_dropout=0.3)  # fmt: skip
    metrics = train_run(spec, cfg, tmp_path / "run").metrics
    assert metrics["balanced_accuracy"] >= 0.8 and metrics["instance"]["instance_auroc"] >= 0.85
    model, card = load_checkpoint(tmp_path / "run" / "fold_0")
    assert card["input_norm"] and has_input_norm(model)
    bank = open_reader(planted["bank"])
    x, _ = bank.read_packed(card["split"]["train"])
    np.testing.assert_allclose(model.input_mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field, value", [("instance_dropout", 1.0), ("instance_dropout", -0.1),
                                          ("input_norm", "zscore")])  # fmt: skip
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        TrainConfig(**{field: value})


def test_cli_flags_override_the_config_file_and_leave_its_other_values(planted: dict, tmp_path: Path) -> None:
    import yaml

    from milcore.cli import main

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": {"epochs": 5, "lr": 1e-3, "instance_dropout": 0.5,
                                                "input_norm": "standardize"}}))  # fmt: skip
    code = main(["-q", "train", "--bank", str(planted["bank"]), "--cohort", str(planted["cohort"]), "--task", "dx",
                 "--folds", "3", "--config", str(config), "--epochs", "2", "--weight-decay", "0.01",
                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 0
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert resolved["epochs"] == 2 and resolved["weight_decay"] == 0.01  # flags win
    assert resolved["lr"] == 1e-3 and resolved["instance_dropout"] == 0.5 and resolved["input_norm"] == "standardize"
    assert resolved["model"] == "abmil"
