"""Every registered strategy's loss, the EWC penalty, LwF distillation and head growth."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml

from feature_cache.errors import InvalidArgumentError
from milcore.continual.data import TrainBatch
from milcore.continual.strategies import create_strategy, list_strategies, register_strategy
from milcore.models import create_aggregator

EXPECTED = {"confidence", "ewc", "finetune", "icarl", "joint", "lwf", "milreplay", "replay_random"}
NAMES = list_strategies()  # every registered strategy is tested (a new one included)


def _batch(num_classes: int = 4) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g)
    ptr = torch.tensor([0, 10, 18, 30])
    return TrainBatch(x, ptr, torch.tensor([0, 2, 3]), torch.zeros(3, dtype=torch.bool), torch.ones(num_classes))


def _model(num_classes: int = 4):
    torch.manual_seed(0)
    return create_aggregator("abmil", in_dim=6, num_classes=num_classes, embed_dim=8, attention_dim=4)


def test_registry():
    assert set(NAMES) >= EXPECTED
    assert list_strategies("*replay*") == ["milreplay", "replay_random"]
    with pytest.raises(InvalidArgumentError, match=r"unknown strategy 'milreplayy'; did you mean 'milreplay'"):
        create_strategy("milreplayy")
    with pytest.raises(InvalidArgumentError, match="unknown option"):
        create_strategy("milreplay", attention_weight=1.0)


def test_listing_imports_no_torch():
    code = ("import sys; from milcore.continual.strategies import list_strategies; n = list_strategies(); "
            "print(len(n) >= 8, 'torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_register_refuses_what_breaks_the_protocol():
    from milcore.continual.strategies.base import Strategy
    from milcore.continual.strategies.registry import REGISTRY

    class NoLoss:
        options: ClassVar[dict] = {}

        def before_task(self, ctx): ...

    with REGISTRY.scoped():
        with pytest.raises(InvalidArgumentError, match=r"strategy 'noloss': .*NoLoss lacks train_items, loss"):
            register_strategy("noloss")(NoLoss)
        with pytest.raises(InvalidArgumentError, match=r"strategy 'ewc' is already registered \(by .*EWC\)"):
            register_strategy("ewc")(type("Other", (Strategy,), {}))

        @register_strategy("_mine")
        class Mine(Strategy):
            """A test strategy."""

            uses_memory = True
            options: ClassVar[dict] = {"k": 1}

        assert create_strategy("_mine", k=2).opts == {"k": 2} and Mine.name == "_mine"
        assert dict(REGISTRY.entry("_mine").metadata) == {"uses_memory": True, "options": {"k": 1}}
    assert "_mine" not in list_strategies()


def test_configured_names_are_checked_before_any_work(stream_bank, make_config, tmp_path, capsys):
    from milcore.cli import main

    config = make_config(stream_bank, strategies={"finetune": {}, "mixed": {"strategy": "milreplayy"}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "run"
    assert main(["-q", "continual", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "strategies.mixed: unknown strategy 'milreplayy'; did you mean 'milreplay'" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()  # refused before anything was written
    config = make_config(stream_bank, strategies={"finetune": {}})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["-q", "continual", "--config", str(path), "--out", str(out), "--strategies", "finetune,joint"]) == 2
    assert "--strategies: joint is not in the configuration (configured: finetune)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_the_cross_entropy_before_any_state(name):
    model, batch = _model(), _batch()
    strategy = create_strategy(name)
    out = model(batch.x, batch.ptr)
    loss = strategy.loss(model, batch, out)
    ce = torch.nn.functional.cross_entropy(out.logits, batch.y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ce)  # no old model / Fisher yet: plain cross-entropy
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_ewc_penalty_hand_checked():
    model, batch = _model(), _batch()
    ewc = create_strategy("ewc", lam=2.0)
    ewc.fisher = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    ewc.star = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(batch.x, batch.ptr)
    base = torch.nn.functional.cross_entropy(out.logits, batch.y)
    torch.testing.assert_close(ewc.loss(model, batch, out), base)  # at theta*: no penalty
    with torch.no_grad():
        model.head.bias.add_(0.5)  # 4 entries moved by 0.5
    out = model(batch.x, batch.ptr)
    base = torch.nn.functional.cross_entropy(out.logits, batch.y)
    expected = base + 0.5 * 2.0 * 4 * 0.25
    torch.testing.assert_close(ewc.loss(model, batch, out), expected)
    model.reset_head(6)  # a grown head is compared on its old rows only
    batch = _batch(6)
    out = model(batch.x, batch.ptr)
    penalty = ewc.loss(model, batch, out) - torch.nn.functional.cross_entropy(out.logits, batch.y)
    torch.testing.assert_close(penalty, torch.tensor(1.0))


def test_lwf_distillation_zero_for_the_same_model_positive_after_change():
    from milcore.continual.strategies.base import StrategyContext

    model, batch = _model(), _batch()
    lwf = create_strategy("lwf", alpha=1.0, temperature=2.0)
    scenario = type("S", (), {"seen_classes": staticmethod(lambda j: 4)})()
    ctx = StrategyContext(1, scenario, None, model, None, 6, torch.device("cpu"), 0)
    lwf.before_task(ctx)
    assert lwf.distill.old_classes == 4 and lwf.distill.old is not model
    model.reset_head(6)
    out = model(batch.x, batch.ptr)
    term = lwf.distill.term(batch, out)
    assert float(term.detach()) == pytest.approx(0.0, abs=1e-6)  # old rows unchanged by the growth
    with torch.no_grad():
        model.head.weight[:4].mul_(3.0)
    out = model(batch.x, batch.ptr)
    assert float(lwf.distill.term(batch, out).detach()) > 1e-3


@pytest.mark.parametrize("multi_branch", [False, True])
def test_head_growth_keeps_old_rows(multi_branch):
    torch.manual_seed(0)
    model = create_aggregator("abmil", in_dim=6, num_classes=3, embed_dim=8, attention_dim=4,
                              multi_branch=multi_branch).eval()  # fmt: skip
    batch = _batch()
    before = model(batch.x, batch.ptr).logits.detach()
    old = copy.deepcopy(model.head.weight.detach())
    model.reset_head(5)
    after = model(batch.x, batch.ptr)
    assert after.logits.shape == (3, 5) and model.num_classes == 5
    torch.testing.assert_close(model.head.weight[:3].detach(), old)
    if not multi_branch:  # single attention: old classes' logits are unchanged
        torch.testing.assert_close(after.logits[:, :3].detach(), before)


def test_strategy_state_roundtrip(tmp_path):
    model = _model()
    ewc = create_strategy("ewc")
    ewc.fisher = {"head.bias": torch.arange(4.0)}
    ewc.star = {"head.bias": torch.ones(4)}
    torch.save(ewc.state_dict(), tmp_path / "s.pt")
    back = create_strategy("ewc")
    back.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    torch.testing.assert_close(back.fisher["head.bias"], torch.arange(4.0))
    assert np.isfinite(float(back.loss(model, _batch(), model(_batch().x, _batch().ptr)).detach()))
