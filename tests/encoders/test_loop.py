"""The encoder training loop's schedule and early stopping (feature_cache.encoders.loop)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch

from feature_cache.encoders.loop import RunFolder, fit, warmup_cosine


def _fit(tmp_path: Path, scores: list[float], epochs: int, patience: int, min_epochs: int):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    run = RunFolder(tmp_path / "run", {"r": 1})
    run.start()
    it = iter(scores)
    return fit(run, None, {"net": net}, opt, None, torch.Generator(), epochs, patience,
               lambda epoch: 1.0, lambda: {"v": next(it)}, lambda m: m["v"], min_epochs=min_epochs)  # fmt: skip


def test_early_stopping_waits_for_min_epochs(tmp_path: Path) -> None:
    """The noisy high-learning-rate start of a cosine schedule must not end the run (the 40-epoch run
    that stopped at epoch 12): with min_epochs, a dip early on does not stop training."""
    scores = [0.5, 0.4, 0.4, 0.4, 0.45, 0.6, 0.7, 0.65, 0.6, 0.6]
    state = _fit(tmp_path, scores, epochs=10, patience=2, min_epochs=6)
    assert state.epoch == 9  # stopped only after epoch 6, two epochs past the best (epoch 7)
    assert state.best_epoch == 7
    early = _fit(tmp_path / "b", scores, epochs=10, patience=2, min_epochs=0)
    assert early.epoch == 3 and early.best_epoch == 1  # without it: stops in the dip


def test_warmup_cosine_schedule() -> None:
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)  # ramps up linearly from 1/warmup
    assert lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0)
    assert all(a >= b for a, b in pairwise(lrs[9:]))  # then only decreases
    assert lrs[-1] < 0.01
    assert warmup_cosine(opt, total_steps=5, warmup_steps=0).get_last_lr()[0] == pytest.approx(1.0)
