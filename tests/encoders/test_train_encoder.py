"""Encoder training on tiny drawn cells: supervised and SimCLR learn, weights round-trip into extraction,
a killed run resumes to the same weights, another recipe is refused, bad input is one line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from feature_cache.encoders.augment import AugmentConfig
from feature_cache.encoders.train_ssl import SSLConfig, train_ssl
from feature_cache.encoders.train_supervised import SupervisedConfig, train_supervised
from feature_cache.errors import UserError
from milcore.cli import main
from tests.encoders.cellsets import write_class_tree, write_csv

TINY = {"image_size": 16, "width": 4, "batch_size": 8, "device": "cpu", "threads": 1}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_class_tree(tmp_path_factory.mktemp("tree"), n_per_class=16, size=20)


@pytest.fixture(scope="module")
def trained(tree: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sup") / "run"
    config = SupervisedConfig(data=str(tree), out=str(out), epochs=4, patience=0, lr=5e-3, **TINY)
    return config, train_supervised(config)


def test_supervised_loss_decreases_and_card_is_complete(trained) -> None:
    _config, result = trained
    card = json.loads(Path(result.weights).with_suffix(".json").read_text())
    losses = [h["train_loss"] for h in card["history"]]
    assert losses[-1] < losses[0]
    assert card["classes"] == ["large_nucleus", "small_nucleus"]
    assert card["recipe"]["data_fingerprint"] == card["data"]["fingerprint"]
    assert card["recipe"]["backbone"] == "compact_cnn" and card["recipe"]["epochs"] == 4
    assert {"val_balanced_accuracy", "val_macro_f1", "best_epoch"} <= set(card["metrics"])
    assert card["training"]["seconds"] > 0 and "load_average" in card["training"]
    assert card["data"]["train"] + card["data"]["val"] == 32


def test_weights_round_trip_into_the_registered_encoder(trained, tree: Path) -> None:
    from feature_cache.encoders import create_encoder
    from feature_cache.encoders.backbones import build_backbone
    from feature_cache.encoders.celldata import read_cells
    from feature_cache.encoders.train_supervised import to_tensor
    from feature_cache.encoders.weights import load_state_dict_file, sha256_file

    _config, result = trained
    enc = create_encoder("compact_cnn", weights=result.weights, device="cpu")
    assert enc.input_size == 16 and enc.dim == 32  # recorded in the weights header: no option needed
    assert enc.info.weights_sha256 == sha256_file(result.weights) == result.card["weights_sha256"]
    backbone = build_backbone("compact_cnn", 16, 4)
    backbone.net.load_state_dict(load_state_dict_file(result.weights))
    model = torch.nn.Sequential(backbone.norm, backbone.net).eval()
    cells = read_cells(tree)
    with torch.no_grad():
        expected = model(to_tensor(cells, 16).float()).numpy()
    got = enc.encode(cells.images)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_rerun_of_a_finished_run_is_a_no_op(trained) -> None:
    config, result = trained
    again = train_supervised(config)
    assert again.card["weights_sha256"] == result.card["weights_sha256"]


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_killed_run_resumes_to_the_same_weights(tree: Path, tmp_path: Path, monkeypatch, ema: float) -> None:
    """Also with weight averaging (its average, the one kept, is part of the saved state)."""
    from feature_cache.encoders import loop
    from feature_cache.encoders.weights import load_state_dict_file

    def config(out: Path) -> SupervisedConfig:
        return SupervisedConfig(data=str(tree), out=str(out), epochs=3, patience=0, ema=ema, **TINY)

    straight = train_supervised(config(tmp_path / "straight"))
    saves = {"n": 0}
    real = loop.RunFolder.save_state

    def dying(self, state):
        real(self, state)
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt  # killed after epoch 2 was saved

    monkeypatch.setattr(loop.RunFolder, "save_state", dying)
    with pytest.raises(KeyboardInterrupt):
        train_supervised(config(tmp_path / "killed"))
    monkeypatch.setattr(loop.RunFolder, "save_state", real)
    assert not (tmp_path / "killed" / "encoder.safetensors").exists()
    resumed = train_supervised(config(tmp_path / "killed"))
    assert [h["epoch"] for h in resumed.card["history"]] == [1, 2, 3]
    a, b = load_state_dict_file(straight.weights), load_state_dict_file(resumed.weights)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_weight_average_is_what_is_validated_and_written(tree: Path, tmp_path: Path) -> None:
    from feature_cache.encoders.weights import load_state_dict_file

    runs = {ema: train_supervised(SupervisedConfig(data=str(tree), out=str(tmp_path / f"e{ema}"), epochs=3,
                                                   patience=0, ema=ema, **TINY))
            for ema in (0.0, 0.5)}  # fmt: skip
    plain, averaged = (load_state_dict_file(runs[e].weights) for e in (0.0, 0.5))
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain)  # same seed, same steps: only the average
    assert runs[0.5].card["recipe"]["ema"] == 0.5
    assert runs[0.0].card["history"][-1]["train_loss"] == pytest.approx(runs[0.5].card["history"][-1]["train_loss"])


def test_resume_with_another_recipe_is_refused_naming_the_keys(trained, capsys) -> None:
    config, _result = trained
    rc = main(["encoder", "train", "--data", config.data, "--out", config.out, "--image-size", "16", "--width",
               "4", "--batch-size", "8", "--epochs", "4", "--patience", "0", "--lr", "0.001", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "recipe.json" in err[0] and "resuming with another recipe" in err[0] and "lr" in err[0]


def test_ssl_loss_decreases_and_weights_extract(tree: Path, tmp_path: Path) -> None:
    from feature_cache.encoders import create_encoder

    # 3 steps an epoch: no warm-up (a quarter of this tiny run at a low rate leaves the loss noise-level)
    config = SSLConfig(data=str(tree), out=str(tmp_path / "ssl"), epochs=4, lr=5e-3, patience=0, warmup_epochs=0,
                       augment=AugmentConfig.ssl(), **TINY)  # fmt: skip
    result = train_ssl(config)
    losses = [h["train_loss"] for h in result.card["history"]]
    assert losses[-1] < losses[0]
    assert result.card["method"] == "simclr" and result.card["data"]["labels_used"] is False
    enc = create_encoder("compact_cnn", weights=result.weights, device="cpu")
    assert enc.encode(np.zeros((2, 20, 20, 3), np.uint8)).shape == (2, 32)


def test_nt_xent_is_the_simclr_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The NT-Xent loss equals the SimCLR formula written out here, whatever the views' order, without
    pytorch-metric-learning (whose NTXentLoss needs O(batch^3) memory: 2.5 GB at a batch of 256)."""
    import sys

    from feature_cache.encoders.train_ssl import nt_xent_loss

    monkeypatch.setitem(sys.modules, "pytorch_metric_learning", None)  # not needed
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning.losses", None)
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(12, 5), dim=1)
    labels = torch.arange(6).repeat(2)
    sim = z @ z.T / 0.2
    sim.fill_diagonal_(-float("inf"))
    pos = torch.cat([torch.arange(6, 12), torch.arange(6)])
    manual = torch.nn.functional.cross_entropy(sim, pos)
    torch.testing.assert_close(nt_xent_loss(0.2)(z, labels), manual, rtol=1e-5, atol=1e-5)
    perm = torch.randperm(12)
    torch.testing.assert_close(nt_xent_loss(0.2)(z[perm], labels[perm]), manual, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly twice"):
        nt_xent_loss(0.2)(z, torch.arange(12))


def test_nt_xent_matches_pytorch_metric_learning() -> None:
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    from feature_cache.encoders.train_ssl import nt_xent_loss

    torch.manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(16, 7), dim=1)
    labels = torch.arange(8).repeat(2)
    want = losses.NTXentLoss(temperature=0.3)(z, labels)
    torch.testing.assert_close(nt_xent_loss(0.3)(z, labels), want, rtol=1e-5, atol=1e-5)


def test_cli_train_from_csv_and_channels_last_path(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "csv", n_per_class=8)
    config = SupervisedConfig(data=str(csv_path), out=str(tmp_path / "cl"), epochs=1, channels_last=True,
                              balance="loss", **TINY)  # fmt: skip
    result = train_supervised(config)
    assert result.card["classes"] == ["a", "b"] and result.weights.exists()
    rc = main(["encoder", "train", "--data", str(csv_path), "--out", str(tmp_path / "cli"), "--image-size", "16",
               "--width", "4", "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--augment", "hed_sigma=0.1",
               "-q"])  # fmt: skip
    assert rc == 0
    recipe = json.loads((tmp_path / "cli" / "recipe.json").read_text())
    assert recipe["augment"]["hed_sigma"] == 0.1 and recipe["mode"] == "supervised"


def test_precision_on_cuda_is_amp_and_channels_last(monkeypatch) -> None:
    from feature_cache.encoders.loop import precision_for

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = precision_for(torch.device("cuda"))
    assert p.autocast is torch.bfloat16 and not p.scaler and p.channels_last
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    p = precision_for(torch.device("cuda"))
    assert p.autocast is torch.float16 and p.scaler
    assert precision_for(torch.device("cuda"), amp=False).autocast is None


def test_precision_on_cpu_is_bf16_only_where_native(monkeypatch) -> None:
    """bf16 autocast + channels-last made a compact_cnn training step 2.5x faster on an AVX512-BF16 CPU;
    without native bf16 it is emulated (slower), so float32 stays."""
    from feature_cache.encoders import loop

    monkeypatch.setattr(loop, "native_bf16", lambda device_type: False)
    cpu = loop.precision_for(torch.device("cpu"))
    assert cpu.autocast is None and not cpu.channels_last and not cpu.scaler
    monkeypatch.setattr(loop, "native_bf16", lambda device_type: device_type == "cpu")
    cpu = loop.precision_for(torch.device("cpu"))
    assert cpu.autocast is torch.bfloat16 and cpu.channels_last and not cpu.scaler
    assert loop.precision_for(torch.device("cpu"), amp=False).autocast is None
    assert not loop.precision_for(torch.device("cpu"), channels_last=False).channels_last


def test_weights_of_another_architecture_are_refused(trained, tree: Path, tmp_path: Path, capsys) -> None:
    _config, result = trained
    rc = main(["extract", "--source", "crops", "--input", str(tree), "--encoder", "efficientnet_lite0",
               "--weights", str(result.weights), "--out", str(tmp_path / "b.h5")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(result.weights) in err[0] and "another architecture" in err[0]
    assert not (tmp_path / "b.h5").exists()
    with pytest.raises(UserError, match="do not fit architecture compact_cnn"):
        from feature_cache.encoders import create_encoder

        create_encoder("compact_cnn", weights=result.weights, width=8)
