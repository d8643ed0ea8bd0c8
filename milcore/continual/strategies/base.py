"""The strategy protocol (the registry is :mod:`.registry`: ``create_strategy`` / ``list_strategies``).

A strategy sees the stream through three hooks, called by the runner for every task ``j``:

1. ``before_task(ctx)`` -- after the head has grown to the classes seen so far, before training;
2. ``loss(model, batch, out)`` -- the training loss of one packed batch (cross-entropy plus any
   regulariser or distillation term);
3. ``after_task(ctx)`` -- after training (fill the exemplar memory, estimate importances, ...).

``train_items(ctx)`` says what the task trains on (by default: the task's bags plus every memory
entry). Strategies keep their own state in ``state_dict()`` (tensors and plain values, saved with
``torch.save`` and read back with ``weights_only=True``) so a stream can be resumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from feature_cache.config import check_keys
from feature_cache.errors import InvalidArgumentError
from milcore.continual.data import BagData, Items, TrainBatch
from milcore.continual.memory import ExemplarMemory
from milcore.continual.scenarios import Scenario
from milcore.models.output import MILOutput


@dataclass
class StrategyContext:
    """What the hooks see.

    Attributes:
        task: index of the current task.
        scenario: the stream.
        data: cached bank access.
        model: the aggregator being trained (head already sized for ``num_classes``).
        memory: the exemplar memory (strategies with ``uses_memory``), else None.
        num_classes: classes seen up to and including this task.
        device: the training device.
        seed: the run's seed.
    """

    task: int
    scenario: Scenario
    data: BagData
    model: torch.nn.Module
    memory: ExemplarMemory | None
    num_classes: int
    device: torch.device
    seed: int

    def current_items(self) -> Items:
        """The current task's training bags."""
        t = self.scenario.tasks[self.task]
        return Items.bags(t.train_ids, t.train_labels)

    def memory_items(self) -> Items:
        """Every memory entry as a pseudo-bag."""
        if self.memory is None or len(self.memory) == 0:
            return Items()
        m = self.memory
        return Items(list(m.bag_ids), m.labels.copy(), [m.entry_rows(e).copy() for e in range(len(m))],
                     np.ones(len(m), dtype=bool))  # fmt: skip


class Strategy:
    """Base strategy: plain fine-tuning on the current task (override the hooks).

    Args:
        **options: strategy options from the configuration (unknown ones are an error).
    """

    name: ClassVar[str] = ""
    uses_memory: ClassVar[bool] = False
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        try:
            check_keys(options, self.options, "option")
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"strategy {self.name!r}: {exc}") from None
        self.opts = {**self.options, **options}

    def before_task(self, ctx: StrategyContext) -> None:
        """Called before training task ``ctx.task``."""
        return None

    def train_items(self, ctx: StrategyContext) -> Items:
        """What the task trains on: its bags, plus the memory's pseudo-bags when there is one."""
        return ctx.current_items() + ctx.memory_items()

    def loss(self, model: torch.nn.Module, batch: TrainBatch, out: MILOutput) -> torch.Tensor:
        """Class-weighted bag cross-entropy (plus the model's own auxiliary losses)."""
        loss = F.cross_entropy(out.logits.float(), batch.y, weight=batch.class_weights)
        for aux in out.aux_losses.values():
            loss = loss + aux.float()
        return loss

    def after_task(self, ctx: StrategyContext) -> None:
        """Called after training task ``ctx.task``."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        return None
