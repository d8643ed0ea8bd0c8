"""Regularisation strategies without a memory: ``ewc`` and ``lwf``.

- EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks"): a quadratic
  penalty ``lambda/2 * sum_k F_k (theta_k - theta*_k)^2`` with the diagonal empirical Fisher ``F``
  (squared per-bag gradients of the log-likelihood), accumulated over tasks. A grown head is compared
  on its old rows only.
- LwF (Li and Hoiem 2017, "Learning without Forgetting"): distillation of the previous model's
  softened outputs over the old classes, ``alpha * T^2 * KL(p_old^T || p_new^T)``.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from milcore.continual.data import TrainBatch
from milcore.continual.strategies.base import Strategy, StrategyContext
from milcore.continual.strategies.registry import register_strategy
from milcore.models.output import MILOutput


def _overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The common leading slice of two tensors whose first dim may differ (a grown head)."""
    n = min(a.shape[0], b.shape[0]) if a.dim() else 0
    return (a[:n], b[:n]) if a.dim() else (a, b)


@register_strategy("ewc")
class EWC(Strategy):
    """Elastic Weight Consolidation with a diagonal empirical Fisher.

    Options:
        lam: penalty weight ``lambda``.
    """

    options: ClassVar[dict[str, Any]] = {"lam": 1000.0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.fisher: dict[str, torch.Tensor] = {}
        self.star: dict[str, torch.Tensor] = {}

    def loss(self, model: torch.nn.Module, batch: TrainBatch, out: MILOutput) -> torch.Tensor:
        loss = super().loss(model, batch, out)
        if not self.fisher:
            return loss
        penalty = loss.new_zeros(())
        for name, p in model.named_parameters():
            if name in self.fisher:
                cur, star = _overlap(p, self.star[name].to(p.device))
                fisher, _ = _overlap(self.fisher[name].to(p.device), cur)
                penalty = penalty + (fisher * (cur - star) ** 2).sum()
        return loss + 0.5 * float(self.opts["lam"]) * penalty

    def after_task(self, ctx: StrategyContext) -> None:
        model, items = ctx.model, ctx.current_items()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        model.eval()
        for k in range(len(items)):  # one bag at a time: per-sample gradients
            x = ctx.data.item_x(items, k).to(ctx.device)
            ptr = torch.tensor([0, len(x)], device=ctx.device)
            model.zero_grad(set_to_none=True)
            out = model(x, ptr)
            logp = F.log_softmax(out.logits.float(), dim=1)[0, int(items.labels[k])]
            logp.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2
        model.zero_grad(set_to_none=True)
        model.train()
        for n, f in fisher.items():
            f /= max(len(items), 1)
            if n in self.fisher:  # accumulate over tasks (a grown head: add on the old rows)
                old = self.fisher[n].to(f.device)
                k = min(old.shape[0], f.shape[0]) if f.dim() else None
                if k is None:
                    f += old
                else:
                    f[:k] += old[:k]
            self.fisher[n] = f.detach().cpu()
            self.star[n] = params[n].detach().cpu().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": dict(self.fisher), "star": dict(self.star)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = dict(state.get("fisher", {}))
        self.star = dict(state.get("star", {}))


class Distillation:
    """Knowledge distillation from a frozen copy of the model taken before each task (LwF, iCaRL).

    Args:
        alpha: weight of the distillation term.
        temperature: softening temperature ``T``.
    """

    def __init__(self, alpha: float, temperature: float) -> None:
        self.alpha, self.temperature = alpha, temperature
        self.old: torch.nn.Module | None = None
        self.old_classes = 0

    def snapshot(self, ctx: StrategyContext) -> None:
        """Freeze the model as it was after the previous task."""
        if ctx.task == 0:
            self.old = None
            return
        self.old_classes = ctx.scenario.seen_classes(ctx.task - 1)
        self.old = copy.deepcopy(ctx.model).eval()
        for p in self.old.parameters():
            p.requires_grad_(False)

    def term(self, batch: TrainBatch, out: MILOutput) -> torch.Tensor:
        """``alpha * T^2 * KL(p_old || p_new)`` over the old classes (0 before the second task)."""
        if self.old is None or self.alpha == 0:
            return out.logits.new_zeros(())
        t, c = self.temperature, self.old_classes
        with torch.no_grad():
            target = F.softmax(self.old(batch.x, batch.ptr).logits.float()[:, :c] / t, dim=1)
        logp = F.log_softmax(out.logits.float()[:, :c] / t, dim=1)
        return self.alpha * t * t * F.kl_div(logp, target, reduction="batchmean")


class Distilling:
    """Mixin (before a :class:`Strategy` base) adding :class:`Distillation` to that base's loss.

    Options:
        alpha: distillation weight; temperature: softening temperature.
    """

    options: ClassVar[dict[str, Any]] = {"alpha": 1.0, "temperature": 2.0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.distill = Distillation(float(self.opts["alpha"]), float(self.opts["temperature"]))

    def before_task(self, ctx: StrategyContext) -> None:
        super().before_task(ctx)
        self.distill.snapshot(ctx)

    def loss(self, model: torch.nn.Module, batch: TrainBatch, out: MILOutput) -> torch.Tensor:
        return super().loss(model, batch, out) + self.distill.term(batch, out)


@register_strategy("lwf")
class LwF(Distilling, Strategy):
    """Learning without Forgetting: distil the previous model's outputs on the new task's data.

    Options:
        alpha: distillation weight; temperature: softening temperature.
    """
