"""DTFD-MIL: double-tier feature distillation over pseudo-bags.

Reference:
    Zhang, Meng, Zhao, Qiao, Yang, Coupland, Zheng. "DTFD-MIL: Double-Tier Feature Distillation Multiple
    Instance Learning for Histopathology Whole Slide Image Classification." CVPR 2022.

Every bag's cells are split into ``G = min(num_groups, n)`` **pseudo-bags** that inherit the bag's label.
**Tier 1** pools each pseudo-bag with gated attention (``a_i``, a softmax within the pseudo-bag) into
``z_m = sum_i a_i h_i`` and classifies it; its cross-entropy against the parent label is
``aux_losses["tier1"]`` (weighted by ``tier1_loss_weight``; the reference adds the two tiers' losses with
equal weight). A feature is **distilled** from every pseudo-bag and **tier 2** pools the bag's distilled
features with a second gated attention (``b_m``) and classifies the bag (the logits):

* ``distill="afs"`` (attention feature, the reference's default): the distilled feature is ``z_m``
  itself, so the bag embedding is ``sum_m b_m z_m = sum_i (b_m(i) a_i) h_i`` and the reported attention
  ``b_m(i) * a_i`` is exact and sums to 1 per bag;
* ``distill="maxmin"`` (MaxMinS): the ``instances_per_group`` cells with the highest and the lowest
  tier-1 class-activation score (Grad-CAM of a linear classifier: ``softmax_c(W (a_i h_i))`` of the
  pseudo-bag's predicted class) are passed on; tier 2 pools them, and the attention is tier 2's weight
  on each passed cell (0 for the others, summed when a cell is passed twice).

Pseudo-bags **within a packed batch**: rows are ranked within their bag (:mod:`milcore.models.bag_ranks`)
and dealt round-robin into the bag's ``G`` pseudo-bags, which are then packed like bags (``ptr`` over
pseudo-bags, and per bag a ``ptr`` over its pseudo-bags), so both tiers are segment ops over the whole
batch. Training ranks by a random key: a random, near-equal split, as the reference's shuffle. At
inference the reference splits at random too, which makes predictions random; here evaluation ranks by
the tier-1 attention score and deals the cells round-robin, so each pseudo-bag receives an equal share of
the high-attention cells (what a random split gives in expectation), deterministically and independently
of the order of the cells. Width: ``embed_dim`` 256 as the engine's other aggregators (the reference
reduces to 512), no residual blocks (the reference's default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcore.models.bag_ranks import round_robin, segment_rank, split_bags
from milcore.models.base import AggregatorConfig, MILAggregator, check_choice, check_range
from milcore.models.layers import GatedAttention, autocast_input, instance_embedding, resize_linear
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.models.search import SearchDim, declare_space
from milcore.ops import ptr_to_sizes, segment_softmax, weighted_segment_sum

__all__ = ["DTFDMIL", "DTFDMILConfig"]


@dataclass(frozen=True)
class DTFDMILConfig(AggregatorConfig):
    """DTFD-MIL hyper-parameters.

    Attributes:
        embed_dim: instance embedding width (``Linear -> ReLU``; 0: the features themselves).
        attention_dim: hidden width of both tiers' gated attention.
        num_groups: pseudo-bags per bag (a bag of fewer cells has one per cell); the reference uses 4-8.
        distill: ``"afs"`` (the pseudo-bag's attention feature) or ``"maxmin"`` (its top and bottom cells).
        instances_per_group: cells passed on from each end by ``"maxmin"``.
        tier1_loss_weight: weight of the pseudo-bag loss in ``aux_losses["tier1"]``.
        dropout: dropout after the instance embedding and inside the attention MLPs.
    """

    embed_dim: int = 256
    attention_dim: int = 128
    num_groups: int = 4
    distill: str = "afs"
    instances_per_group: int = 1
    tier1_loss_weight: float = 1.0
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_range("embed_dim", self.embed_dim, 0, integer=True)
        check_range("attention_dim", self.attention_dim, 1, integer=True)
        check_range("num_groups", self.num_groups, 1, integer=True)
        check_choice("distill", self.distill, ("afs", "maxmin"))
        check_range("instances_per_group", self.instances_per_group, 1, integer=True)
        check_range("tier1_loss_weight", self.tier1_loss_weight, 0.0)
        check_range("dropout", self.dropout, 0.0, 0.99)


@register_aggregator("dtfd", config=DTFDMILConfig)
class DTFDMIL(MILAggregator):
    """DTFD-MIL (Zhang et al. 2022): pseudo-bags, tier-1 pseudo-bag classifier, tier-2 distilled bag classifier."""

    casts_input_first = True  # x is read only through autocast_input(x)
    search_space = declare_space(
        embed_dim=SearchDim(64, 512, log=True),
        attention_dim=SearchDim(32, 256, log=True),
        num_groups=SearchDim(2, 16),
        distill=SearchDim(choices=("afs", "maxmin")),
        tier1_loss_weight=SearchDim(0.1, 2.0, log=True),
    )

    def __init__(self, config: DTFDMILConfig) -> None:
        super().__init__(config)
        dim = config.embed_dim or config.in_dim
        self.embed = instance_embedding(config.in_dim, config.embed_dim, config.dropout)
        self.attention1 = GatedAttention(dim, config.attention_dim, 1, gated=True, dropout=config.dropout)
        self.head1 = nn.Linear(dim, config.num_classes)
        self.attention2 = GatedAttention(dim, config.attention_dim, 1, gated=True, dropout=config.dropout)
        self.head2 = nn.Linear(dim, config.num_classes)

    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        h = self.embed(autocast_input(x))  # (N, E)
        scores = self.attention1(h)[:, 0]  # (N,) tier-1 attention logits
        sizes = ptr_to_sizes(ptr)  # (B,)
        groups = sizes.clamp(max=self.config.num_groups)  # (B,) pseudo-bags per bag (0 for an empty bag)
        key = torch.rand(h.shape[0], device=h.device) if self.training else scores  # random split / by attention
        part = round_robin(segment_rank(key, ptr, index), groups.index_select(0, index))  # (N,)
        sub = split_bags(ptr, index, groups, part)
        hs = h.index_select(0, sub.order)  # (N, E) pseudo-bags contiguous
        a = segment_softmax(scores.index_select(0, sub.order), sub.ptr)  # (N,) within each pseudo-bag
        z = weighted_segment_sum(hs, a, sub.ptr)[:, 0]  # (P, E) tier-1 pseudo-bag features
        logits1 = self.head1(z)  # (P, C)
        if self.config.distill == "afs":
            b = segment_softmax(self.attention2(z)[:, 0], sub.bag_ptr)  # (P,) within each bag
            embedding = weighted_segment_sum(z, b, sub.bag_ptr)[:, 0]  # (B, E)
            att_sorted = a * b.index_select(0, sub.sub_of_row.index_select(0, sub.order))  # (N,)
            attention = torch.empty_like(att_sorted).index_copy(0, sub.order, att_sorted)
        else:
            embedding, attention = self._maxmin(h, hs, a, logits1, sub, index)
        aux = {}
        if labels is not None and logits1.shape[0]:
            parent = labels.repeat_interleave(groups)  # (P,) each pseudo-bag inherits its bag's label
            aux["tier1"] = self.config.tier1_loss_weight * F.cross_entropy(logits1.float(), parent)
        return MILOutput(self.head2(embedding), attention, embedding, aux, {})

    def _maxmin(self, h: Tensor, hs: Tensor, a: Tensor, logits1: Tensor, sub, index: Tensor) -> tuple[Tensor, Tensor]:
        """MaxMinS: each pseudo-bag passes its top and bottom cells by class activation to tier 2."""
        k = self.config.instances_per_group
        sub_of_sorted = sub.sub_of_row.index_select(0, sub.order)  # (N,)
        with torch.no_grad():
            cam = (a.unsqueeze(1) * hs.float()) @ self.head1.weight.float().T  # (N, C) Grad-CAM of a linear head
            predicted = logits1.argmax(1).index_select(0, sub_of_sorted)  # (N,)
            score = cam.softmax(1).gather(1, predicted.unsqueeze(1))[:, 0]  # (N,)
            rank = segment_rank(score, sub.ptr, sub_of_sorted)  # (N,) within each pseudo-bag
            size = ptr_to_sizes(sub.ptr).index_select(0, sub_of_sorted)  # (N,)
            keep = torch.minimum(size, torch.full_like(size, k))
            picks = torch.cat([(rank < keep).nonzero()[:, 0], (rank >= size - keep).nonzero()[:, 0]])  # sorted rows
            rows = sub.order.index_select(0, picks)  # original rows (a cell may be picked twice)
            bag = index.index_select(0, rows)
            by_bag = torch.sort(bag, stable=True).indices
            rows, bag = rows[by_bag], bag[by_bag]
            ptr2 = F.pad(torch.bincount(bag, minlength=sub.bag_ptr.numel() - 1).cumsum(0), (1, 0))  # (B+1,)
        picked = h.index_select(0, rows)  # (M, E)
        b = segment_softmax(self.attention2(picked)[:, 0], ptr2)  # (M,)
        embedding = weighted_segment_sum(picked, b, ptr2)[:, 0]  # (B, E)
        attention = b.new_zeros(h.shape[0]).index_add(0, rows, b)  # (N,) 0 for cells not passed on
        return embedding, attention

    def _resize_head(self, num_classes: int) -> None:
        self.head1 = resize_linear(self.head1, num_classes)
        self.head2 = resize_linear(self.head2, num_classes)
