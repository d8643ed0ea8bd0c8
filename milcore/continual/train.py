"""One task's training loop: packed instance-budget batches, class balance, the strategy's loss.

Not :func:`~milcore.training.fold.fit_fold`: a stream keeps one model across tasks (growing its head),
trains a fixed number of epochs per task on items that include the memory's pseudo-bags, with the
strategy's loss, and has no validation set to stop on or calibrate with. What it shares with the
trainer is the epoch's bag order and the optimisation step (:mod:`milcore.training.loop`).
"""

from __future__ import annotations

import numpy as np
import torch

from milcore.continual.config import StreamTrainConfig
from milcore.continual.data import Items, TrainBatch
from milcore.continual.strategies.base import Strategy, StrategyContext
from milcore.losses import class_weights
from milcore.models.base import EpochContext
from milcore.models.registry import aggregator_needs, control_class_of
from milcore.training.loop import OptimizerStep, epoch_order

CONTROL_SAMPLE = 20_000


def train_task(ctx: StrategyContext, strategy: Strategy, items: Items, cfg: StreamTrainConfig) -> list[float]:
    """Train ``ctx.model`` on ``items`` for ``cfg.epochs`` epochs with ``strategy.loss``.

    Returns:
        The mean training loss of each epoch.
    """
    model, device = ctx.model, ctx.device
    rng = np.random.default_rng([ctx.seed, ctx.task, 7])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)  # fmt: skip
    step = OptimizerStep(model, optimizer, cfg.grad_clip, None, device)
    labels = torch.from_numpy(items.labels)
    head = int(getattr(model, "num_classes", ctx.num_classes))  # >= the seen classes (a head has >= 2 rows)
    weights = class_weights(labels, head) if cfg.balance == "weights" else torch.ones(head)
    weights = weights.float().to(device)
    memory_flags = torch.from_numpy(items.from_memory)
    losses = []
    model.train()
    ctx.data.preload([b for b, r in zip(items.bag_ids, items.rows, strict=True)])
    needs = aggregator_needs(model).hooks  # declared by the model (any nn.Module: none)
    for epoch in range(cfg.epochs):
        if hasattr(model, "on_epoch_start"):  # e.g. AMiL refits its control-cell Gaussian
            sampler = _control_sampler(ctx, items, model) if "control_instances" in needs else None
            model.on_epoch_start(EpochContext(epoch, sampler))
        total, count = 0.0, 0
        order = epoch_order(items.labels, ctx.num_classes, cfg.balance == "sampler", rng)
        for group, x, ptr in ctx.data.batches(items, order, cfg.batch_instances, cfg.max_bag_instances, rng):
            idx = torch.from_numpy(np.asarray(group, dtype=np.int64))
            batch = TrainBatch(x.to(device), ptr.to(device), labels[idx].to(device), memory_flags[idx].to(device),
                               weights)  # fmt: skip
            out = model(batch.x, batch.ptr, labels=batch.y)
            loss = strategy.loss(model, batch, out)
            step(loss)
            total += float(loss.detach()) * len(group)
            count += len(group)
        losses.append(total / max(count, 1))
    return losses


def _control_sampler(ctx: StrategyContext, items: Items, model: torch.nn.Module):
    """Rows of the control-class items (memory pseudo-bags included), at most :data:`CONTROL_SAMPLE`."""
    normal = control_class_of(model)

    def sample() -> torch.Tensor:
        xs = [ctx.data.item_x(items, k) for k in np.flatnonzero(items.labels == normal)]
        if not xs:
            return torch.zeros(0, ctx.data.dim, device=ctx.device)
        x = torch.cat(xs)  # (M, D)
        if len(x) > CONTROL_SAMPLE:
            g = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.task)
            x = x[torch.randperm(len(x), generator=g)[:CONTROL_SAMPLE]]
        return x.to(ctx.device)

    return sample
