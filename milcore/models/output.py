"""The one return type of every aggregator."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["MILOutput"]


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
