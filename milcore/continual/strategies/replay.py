"""Rehearsal strategies: after each task, store ranked pseudo-bags of its classes in the exemplar memory.

All share the memory's budget and allocation (see :mod:`milcore.continual.memory`) and differ only in
how they rank bags and cells:

- ``replay_random``: random bags, random cells (the control at the same budget);
- ``milreplay``: random bags, cells by the MIL-replay score of Ebrahimi et al. (2025): attention,
  distance to the class mean and to the bag mean (see :func:`~milcore.continual.exemplars.milreplay_scores`);
- ``confidence``: bags by confidence and uncertainty (Sadafi et al. 2023), cells by attention.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from scipy.special import softmax

from milcore.continual.data import infer
from milcore.continual.exemplars import (
    MILReplayWeights,
    confidence_uncertainty_order,
    interleave_random,
    milreplay_scores,
)
from milcore.continual.strategies.base import Strategy, StrategyContext
from milcore.continual.strategies.registry import register_strategy

Candidates = list[tuple[str, np.ndarray]]


class ReplayStrategy(Strategy):
    """Rehearsal: train on the task plus the memory; after the task, store its classes' best exemplars."""

    uses_memory = True

    def rng(self, ctx: StrategyContext, label: int) -> np.random.Generator:
        """A generator seeded by (seed, task, label): the same bags for every replay strategy."""
        return np.random.default_rng([ctx.seed, ctx.task, label, 31])

    def after_task(self, ctx: StrategyContext) -> None:
        task = ctx.scenario.tasks[ctx.task]
        groups = []
        for label in task.classes:
            ids = [b for b, y in zip(task.train_ids, task.train_labels, strict=True) if y == label]
            groups.append((ctx.task, label, self.rank(ctx, ids, label)))
        assert ctx.memory is not None
        ctx.memory.update(groups)

    def rank(self, ctx: StrategyContext, bag_ids: list[str], label: int) -> Candidates:
        """Bags of one class in priority order, each with its global bank rows in priority order."""
        raise NotImplementedError


@register_strategy("replay_random")
class RandomReplay(ReplayStrategy):
    """Random exemplar bags and random cells under the memory budget."""

    def rank(self, ctx: StrategyContext, bag_ids: list[str], label: int) -> Candidates:
        rng = self.rng(ctx, label)
        order = rng.permutation(len(bag_ids))
        return [(bag_ids[b], ctx.data.global_rows(bag_ids[b], rng.permutation(ctx.data.size(bag_ids[b]))))
                for b in order]  # fmt: skip


@register_strategy("milreplay")
class MILReplay(ReplayStrategy):
    """MIL-specific rehearsal (Ebrahimi et al. 2025): cells by attention and distances to class and bag means.

    Options:
        attention, class_distance, bag_distance: the score weights (defaults 0.5, 0.3, 0.2).
        random_share: share of each stored pseudo-bag filled with random cells of the bag instead of
            the best-scored ones (0 = the paper's ranking alone), which keeps part of the bag's composition.
    """

    options: ClassVar[dict[str, Any]] = {"attention": 0.5, "class_distance": 0.3, "bag_distance": 0.2,
                                         "random_share": 0.0}  # fmt: skip

    def rank(self, ctx: StrategyContext, bag_ids: list[str], label: int) -> Candidates:
        weights = MILReplayWeights(float(self.opts["attention"]), float(self.opts["class_distance"]),
                                   float(self.opts["bag_distance"]))  # fmt: skip
        rng = self.rng(ctx, label)
        order = rng.permutation(len(bag_ids))  # same bags as replay_random: only the cells differ
        share = float(self.opts["random_share"])
        inference = infer(ctx.model, ctx.data, bag_ids, np.full(len(bag_ids), label))
        feats = [ctx.data.bag(b).numpy() for b in bag_ids]
        class_mean = np.concatenate(feats).astype(np.float64).mean(axis=0)  # (D,)
        out = []
        for b in order:
            scores = milreplay_scores(feats[b], inference.attention[b], class_mean, weights)
            ranked = interleave_random(np.argsort(-scores, kind="stable"), share, rng)
            out.append((bag_ids[b], ctx.data.global_rows(bag_ids[b], ranked)))
        return out


@register_strategy("confidence")
class ConfidenceUncertainty(ReplayStrategy):
    """Exemplar bags by confidence and uncertainty (Sadafi et al. 2023), their cells by attention."""

    def rank(self, ctx: StrategyContext, bag_ids: list[str], label: int) -> Candidates:
        inference = infer(ctx.model, ctx.data, bag_ids, np.full(len(bag_ids), label))
        proba = softmax(inference.logits[:, : ctx.num_classes], axis=1)
        order = confidence_uncertainty_order(proba, np.full(len(bag_ids), label))
        return [(bag_ids[b], ctx.data.global_rows(bag_ids[b], np.argsort(-inference.attention[b], kind="stable")))
                for b in order]  # fmt: skip
