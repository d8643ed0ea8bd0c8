"""Bounds of a stream: ``finetune`` (lower: the current task only) and ``joint`` (upper: every task so far)."""

from __future__ import annotations

from milcore.continual.data import Items
from milcore.continual.strategies.base import Strategy, StrategyContext
from milcore.continual.strategies.registry import register_strategy


@register_strategy("finetune")
class Finetune(Strategy):
    """Train on each new task's bags alone (what forgetting looks like)."""

    def train_items(self, ctx: StrategyContext) -> Items:
        return ctx.current_items()


@register_strategy("joint")
class Joint(Strategy):
    """Train on all bags of every task so far (no memory limit: the upper bound)."""

    def train_items(self, ctx: StrategyContext) -> Items:
        items = Items()
        for t in ctx.scenario.tasks[: ctx.task + 1]:
            items = items + Items.bags(t.train_ids, t.train_labels)
        return items
