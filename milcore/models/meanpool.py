"""Mean-pooling baseline: embed every instance, average within the bag, classify.

Reference:
    Wang, Yan, Tang, et al. "Revisiting Multiple Instance Neural Networks." Pattern Recognition 2018
    (MI-Net, embedding-level pooling; mean pooling is its simplest operator).

Attention is uniform (``1 / n_b`` for every row of bag ``b``). Permutation invariant; memory linear in
the bag size. Mean pooling dilutes a few witness instances among many others, which is why it is the
baseline the attention models must beat when the signal sits in ~5% of the cells.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from milcore.models.base import AggregatorConfig, MILAggregator, check_range
from milcore.models.layers import autocast_input, instance_embedding, resize_linear
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.models.search import SearchDim, declare_space
from milcore.ops import ptr_to_sizes

__all__ = ["MeanPool", "MeanPoolConfig"]


@dataclass(frozen=True)
class MeanPoolConfig(AggregatorConfig):
    """Mean-pooling hyper-parameters.

    Attributes:
        embed_dim: width of the instance embedding ``Linear -> ReLU`` (0: pool the raw features).
        dropout: dropout after the embedding.
    """

    embed_dim: int = 256
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_range("embed_dim", self.embed_dim, 0, integer=True)
        check_range("dropout", self.dropout, 0.0, 0.99)


@register_aggregator("mean", config=MeanPoolConfig)
class MeanPool(MILAggregator):
    """Mean pooling of instance embeddings (baseline)."""

    casts_input_first = True  # x is read only through autocast_input(x)
    search_space = declare_space(embed_dim=SearchDim(64, 512, log=True))  # max pooling inherits it

    def __init__(self, config: MeanPoolConfig) -> None:
        super().__init__(config)
        self.embed = instance_embedding(config.in_dim, config.embed_dim, config.dropout)
        self.head = nn.Linear(config.embed_dim or config.in_dim, config.num_classes)

    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        h = self.embed(autocast_input(x))  # (N, E)
        sizes = ptr_to_sizes(ptr).clamp(min=1)  # (B,)
        embedding = h.new_zeros(sizes.numel(), h.shape[1]).index_add(0, index, h) / sizes.unsqueeze(1)
        attention = 1.0 / sizes.float().index_select(0, index)  # (N,)
        return MILOutput(self.head(embedding), attention, embedding)

    def pool_padded(
        self, x: Tensor, mask: Tensor, ptr: Tensor, coords: Tensor | None, labels: Tensor | None
    ) -> MILOutput:
        h = self.embed(autocast_input(x)) * mask.unsqueeze(-1)  # (B, L, E)
        sizes = ptr_to_sizes(ptr).clamp(min=1)
        embedding = h.sum(dim=1) / sizes.unsqueeze(1)  # (B, E)
        attention = (mask.float() / sizes.float().unsqueeze(1))[mask]  # (N,)
        return MILOutput(self.head(embedding), attention, embedding)

    def _resize_head(self, num_classes: int) -> None:
        self.head = resize_linear(self.head, num_classes)
