"""DSMIL: dual-stream MIL with a critical-instance stream and an attention stream.

Reference:
    Li, Li, Eliceiri. "Dual-stream Multiple Instance Learning Network for Whole Slide Image
    Classification with Self-supervised Contrastive Learning." CVPR 2021.

Stream 1 (max pooling): an instance classifier scores every instance per class; the bag's class score is
the max over its instances, and the argmax is the class's *critical instance* ``m_c``.
Stream 2 (attention): queries ``q_i`` and values ``v_i``; the attention of instance ``i`` for class ``c``
is ``softmax_i(<q_i, q_{m_c}> / sqrt(Q))`` within the bag; ``b_c = sum_i U_ic v_i`` and a ``Conv1d`` over
the ``C x V`` matrix gives the bag scores. ``logits = (max stream + attention stream) / 2`` as in the
reference prediction; with ``labels`` the max-stream cross-entropy is added to ``aux_losses`` as
``"max_instance"`` (weighted by ``max_loss_weight``; the reference trains with 0.5 bag + 0.5 max).

``attention`` is ``(N, C)``: one column per class, each summing to 1 within a bag. ``embedding`` is the
mean over classes of ``b_c`` (``(B, V)``). Permutation invariant (up to exact ties of the instance
scores); memory linear in the bag size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcore.models.base import AggregatorConfig, MILAggregator, check_range
from milcore.models.layers import autocast_input, instance_embedding, resize_linear
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.models.search import SearchDim, declare_space
from milcore.ops import (
    segment_argmax,
    segment_inner,
    segment_max,
    segment_softmax,
    weighted_segment_sum,
)

__all__ = ["DSMIL", "DSMILConfig"]


@dataclass(frozen=True)
class DSMILConfig(AggregatorConfig):
    """DSMIL hyper-parameters.

    Attributes:
        embed_dim: instance embedding width (``Linear -> ReLU``); 0 uses the features directly, as the
            reference does with pre-extracted features.
        query_dim: width ``Q`` of the queries.
        value_dim: width ``V`` of the values (0: the embedding itself, as in the reference).
        dropout: dropout on the values.
        max_loss_weight: weight of the max-stream loss added to ``aux_losses`` when labels are given.
    """

    embed_dim: int = 256
    query_dim: int = 128
    value_dim: int = 0
    dropout: float = 0.0
    max_loss_weight: float = 0.5

    def validate(self) -> None:
        super().validate()
        check_range("embed_dim", self.embed_dim, 0, integer=True)
        check_range("query_dim", self.query_dim, 1, integer=True)
        check_range("value_dim", self.value_dim, 0, integer=True)
        check_range("dropout", self.dropout, 0.0, 0.99)
        check_range("max_loss_weight", self.max_loss_weight, 0.0)


@register_aggregator("dsmil", config=DSMILConfig)
class DSMIL(MILAggregator):
    """Dual-stream MIL (Li et al. 2021): critical-instance max stream + per-class attention stream."""

    casts_input_first = True  # x is read only through autocast_input(x)
    search_space = declare_space(
        embed_dim=SearchDim(64, 512, log=True),
        query_dim=SearchDim(32, 256, log=True),
        max_loss_weight=SearchDim(0.1, 1.0),
    )

    def __init__(self, config: DSMILConfig) -> None:
        super().__init__(config)
        dim = config.embed_dim or config.in_dim
        self.embed = instance_embedding(config.in_dim, config.embed_dim, 0.0)
        self.instance_head = nn.Linear(dim, config.num_classes)
        self.query = nn.Sequential(
            nn.Linear(dim, config.query_dim), nn.ReLU(), nn.Linear(config.query_dim, config.query_dim), nn.Tanh()
        )
        self.value_dim = config.value_dim or dim
        value: list[nn.Module] = [nn.Dropout(config.dropout)] if config.dropout > 0 else []
        if config.value_dim:
            value += [nn.Linear(dim, config.value_dim), nn.ReLU()]
        self.value = nn.Sequential(*value) if value else nn.Identity()
        # the reference's Conv1d(C, C, kernel=V) over the (C, V) bag matrix, as the equivalent Linear(C*V, C)
        self.bag_head = nn.Linear(config.num_classes * self.value_dim, config.num_classes)

    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        h = self.embed(autocast_input(x))  # (N, E)
        inst_logits = self.instance_head(h)  # (N, C)
        max_logits = segment_max(inst_logits, ptr, index)  # (B, C)
        critical = segment_argmax(inst_logits, ptr, index)  # (B, C) global rows, -1 for empty bags
        q = self.query(h)  # (N, Q)
        if q.shape[0]:
            q_crit = q.index_select(0, critical.clamp(min=0).view(-1)).view(*critical.shape, -1)  # (B, C, Q)
        else:  # no rows at all: every bag is empty, the attention stream pools nothing
            q_crit = q.new_zeros(*critical.shape, q.shape[1])
        scores = segment_inner(q, q_crit, ptr, index) / math.sqrt(q.shape[1])  # (N, C)
        att = segment_softmax(scores, ptr, index)  # (N, C)
        v = self.value(h)  # (N, V)
        bag_repr = weighted_segment_sum(v, att, ptr, index)  # (B, C, V)
        bag_logits = self.bag_head(bag_repr.flatten(1))  # (B, C)
        aux = {}
        if labels is not None:
            aux["max_instance"] = self.config.max_loss_weight * F.cross_entropy(max_logits.float(), labels)
        return MILOutput(
            logits=0.5 * (max_logits + bag_logits),
            attention=att,
            embedding=bag_repr.mean(dim=1),
            aux_losses=aux,
            instance_scores={"logits": inst_logits},
        )

    @torch.no_grad()
    def _resize_head(self, num_classes: int) -> None:
        self.instance_head = resize_linear(self.instance_head, num_classes)
        old, v = self.bag_head, self.value_dim
        keep = min(old.out_features, num_classes)
        new = nn.Linear(num_classes * v, num_classes).to(old.weight.device, old.weight.dtype)
        new.weight[:keep].zero_()  # old classes ignore the new classes' blocks: their logits are unchanged
        new.weight[:keep, : keep * v].copy_(old.weight[:keep, : keep * v])
        new.bias[:keep].copy_(old.bias[:keep])
        self.bag_head = new
