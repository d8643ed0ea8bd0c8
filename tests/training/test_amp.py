"""Mixed precision without a GPU: bf16 autocast trains on the CPU; fp16 training goes through loss scaling.

These paths used to run only on CUDA (``amp: auto`` is bfloat16 there), so no test exercised them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from milcore.data.splits import make_folds
from milcore.data.store import open_bags
from milcore.models import MILOutput
from milcore.ops import segment_softmax, segment_sum
from milcore.training.config import TrainConfig
from milcore.training.fold import fit_fold
from milcore.training.loop import autocast_dtype

FAST = {"epochs": 12, "patience": 12, "min_epochs": 1, "lr": 2e-3, "batch_instances": 256, "device": "cpu",
        "num_workers": 0, "model": "abmil"}  # fmt: skip


class Recorder(nn.Module):
    """Attention pooling that records the autocast state and its linear layers' output dtype in training."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.score, self.head = nn.Linear(in_dim, 1), nn.Linear(in_dim, num_classes)
        self.seen: set[tuple[bool, torch.dtype]] = set()

    def forward(self, x: torch.Tensor, ptr: torch.Tensor) -> MILOutput:
        s = self.score(x).squeeze(-1)  # (N,)
        if self.training:
            self.seen.add((torch.is_autocast_enabled("cpu"), s.dtype))
        a = segment_softmax(s, ptr)  # (N,) float32
        emb = segment_sum(a[:, None] * x.float(), ptr)  # (B, D)
        return MILOutput(self.head(emb), a, emb)


@pytest.fixture(scope="module")
def data_and_fold(planted: dict):
    data = open_bags(planted["bank"], planted["cohort"], "dx")
    return data, make_folds(data.bag_ids, data.labels, k=3, seed=0, groups=data.groups, classes=data.classes)[0]


def test_amp_choices_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None  # auto: full precision off CUDA
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("fp16", cpu) is torch.float16
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16 and autocast_dtype("off", cpu) is None


@pytest.mark.parametrize(("amp", "expected"), [("bf16", (True, torch.bfloat16)), ("off", (False, torch.float32))])
def test_training_runs_under_the_requested_autocast(data_and_fold, amp: str, expected: tuple) -> None:
    data, fold = data_and_fold
    torch.manual_seed(0)
    module = Recorder(data.dim, data.num_classes)
    fit_fold(TrainConfig(**{**FAST, "epochs": 1, "amp": amp}), data, fold, model=module)
    assert module.seen == {expected}


def test_bf16_training_of_an_aggregator_stays_finite(data_and_fold) -> None:
    data, fold = data_and_fold
    result = fit_fold(TrainConfig(**{**FAST, "epochs": 2, "amp": "bf16"}), data, fold)
    assert np.isfinite(result.test.logits).all() and np.isfinite(result.proba).all()
    for a in result.test.attention:
        assert a.sum() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_bf16_training_learns_the_planted_cells_on_cpu(data_and_fold) -> None:
    """CPU bfloat16 matmuls are slow without bf16 instructions (about 20 s here): slow tier."""
    data, fold = data_and_fold
    result = fit_fold(TrainConfig(**{**FAST, "amp": "bf16"}), data, fold)
    assert result.metrics["auroc"] >= 0.8, result.metrics


def test_fp16_training_scales_the_loss(data_and_fold, monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 gradients underflow without loss scaling: fp16 training must go through a GradScaler."""
    data, fold = data_and_fold
    calls = {"scale": 0, "step": 0}
    scale, step = torch.amp.GradScaler.scale, torch.amp.GradScaler.step

    def counting_scale(self, outputs):
        calls["scale"] += 1
        return scale(self, outputs)

    def counting_step(self, optimizer, *args, **kwargs):
        calls["step"] += 1
        return step(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", counting_scale)
    monkeypatch.setattr(torch.amp.GradScaler, "step", counting_step)
    result = fit_fold(TrainConfig(**{**FAST, "epochs": 3, "amp": "fp16"}), data, fold)
    assert calls["scale"] > 0 and calls["step"] == calls["scale"]
    assert np.isfinite(result.proba).all()
    calls.update(scale=0, step=0)
    fit_fold(TrainConfig(**{**FAST, "epochs": 1, "amp": "bf16"}), data, fold)
    assert calls["scale"] == 0, "bfloat16 has float32's range: no loss scaling"


def test_native_amp_is_bf16_only_where_the_cpu_computes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``amp: native``: bfloat16 on a CPU with AVX512-BF16 / AMX, full precision on an AVX2-only CPU."""
    from feature_cache import devices

    cpu = torch.device("cpu")
    for flags, expected in [({"avx2", "fma"}, None), ({"avx2", "avx512_bf16"}, torch.bfloat16),
                            ({"amx_bf16"}, torch.bfloat16), (set(), None)]:  # fmt: skip
        monkeypatch.setattr(devices, "cpu_flags", lambda flags=flags: frozenset(flags))
        devices.native_bf16.cache_clear()
        assert autocast_dtype("native", cpu) is expected, flags
    devices.native_bf16.cache_clear()
    assert TrainConfig(**{**FAST, "amp": "native"}).amp == "native"


def test_cpu_flags_are_lower_case_feature_names() -> None:
    from feature_cache.devices import cpu_flags

    flags = cpu_flags()
    assert all(isinstance(f, str) and f == f.lower() for f in flags)


@pytest.mark.parametrize("model", ["abmil", "transmil"])
def test_cast_first_features_train_the_same_model(data_and_fold, monkeypatch: pytest.MonkeyPatch, model: str) -> None:
    """Under bf16 the trainer gathers a cast-first model's features in bfloat16: the same fit, to the bit, as
    gathering float32 features and casting them in the model."""
    from milcore.training import trainer

    data, fold = data_and_fold
    config = TrainConfig(**{**FAST, "epochs": 2, "amp": "bf16", "model": model,
                            "batch_instances": 64})  # fmt: skip
    seen = []
    real = trainer.input_dtype

    def recording(module, amp):
        seen.append(real(module, amp))
        return seen[-1]

    monkeypatch.setattr(trainer, "input_dtype", recording)
    fast = fit_fold(config, data, fold)
    assert set(seen) == {torch.bfloat16}
    monkeypatch.setattr(trainer, "input_dtype", lambda module, amp: torch.float32)
    slow = fit_fold(config, data, fold)
    assert [h["train_loss"] for h in fast.history] == [h["train_loss"] for h in slow.history]
    np.testing.assert_array_equal(fast.test.logits, slow.test.logits)
    for a, b in zip(fast.test.attention, slow.test.attention, strict=True):
        np.testing.assert_array_equal(a, b)


def test_input_dtype_is_float32_unless_the_model_casts_first() -> None:
    from milcore.models import create_aggregator
    from milcore.models.input_norm import attach_input_norm
    from milcore.training.loop import input_dtype

    bf16 = torch.bfloat16
    assert input_dtype(create_aggregator("abmil", in_dim=4, num_classes=2), bf16) is bf16
    assert input_dtype(create_aggregator("abmil", in_dim=4, num_classes=2), None) is torch.float32
    assert input_dtype(create_aggregator("graphmil", in_dim=4, num_classes=2), bf16) is torch.float32  # kNN on x
    assert input_dtype(Recorder(4, 2), bf16) is torch.float32  # a user's module declares nothing
    normed = attach_input_norm(create_aggregator("abmil", in_dim=4, num_classes=2))
    assert input_dtype(normed, bf16) is torch.float32  # standardised in float32 first
