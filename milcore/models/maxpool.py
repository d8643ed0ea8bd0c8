"""Max-pooling baseline: embed every instance, take the element-wise max within the bag, classify.

Reference:
    Wang, Yan, Tang, et al. "Revisiting Multiple Instance Neural Networks." Pattern Recognition 2018
    (MI-Net with max pooling).

Attention: the share of the ``E`` embedding dimensions whose max is attained by each row (a tie splits
the dimension evenly between the tied rows), so it sums to 1 within each bag and says which cells the
bag embedding comes from. Permutation invariant; memory linear in the bag size.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from milcore.models.layers import autocast_input
from milcore.models.meanpool import MeanPool, MeanPoolConfig
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.ops import segment_max, segment_sum

__all__ = ["MaxPool", "MaxPoolConfig"]


@dataclass(frozen=True)
class MaxPoolConfig(MeanPoolConfig):
    """Max-pooling hyper-parameters: those of mean pooling (``embed_dim``, ``dropout``)."""


@register_aggregator("max", config=MaxPoolConfig)
class MaxPool(MeanPool):
    """Element-wise max pooling of instance embeddings (baseline); embedding and head as in mean pooling."""

    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        h = self.embed(autocast_input(x))  # (N, E)
        embedding = segment_max(h, ptr, index)  # (B, E)
        winners = (h == embedding.index_select(0, index)).float()  # (N, E) rows attaining each max
        counts = segment_sum(winners, ptr, index).index_select(0, index)  # (N, E)
        attention = (winners / counts.clamp(min=1)).mean(dim=1)  # (N,)
        return MILOutput(self.head(embedding), attention, embedding)

    def pool_padded(
        self, x: Tensor, mask: Tensor, ptr: Tensor, coords: Tensor | None, labels: Tensor | None
    ) -> MILOutput:
        h = self.embed(autocast_input(x)).masked_fill(~mask.unsqueeze(-1), float("-inf"))  # (B, L, E)
        embedding = h.amax(dim=1) if h.shape[1] else h.new_zeros(h.shape[0], h.shape[2])  # (B, E)
        embedding = embedding.masked_fill(~mask.any(dim=1, keepdim=True), 0.0)
        winners = ((h == embedding.unsqueeze(1)) & mask.unsqueeze(-1)).float()  # (B, L, E)
        attention = (winners / winners.sum(dim=1, keepdim=True).clamp(min=1)).mean(dim=2)  # (B, L)
        return MILOutput(self.head(embedding), attention[mask], embedding)
