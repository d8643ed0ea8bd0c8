"""The one return type of every aggregator."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["MILOutput", "check_output_contract"]


@dataclass
class MILOutput:
    """What every aggregator's ``forward`` returns, whatever the model or its flags.

    Attributes:
        logits: ``(B, C)`` bag logits (multi-class; a binary task has ``C == 2``).
        attention: ``(N,)`` or ``(N, H)`` float32 weights aligned with the input rows; each column sums
            to 1 within every non-empty bag (an empty bag owns no rows).
        embedding: ``(B, E)`` bag embedding fed to the classifier (what BEL pulls and pushes); ``E``
            does not change when :meth:`~milcore.models.base.MILAggregator.reset_head` grows the head.
        aux_losses: auxiliary losses by name, already multiplied by their configured weights, to be
            added to the bag loss by the trainer (``sum(out.aux_losses.values())``). Label-dependent ones
            are present only when ``labels`` was passed to ``forward``.
        instance_scores: extra per-row tensors aligned with the input rows, by name (e.g. ``"logits"``
            ``(N, C)`` instance logits, ``"anomaly"`` ``(N,)`` AMiL anomaly scores); may be empty.
    """

    logits: Tensor
    attention: Tensor
    embedding: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    instance_scores: dict[str, Tensor] = field(default_factory=dict)


def check_output_contract(out: object, ptr: Tensor, num_classes: int, *, where: str = "model",
                          atol: float = 1e-2, finite: bool = True) -> MILOutput:  # fmt: skip
    """Return ``out`` if it honours the :class:`MILOutput` contract for the batch ``ptr`` cuts, else raise.

    What any module trained or run by milcore must return (a registered aggregator or a user's own
    ``nn.Module``): a :class:`MILOutput` whose ``logits`` are ``(B, C)``, ``embedding`` ``(B, E)`` and
    ``attention`` ``(N,)`` or ``(N, H)``, all finite, each attention column summing to 1 within every
    non-empty bag. Checked on one batch (the trainer's first), so the cost is one segment sum.

    Args:
        out: what ``forward(x, ptr, ...)`` returned.
        ptr: (B+1,) offsets of the batch.
        num_classes: expected ``C``.
        where: how the message names the module.
        atol: tolerance of the per-bag attention sums (loose enough for bfloat16).
        finite: also refuse NaN/Inf outputs (a caller that reports them with more context passes False).

    Raises:
        InvalidArgumentError: one line naming what is wrong.
    """
    import torch

    from feature_cache.errors import InvalidArgumentError

    lead = f"{where}: forward breaks the MILOutput contract"
    if not isinstance(out, MILOutput):
        raise InvalidArgumentError(f"{lead}: it returned {type(out).__name__}, not milcore.models.MILOutput"
                                   "(logits, attention, embedding)")  # fmt: skip
    bags, rows = int(ptr.numel()) - 1, int(ptr[-1])
    problems = []
    for name, value in (("logits", out.logits), ("attention", out.attention), ("embedding", out.embedding)):
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name} is {type(value).__name__}, not a tensor")
    if problems:
        raise InvalidArgumentError(f"{lead}: {'; '.join(problems)}")
    if tuple(out.logits.shape) != (bags, num_classes):
        problems.append(f"logits {tuple(out.logits.shape)}, expected ({bags}, {num_classes}) (bags, classes)")
    if out.embedding.dim() != 2 or out.embedding.shape[0] != bags:
        problems.append(f"embedding {tuple(out.embedding.shape)}, expected ({bags}, E)")
    if out.attention.dim() not in (1, 2) or out.attention.shape[0] != rows:
        problems.append(f"attention {tuple(out.attention.shape)}, expected ({rows},) or ({rows}, H): one row per cell")
    if problems:
        raise InvalidArgumentError(f"{lead}: {'; '.join(problems)}")
    for name, value in (("logits", out.logits), ("attention", out.attention), ("embedding", out.embedding)):
        if finite and not bool(torch.isfinite(value).all()):
            raise InvalidArgumentError(f"{lead}: {name} contain NaN or Inf")
    att = out.attention.detach().float().reshape(rows, -1)  # (N, H)
    sizes = (ptr[1:] - ptr[:-1]).to(att.device)
    index = torch.repeat_interleave(torch.arange(bags, device=att.device), sizes)  # (N,)
    sums = torch.zeros(bags, att.shape[1], device=att.device).index_add_(0, index, att)  # (B, H)
    off = ((sums - 1).abs() > atol) & (sizes > 0)[:, None]
    if bool(off.any()):
        bag, head = (int(v) for v in off.nonzero()[0])
        col = f" (column {head})" if att.shape[1] > 1 else ""
        raise InvalidArgumentError(f"{lead}: attention of bag {bag}{col} sums to {float(sums[bag, head]):.4g}; it must "
                                   "sum to 1 within every bag (a softmax over the bag's rows: "
                                   "milcore.ops.segment_softmax)")  # fmt: skip
    return out
