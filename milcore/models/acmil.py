"""ACMIL: attention-challenging MIL -- several attention branches, stochastic top-k instance masking.

Reference:
    Zhang, Li, Sun, Zheng, Zhu, Yang. "Attention-Challenging Multiple Instance Learning for Whole Slide
    Image Classification." ECCV 2024 (arXiv 2311.07125, 2023).

Attention MIL tends to put all its weight on a few very discriminative cells and overfits them. ACMIL
challenges the attention two ways:

* **multiple branch attention** (MBA): ``num_branches`` gated-attention branches, each pooling its own
  ``z_k = sum_i a_ik h_i`` scored by its own classifier against the bag label
  (``aux_losses["branches"]``, the mean cross-entropy over branches), and a **diversity** term, the mean
  cosine similarity between the branches' attention maps within each bag (``aux_losses["diversity"]``),
  which pushes the branches to look at different cells;
* **stochastic top-k instance masking** (STKIM), during training only: in every branch the
  ``masked_instances`` cells of highest attention are candidates and a random ``mask_drop`` share of them
  is removed from that branch's softmax, so the model must also learn from the next-best cells.

The bag is classified from the branch-averaged attention ``mean_k a_ik`` (the reported attention, which
sums to 1 per bag), i.e. from the embedding ``mean_k z_k``; ``instance_scores["branch_attention"]`` holds
the ``(N, K)`` branch attentions. Masking is computed over the packed batch at once (per-bag ranks,
:mod:`milcore.models.bag_ranks`). The auxiliary terms are returned when labels are given (training).
Width: ``embed_dim`` 256 as the engine's other aggregators (the reference reduces to 512); its defaults
5 branches, top 10, drop 0.6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcore.models.bag_ranks import bag_sizes_of_rows, segment_rank
from milcore.models.base import AggregatorConfig, MILAggregator, check_range
from milcore.models.layers import GatedAttention, autocast_input, instance_embedding, resize_linear
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.models.search import SearchDim, declare_space
from milcore.ops import segment_softmax, segment_sum, weighted_segment_sum

__all__ = ["ACMIL", "ACMILConfig"]


@dataclass(frozen=True)
class ACMILConfig(AggregatorConfig):
    """ACMIL hyper-parameters.

    Attributes:
        embed_dim: instance embedding width (``Linear -> ReLU``).
        attention_dim: hidden width of the gated attention.
        num_branches: attention branches ``K`` (1: no branch or diversity loss).
        masked_instances: top cells of each branch that may be masked in training (0: no masking).
        mask_drop: share of those cells masked at each step, in ``[0, 1)``.
        branch_loss_weight: weight of the branch classifiers' loss ``aux_losses["branches"]``.
        diversity_loss_weight: weight of the attention-diversity loss ``aux_losses["diversity"]``.
        dropout: dropout after the embedding and inside the attention MLP.
    """

    embed_dim: int = 256
    attention_dim: int = 128
    num_branches: int = 5
    masked_instances: int = 10
    mask_drop: float = 0.6
    branch_loss_weight: float = 1.0
    diversity_loss_weight: float = 1.0
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_range("embed_dim", self.embed_dim, 1, integer=True)
        check_range("attention_dim", self.attention_dim, 1, integer=True)
        check_range("num_branches", self.num_branches, 1, integer=True)
        check_range("masked_instances", self.masked_instances, 0, integer=True)
        check_range("mask_drop", self.mask_drop, 0.0, 1.0, high_open=True)
        check_range("branch_loss_weight", self.branch_loss_weight, 0.0)
        check_range("diversity_loss_weight", self.diversity_loss_weight, 0.0)
        check_range("dropout", self.dropout, 0.0, 0.99)


@register_aggregator("acmil", config=ACMILConfig)
class ACMIL(MILAggregator):
    """ACMIL (Zhang et al. 2023): multi-branch attention with diversity loss and stochastic top-k masking."""

    casts_input_first = True  # x is read only through autocast_input(x)
    search_space = declare_space(
        embed_dim=SearchDim(64, 512, log=True),
        attention_dim=SearchDim(32, 256, log=True),
        num_branches=SearchDim(1, 8),
        masked_instances=SearchDim(0, 30),
        mask_drop=SearchDim(0.1, 0.9),
        diversity_loss_weight=SearchDim(0.1, 2.0, log=True),
    )

    def __init__(self, config: ACMILConfig) -> None:
        super().__init__(config)
        e, k = config.embed_dim, config.num_branches
        self.embed = instance_embedding(config.in_dim, e, config.dropout)
        self.attention = GatedAttention(e, config.attention_dim, k, gated=True, dropout=config.dropout)
        self.branch_heads = nn.ModuleList(nn.Linear(e, config.num_classes) for _ in range(k))
        self.head = nn.Linear(e, config.num_classes)

    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        h = self.embed(autocast_input(x))  # (N, E)
        scores = self.attention(h).float()  # (N, K)
        if self.training and self.config.masked_instances > 0 and h.shape[0]:
            scores = scores.masked_fill(self._stochastic_mask(scores, ptr, index), float("-inf"))
        att = segment_softmax(scores, ptr, index)  # (N, K)
        z = weighted_segment_sum(h, att, ptr, index)  # (B, K, E)
        embedding = z.mean(dim=1)  # (B, E) = pooling with the branch-averaged attention
        aux = {}
        if labels is not None:
            k = self.config.num_branches
            if k > 1:
                branch_logits = torch.stack([head(z[:, j]) for j, head in enumerate(self.branch_heads)], 1)  # (B, K, C)
                loss = F.cross_entropy(branch_logits.flatten(0, 1).float(), labels.repeat_interleave(k))
                aux["branches"] = self.config.branch_loss_weight * loss
                aux["diversity"] = self.config.diversity_loss_weight * _diversity(att, ptr, index)
        return MILOutput(self.head(embedding), att.mean(dim=1), embedding, aux, {"branch_attention": att})

    def _stochastic_mask(self, scores: Tensor, ptr: Tensor, index: Tensor) -> Tensor:
        """``(N, K)`` True for the cells masked at this step: a random share of each branch's top cells."""
        with torch.no_grad():
            size = bag_sizes_of_rows(ptr, index).unsqueeze(1)  # (N, 1)
            top_k = size.clamp(max=self.config.masked_instances)  # (N, 1)
            candidate = segment_rank(scores, ptr, index) < top_k  # (N, K)
            draw = torch.rand(scores.shape, device=scores.device).masked_fill(~candidate, 2.0)  # others rank last
            dropped = torch.floor(top_k * self.config.mask_drop).long()  # (N, 1) < top_k: one cell always stays
            return candidate & (segment_rank(draw, ptr, index, descending=False) < dropped)

    def _resize_head(self, num_classes: int) -> None:
        self.head = resize_linear(self.head, num_classes)
        self.branch_heads = nn.ModuleList(resize_linear(head, num_classes) for head in self.branch_heads)


def _diversity(att: Tensor, ptr: Tensor, index: Tensor) -> Tensor:
    """Mean over bags and branch pairs of the cosine similarity of two branches' attention within a bag."""
    k = att.shape[1]
    gram = segment_sum(att.unsqueeze(2) * att.unsqueeze(1), ptr, index)  # (B, K, K)
    norm = gram.diagonal(dim1=1, dim2=2).clamp_min(1e-24).sqrt()  # (B, K)
    cosine = gram / (norm.unsqueeze(2) * norm.unsqueeze(1))  # (B, K, K)
    pairs = torch.triu(torch.ones(k, k, dtype=torch.bool, device=att.device), diagonal=1)
    nonempty = ptr[1:] > ptr[:-1]
    if not bool(nonempty.any()):
        return att.sum() * 0.0
    return cosine[nonempty][:, pairs].mean()
