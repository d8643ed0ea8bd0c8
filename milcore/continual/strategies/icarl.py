"""``icarl``: iCaRL-style rehearsal (Rebuffi et al. 2017) on bag embeddings.

Exemplar bags are chosen by herding on the model's bag embeddings (the running mean of the stored
bags tracks the class mean), their cells at random; training adds distillation of the previous
model's outputs on the old classes. The classifier stays the model's head (no nearest-mean rule).
"""

from __future__ import annotations

import numpy as np

from milcore.continual.data import infer
from milcore.continual.exemplars import herding_order
from milcore.continual.strategies.base import StrategyContext
from milcore.continual.strategies.registry import register_strategy
from milcore.continual.strategies.regularization import Distilling
from milcore.continual.strategies.replay import Candidates, ReplayStrategy


@register_strategy("icarl")
class ICaRL(Distilling, ReplayStrategy):
    """Herding exemplar bags (random cells) plus distillation.

    Options:
        alpha: distillation weight; temperature: softening temperature.
    """

    def rank(self, ctx: StrategyContext, bag_ids: list[str], label: int) -> Candidates:
        rng = self.rng(ctx, label)
        inference = infer(ctx.model, ctx.data, bag_ids, np.full(len(bag_ids), label))
        order = herding_order(inference.embedding)
        return [(bag_ids[b], ctx.data.global_rows(bag_ids[b], rng.permutation(ctx.data.size(bag_ids[b]))))
                for b in order]  # fmt: skip
