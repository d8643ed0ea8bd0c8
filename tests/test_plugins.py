"""Registered names reach every command, and adding an aggregator, an encoder or a strategy is one file.

Each plug-in test writes a throwaway module into a temporary folder on ``sys.path`` and names it in
``$MILCORE_PLUGINS`` (the plug-in route of :mod:`feature_cache.registry`); nothing else is edited.
The module is then listed, used and checked by the same commands and contract checks as the
built-ins. Every test leaves the registries as it found them.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from feature_cache.registry import PLUGIN_ENV
from milcore.cli import main


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """``plugin(name, source)``: write module ``name`` and name it in ``$MILCORE_PLUGINS``; undone afterwards."""
    from feature_cache.encoders.registry import REGISTRY as ENCODERS
    from feature_cache.sources.registry import REGISTRY as SOURCES
    from milcore.continual.strategies.registry import REGISTRY as STRATEGIES
    from milcore.models.registry import REGISTRY as AGGREGATORS

    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    written: list[str] = []

    def write(name: str, source: str) -> str:
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        monkeypatch.setenv(PLUGIN_ENV, ",".join(written))
        return name

    with AGGREGATORS.scoped(), ENCODERS.scoped(), SOURCES.scoped(), STRATEGIES.scoped():
        yield write
    monkeypatch.delenv(PLUGIN_ENV, raising=False)
    for name in written:
        sys.modules.pop(name, None)
    left = [n for r in (AGGREGATORS, ENCODERS, SOURCES, STRATEGIES) for n in r.names("plug_*")]
    assert not left, f"plug-ins left registered: {left}"


def test_extract_accepts_every_registered_source_and_names_unknown_ones(tmp_path: Path, capsys) -> None:
    """``bloodmnist`` was documented but refused: the CLI kept its own list of sources."""
    from feature_cache.bank import open_reader
    from feature_cache.sources.bloodmnist import CELL_TYPES, BloodMnistBags, make_bloodmnist_bags

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(CELL_TYPES)), 4)[:, None]  # (32, 1): the MedMNIST npz layout
    images = rng.integers(0, 255, (len(labels), 28, 28, 3), dtype=np.uint8)
    npz = tmp_path / "bloodmnist.npz"
    np.savez(npz, **{f"{s}_{k}": v for s in ("train", "val", "test") for k, v in (("images", images),
                                                                                  ("labels", labels))})  # fmt: skip
    bags = make_bloodmnist_bags(npz, tmp_path / "bags", BloodMnistBags(split="test", bags=2, bag_range=(4, 6)))
    bank = tmp_path / "bank.h5"
    argv = ["-q", "extract", "--source", "bloodmnist", "--input", str(bags), "--encoder", "toy", "--out", str(bank)]
    assert main(argv) == 0, capsys.readouterr().err
    assert open_reader(bank).bag_ids() == ["bm-test-0000", "bm-test-0001"]
    code = main(["extract", "--source", "field", "--input", str(bags), "--encoder", "toy", "--out", str(bank)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown source 'field'; did you mean 'fields'? (registered: bloodmnist, crops, fields" in err
    code = main(["extract", "--source", "crops", "--input", str(bags), "--encoder", "tyo", "--out", str(bank)])
    assert code == 2 and "unknown encoder 'tyo'; did you mean 'toy'" in capsys.readouterr().err


def test_help_lists_registered_names_without_importing_torch() -> None:
    import subprocess

    code = ("import sys; from milcore.cli import build_parser; p = build_parser(); "
            "print('torch' in sys.modules, 'feature_cache.sources.registry' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]  # building the parser reads no registry
    code = ("import sys, contextlib, io; from milcore.cli import main; f = io.StringIO()\n"
            "with contextlib.redirect_stdout(f): main(['extract', '--help'])\n"
            "print('torch' in sys.modules); print(f.getvalue())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "False"
    assert "bloodmnist, crops, fields, slides, synthetic" in " ".join(out.split())


def _load(relative: str):
    """A test module of another folder, by path (its check functions are reused here)."""
    import importlib.util

    path = Path(__file__).parent / relative
    spec = importlib.util.spec_from_file_location(f"_reused_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AGGREGATOR = '''
    """A throwaway aggregator, written as a plug-in: one file, nothing else edited."""

    from dataclasses import dataclass

    from torch import nn

    from milcore.models import AggregatorConfig, MILAggregator, MILOutput, register_aggregator
    from milcore.models.layers import resize_linear
    from milcore.ops import segment_softmax, weighted_segment_sum


    @dataclass(frozen=True)
    class PlugConfig(AggregatorConfig):
        hidden: int = 16


    @register_aggregator("plug_attention", config=PlugConfig)
    class PlugAttention(MILAggregator):
        """Plain attention pooling (a plug-in)."""

        def __init__(self, config: PlugConfig) -> None:
            super().__init__(config)
            self.embed = nn.Sequential(nn.Linear(config.in_dim, config.hidden), nn.ReLU())
            self.score = nn.Linear(config.hidden, 1)
            self.head = nn.Linear(config.hidden, config.num_classes)

        def pool(self, x, ptr, index, coords, labels) -> MILOutput:
            h = self.embed(x)  # (N, H)
            att = segment_softmax(self.score(h), ptr, index)  # (N, 1)
            z = weighted_segment_sum(h, att, ptr, index)[:, 0]  # (B, H)
            return MILOutput(self.head(z), att[:, 0], z)

        def _resize_head(self, num_classes: int) -> None:
            self.head = resize_linear(self.head, num_classes)
'''


def test_an_aggregator_is_one_file(plugin, planted_factory, tmp_path: Path, capsys) -> None:
    from milcore.models import aggregator_needs, list_aggregators

    plugin("my_aggregator", AGGREGATOR)
    assert main(["models"]) == 0  # (a) listed, with its summary
    assert "plug_attention  Plain attention pooling (a plug-in)." in capsys.readouterr().out
    assert "plug_attention" in list_aggregators("plug_*") and aggregator_needs("plug_attention").padded is False
    contract = _load("models/test_contract.py")  # (d) the contract checks of every aggregator
    for check in contract.CHECKS:
        check("plug_attention")
    data = planted_factory(tmp_path / "planted", n_bags=24)
    out = tmp_path / "train"  # (b) trained by milcore train
    argv = ["-q", "train", "--bank", str(data["bank"]), "--cohort", str(data["cohort"]), "--task", "dx",
            "--model", "plug_attention", "--model-arg", "hidden=8", "--folds", "3", "--epochs", "2", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())
    bench = tmp_path / "bench"  # (c) run by milcore bench
    argv = ["-q", "bench", "aggregators", "--bank", str(data["bank"]), "--cohort", str(data["cohort"]), "--task", "dx",
            "--models", "plug_attention", "--peers", "none", "--folds", "3", "--seeds", "0", "--epochs", "2",
            "--threads", "1", "--device", "cpu", "--out", str(bench)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "plug_attention" in (bench / "bench.json").read_text()


ENCODER = '''
    """A throwaway encoder, written as a plug-in: per-channel mean and spread of the crop."""

    import torch
    from torch import nn

    from feature_cache.encoders import register_encoder
    from feature_cache.encoders.base import ResizeCrop, finish


    class ColourStats(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float() / 255.0  # (N, 3, S, S)
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)  # (N, 6)


    @register_encoder("plug_colour")
    def plug_colour(weights=None, device=None, size: int = 16):
        """Colour statistics of a crop (a plug-in)."""
        return finish("plug_colour", ColourStats(), ResizeCrop(size, "box"), None, version="1", weights_sha256="",
                      dim=6, device=device, extra=f"size={size}", amp=False)
'''


def test_an_encoder_is_one_file(plugin, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from feature_cache.bank import open_reader
    from feature_cache.encoders import create_encoder, list_encoders

    plugin("my_encoder", ENCODER)
    assert list_encoders("plug_*") == ["plug_colour"]
    assert main(["extract", "--help"]) == 0 and "plug_colour" in capsys.readouterr().out  # listed by the CLI
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 255, (20 + 4 * i, 24, 3), dtype=np.uint8) for i in range(4)]
    _load("encoders/test_all_encoders.py").check_encoder(
        "plug_colour", lambda: create_encoder("plug_colour", device="cpu"), crops)  # the contract of every encoder
    for patient in ("p1", "p2"):
        (tmp_path / "crops" / patient).mkdir(parents=True)
        for i, crop in enumerate(crops):
            Image.fromarray(crop).save(tmp_path / "crops" / patient / f"c{i}.png")
    bank = tmp_path / "bank.h5"
    argv = ["-q", "extract", "--source", "crops", "--input", str(tmp_path / "crops"), "--encoder", "plug_colour",
            "--encoder-arg", "size=8", "--workers", "0", "--out", str(bank)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    reader = open_reader(bank)
    assert reader.info.name == "plug_colour" and reader.dim == 6 and reader.bag_ids() == ["p1", "p2"]
    argv[argv.index("size=8")] = "depth=3"
    assert main(argv) == 2 and "has no option 'depth' (its options: size)" in capsys.readouterr().err


STRATEGY = '''
    """A throwaway continual strategy, written as a plug-in."""

    from typing import ClassVar

    from milcore.continual.strategies import Strategy, register_strategy


    @register_strategy("plug_finetune")
    class PlugFinetune(Strategy):
        """Fine-tuning on the current task only, with a scaled loss (a plug-in)."""

        options: ClassVar[dict] = {"scale": 1.0}

        def train_items(self, ctx):
            return ctx.current_items()

        def loss(self, model, batch, out):
            return self.opts["scale"] * super().loss(model, batch, out)
'''


def test_a_strategy_is_one_file(plugin, planted_factory, tmp_path: Path, capsys) -> None:
    import yaml

    from milcore.continual.strategies import list_strategies

    plugin("my_strategy", STRATEGY)
    assert "plug_finetune" in list_strategies()
    _load("continual/test_strategies.py").test_loss_is_the_cross_entropy_before_any_state("plug_finetune")
    data = planted_factory(tmp_path / "planted", n_bags=24)
    config = {"name": "plug", "data": {"bank": str(data["bank"]), "cohort": str(data["cohort"]), "label": "dx"},
              "scenario": {"kind": "domain_incremental", "column": "sex", "test_fraction": 0.3},
              "model": "abmil", "model_args": {"embed_dim": 8, "attention_dim": 4},
              "train": {"epochs": 1, "device": "cpu"}, "memory": {"budget": 100, "per_bag": 5},
              "strategies": {"plug_finetune": {"scale": 0.5}, "typo": {"strategy": "plug_finetun"}}}  # fmt: skip
    path = tmp_path / "continual.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["-q", "continual", "--config", str(path), "--out", str(out)]) == 2  # the check names the typo
    assert "unknown strategy 'plug_finetun'; did you mean 'plug_finetune'" in capsys.readouterr().err
    del config["strategies"]["typo"]
    path.write_text(yaml.safe_dump(config))
    assert main(["-q", "continual", "--config", str(path), "--out", str(out)]) == 0, capsys.readouterr().err
    assert list(json.loads((out / "continual.json").read_text())) == ["plug_finetune"]


def test_a_missing_plugin_module_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv(PLUGIN_ENV, "no_such_plugin_module")
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert "MILCORE_PLUGINS: cannot import plug-in module 'no_such_plugin_module'" in err
    assert len(err.strip().splitlines()) == 1
