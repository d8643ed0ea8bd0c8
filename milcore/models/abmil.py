"""ABMIL: gated attention-based MIL pooling, optionally with one attention branch per class.

References:
    Ilse, Tomczak, Welling. "Attention-based Deep Multiple Instance Learning." ICML 2018.
    Hehr, Sadafi, Matek, et al. "Explainable AI identifies diagnostic cells of genetic AML subtypes."
    PLOS Digital Health 2023 (SCEMILA: multi-attention, one attention column per class).

Per bag ``b``: ``h_i = ReLU(W x_i)``, ``a = softmax_i(w^T (tanh(V h_i) * sigm(U h_i)))``,
``z = sum_i a_i h_i``, ``logits = head(z)``. With ``multi_branch`` the attention has ``C`` columns, each
class ``c`` pools its own ``z_c`` and scores it with its own row of the head. Packed batches: the softmax
and the weighted sum are segment ops over ``ptr``; permutation invariant; exact same output alone or in a
batch. Memory is linear in the bag size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from milcore.models.base import AggregatorConfig, MILAggregator, check_range
from milcore.models.layers import GatedAttention, autocast_input, instance_embedding, resize_linear
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.models.search import SearchDim, declare_space
from milcore.ops import segment_softmax, weighted_segment_sum

__all__ = ["ABMIL", "ABMILConfig"]


@dataclass(frozen=True)
class ABMILConfig(AggregatorConfig):
    """ABMIL hyper-parameters.

    Attributes:
        embed_dim: width of the instance embedding ``Linear -> ReLU``; 0 pools the input features
            directly (Ilse's attention on ``x``, then ``E == in_dim``).
        attention_dim: hidden width ``A`` of the attention MLP.
        gated: gated attention (``tanh * sigmoid``) rather than plain ``tanh``.
        multi_branch: one attention column and one pooled embedding per class (SCEMILA); attention is
            then ``(N, C)``, and the bag embedding is the mean of the per-class embeddings.
        dropout: dropout after the instance embedding and inside the attention MLP.
    """

    embed_dim: int = 256
    attention_dim: int = 128
    gated: bool = True
    multi_branch: bool = False
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_range("embed_dim", self.embed_dim, 0, integer=True)
        check_range("attention_dim", self.attention_dim, 1, integer=True)
        check_range("dropout", self.dropout, 0.0, 0.99)


@register_aggregator("abmil", config=ABMILConfig)
class ABMIL(MILAggregator):
    """Gated attention MIL (Ilse et al. 2018), optional per-class attention branches (SCEMILA)."""

    casts_input_first = True  # x is read only through autocast_input(x)
    search_space = declare_space(
        embed_dim=SearchDim(64, 512, log=True),
        attention_dim=SearchDim(32, 256, log=True),
        gated=SearchDim(choices=(True, False)),
        multi_branch=SearchDim(choices=(False, True)),
    )

    def __init__(self, config: ABMILConfig) -> None:
        super().__init__(config)
        dim = config.embed_dim or config.in_dim
        self.embed = instance_embedding(config.in_dim, config.embed_dim, config.dropout)
        branches = config.num_classes if config.multi_branch else 1
        self.attention = GatedAttention(dim, config.attention_dim, branches, config.gated, config.dropout)
        self.head = nn.Linear(dim, config.num_classes)

    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        h = self.embed(autocast_input(x))  # (N, E)
        scores = self.attention(h)  # (N, K)
        att = segment_softmax(scores, ptr, index)  # (N, K) float32
        z = weighted_segment_sum(h, att, ptr, index)  # (B, K, E)
        return self._output(z, att)

    def pool_padded(
        self, x: Tensor, mask: Tensor, ptr: Tensor, coords: Tensor | None, labels: Tensor | None
    ) -> MILOutput:
        h = self.embed(autocast_input(x))  # (B, L, E)
        scores = self.attention(h).float()  # (B, L, K)
        scores = scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        att = torch.softmax(scores, dim=1).nan_to_num(0.0)  # (B, L, K); an empty bag gives zeros
        z = torch.einsum("blk,ble->bke", att.to(h.dtype), h)  # (B, K, E)
        return self._output(z, att[mask])

    def _output(self, z: Tensor, att: Tensor) -> MILOutput:
        if self.config.multi_branch:
            logits = (z * self.head.weight.to(z.dtype)).sum(-1) + self.head.bias  # (B, C)
            embedding = z.mean(dim=1)  # (B, E)
            attention = att  # (N, C)
        else:
            embedding = z[:, 0]  # (B, E)
            logits = self.head(embedding)  # (B, C)
            attention = att[:, 0]  # (N,)
        return MILOutput(logits=logits, attention=attention, embedding=embedding)

    def _resize_head(self, num_classes: int) -> None:
        self.head = resize_linear(self.head, num_classes)
        if self.config.multi_branch:
            self.attention.score = resize_linear(self.attention.score, num_classes)
