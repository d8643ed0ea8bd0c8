"""Any ``nn.Module`` honouring the MILOutput contract trains through ``fit_fold``; one that breaks it is named.

The module below is not registered and does not subclass anything of milcore: ``forward(x, ptr)`` only,
attention pooling with :func:`milcore.ops.segment_softmax`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from feature_cache.errors import InvalidArgumentError
from milcore.data.splits import make_folds
from milcore.data.store import open_bags
from milcore.models import MILOutput
from milcore.ops import segment_softmax, segment_sum
from milcore.training.config import TrainConfig
from milcore.training.fold import fit_fold

FAST = {"epochs": 30, "patience": 30, "min_epochs": 1, "lr": 1e-2, "batch_instances": 256, "device": "cpu",
        "num_workers": 0}  # fmt: skip


class TinyPool(nn.Module):
    """A user's own attention pooling: no registry, no milcore base class."""

    def __init__(self, in_dim: int, num_classes: int, mistake: str = "") -> None:
        super().__init__()
        self.score = nn.Linear(in_dim, 1)
        self.head = nn.Linear(in_dim, num_classes)
        self.mistake = mistake

    def forward(self, x: torch.Tensor, ptr: torch.Tensor):
        a = segment_softmax(self.score(x).squeeze(-1), ptr)  # (N,)
        emb = segment_sum(a[:, None] * x, ptr)  # (B, D)
        logits = self.head(emb)  # (B, C)
        if self.mistake == "tuple":
            return logits, a
        if self.mistake == "logits_shape":
            return MILOutput(logits[:, :1], a, emb)
        if self.mistake == "raw_scores":
            return MILOutput(logits, self.score(x).squeeze(-1).exp(), emb)
        if self.mistake == "nan":
            return MILOutput(logits * float("nan"), a, emb)
        return MILOutput(logits, a, emb)


@pytest.fixture(scope="module")
def data_and_fold(planted: dict):
    data = open_bags(planted["bank"], planted["cohort"], "dx")
    folds = make_folds(data.bag_ids, data.labels, k=3, seed=0, groups=data.groups, classes=data.classes)
    return data, folds[0]


def test_a_plain_module_trains_through_fit_fold(data_and_fold) -> None:
    data, fold = data_and_fold
    torch.manual_seed(0)  # an instance is trained as it is: its owner seeds it
    result = fit_fold(TrainConfig(**FAST), data, fold, model=TinyPool(data.dim, data.num_classes))
    assert isinstance(result.model, TinyPool)
    assert result.proba.shape == (len(fold.test), 2) and len(result.test.attention) == len(fold.test)
    assert result.metrics["auroc"] >= 0.8, result.metrics  # the planted cells are found
    assert result.temperature > 0 and result.history


def test_input_standardisation_works_on_a_plain_module(data_and_fold) -> None:
    data, fold = data_and_fold
    result = fit_fold(TrainConfig(**{**FAST, "epochs": 2, "input_norm": "standardize"}), data, fold, model=TinyPool)
    mean, std = result.model.input_mean, result.model.input_std  # (D,) buffers from the training fold
    assert mean.shape == (data.dim,) and bool((std > 0).all())


def test_a_factory_is_seeded_so_two_fits_agree(data_and_fold) -> None:
    data, fold = data_and_fold
    runs = [fit_fold(TrainConfig(**{**FAST, "epochs": 3}), data, fold, model=TinyPool) for _ in range(2)]
    assert torch.equal(runs[0].model.head.weight, runs[1].model.head.weight)


@pytest.mark.parametrize(("mistake", "message"), [
    ("tuple", "it returned tuple, not milcore.models.MILOutput"),
    ("logits_shape", "logits (8, 1), expected (8, 2)"),
    ("raw_scores", "must sum to 1 within every bag"),
    ("nan", "logits contain NaN or Inf"),
])  # fmt: skip
def test_a_module_breaking_the_contract_is_named_on_the_first_batch(data_and_fold, mistake: str,
                                                                     message: str) -> None:  # fmt: skip
    data, fold = data_and_fold
    config = TrainConfig(**{**FAST, "batch_instances": 100_000})  # one batch: the 8-ish training bags at once
    with pytest.raises(InvalidArgumentError) as info:
        fit_fold(config, data, fold, model=TinyPool(data.dim, data.num_classes, mistake))
    text = str(info.value)
    assert text.startswith("TinyPool: forward breaks the MILOutput contract"), text
    assert "\n" not in text
    if mistake != "logits_shape":
        assert message in text, text
    else:
        assert "logits (" in text and ", expected (" in text and "(bags, classes)" in text, text


def test_unlabelled_bags_are_refused(planted: dict, tmp_path: Path) -> None:
    from feature_cache.bank import open_reader
    from feature_cache.errors import UserError
    from milcore.data.store import FeatureStore
    from milcore.training.trainer import Trainer

    bank = open_reader(planted["bank"])
    store = FeatureStore(bank, bank.bag_ids()[:6])
    with pytest.raises(UserError, match="training needs labelled bags"):
        Trainer(TrainConfig(**FAST), bank.dim, 2).fit(store.view(store.bag_ids[:3]), store.view(store.bag_ids[3:]))


def test_an_aggregator_that_uses_coordinates_gets_them(data_and_fold, monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``milcore train`` does: graph MIL builds its graph in cell space, whatever the store was opened with."""
    from milcore.models.graphmil import GraphMIL

    data, fold = data_and_fold
    assert not data.with_coords and data.with_coordinates().with_coords and not data.with_coords
    seen = []
    pool = GraphMIL.pool

    def spy(self, x, ptr, index, coords, labels):
        seen.append(coords is not None)
        return pool(self, x, ptr, index, coords, labels)

    monkeypatch.setattr(GraphMIL, "pool", spy)
    fit_fold(TrainConfig(**{**FAST, "epochs": 1, "model": "graphmil"}), data, fold)
    assert seen and all(seen)


def test_fit_fold_sets_deterministic_algorithms_before_its_clock_starts(data_and_fold, monkeypatch) -> None:
    """The first ``torch.use_deterministic_algorithms`` of a process imports torch._dynamo (about a second):
    ``fit_fold`` makes that call before timing the fit, so training bags/s measures training."""
    import time

    from milcore.training import fold as fold_module
    from milcore.training.trainer import Trainer

    data, fold = data_and_fold
    events: list[str] = []
    clock = time.perf_counter
    monkeypatch.setattr(Trainer, "use_deterministic_algorithms", lambda self: events.append("deterministic"))
    monkeypatch.setattr(fold_module.time, "perf_counter", lambda: events.append("clock") or clock())
    fit_fold(TrainConfig(**{**FAST, "epochs": 1}), data, fold, model=TinyPool)
    assert events[:2] == ["deterministic", "clock"], events


def test_deterministic_training_does_not_fill_uninitialised_memory() -> None:
    """Deterministic algorithms on CPU, without torch's NaN fill of every new tensor (9 % of a DTFD-MIL fit)."""
    from milcore.training.trainer import Trainer

    Trainer(TrainConfig(**FAST), 8, 2).use_deterministic_algorithms()
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory is False
