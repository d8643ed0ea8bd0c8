"""ILRA-MIL: iterative low-rank attention -- cells exchange information through a few learned latent tokens.

Reference:
    Xiang, Wang, Zhang, Yang, Huang, Han. "Exploring Low-Rank Property in Multiple Instance Learning for
    Whole Slide Image Classification." ICLR 2023 (ILRA-MIL).

Self-attention among ``n`` cells costs ``n^2``; ILRA replaces it by a **gated attention block** (GAB)
through a learnable low-rank latent matrix ``L`` (``rank`` tokens): the latent tokens attend to the
bag's cells (``H = MHA(L, X)``, a projection of the bag onto ``rank`` dimensions) and every cell attends
back to them (``X' = MHA(X, H)``), so information flows between cells at cost ``n * rank``. Each
multi-head block is the reference's: ``O = q + Attn(q, K, V)`` with ``q = W_q Q``, then
``LN(O + ReLU(W_o O))``, gated by ``SiLU(W_g Q)`` in the GAB. ``num_layers`` GABs are stacked; a
**non-local pooling** block -- one learned seed token attending to the cells -- gives the bag embedding
and a linear classifier the logits. The reported attention is the seed's attention to the cells (softmax
over the bag, averaged over heads), which sums to 1 per bag.

Dense by nature (cross-attention between a bag and a few tokens), so the cells are padded once
(``to_padded``) and every attention masks the padding; an empty bag attends to its padding row (a zero
vector), which gives it a finite embedding independent of the other bags. Defaults are the reference's
released configuration (2 layers, 256 wide, 8 heads, LayerNorm) except ``rank``: the released
configuration uses a single latent token (``topk: 1``), here 8 (searchable over 1-64).
Queries of the attention proper are ``W_q`` applied to ``q`` and its keys and values one linear map of
the keys (the reference composes two linear maps there, ``fc_k`` then the ``nn.MultiheadAttention``
input projection: the same function class).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feature_cache.errors import InvalidArgumentError
from milcore.models.base import AggregatorConfig, MILAggregator, check_range
from milcore.models.layers import autocast_input, resize_linear
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.models.search import SearchDim, declare_space
from milcore.ops import to_padded

__all__ = ["ILRA", "ILRAConfig"]


@dataclass(frozen=True)
class ILRAConfig(AggregatorConfig):
    """ILRA-MIL hyper-parameters.

    Attributes:
        embed_dim: token width (the reference's ``hidden_feat``).
        num_layers: gated attention blocks.
        num_heads: attention heads (``embed_dim`` must be divisible by it).
        rank: latent tokens of each block (the rank of the low-rank attention).
        layer_norm: LayerNorm inside the attention blocks.
        dropout: dropout on the attention weights.
    """

    embed_dim: int = 256
    num_layers: int = 2
    num_heads: int = 8
    rank: int = 8
    layer_norm: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_range("embed_dim", self.embed_dim, 1, integer=True)
        check_range("num_layers", self.num_layers, 1, integer=True)
        check_range("num_heads", self.num_heads, 1, integer=True)
        if self.embed_dim % self.num_heads:
            raise InvalidArgumentError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        check_range("rank", self.rank, 1, integer=True)
        check_range("dropout", self.dropout, 0.0, 0.99)


class _Block(nn.Module):
    """The reference's multi-head block: ``q = W_q Q``; ``O = LN(q + MHA(q, K))``; ``LN(O + ReLU(W_o O))``."""

    def __init__(self, dim_q: int, dim_k: int, config: ILRAConfig, gated: bool) -> None:
        super().__init__()
        e = config.embed_dim
        self.heads, self.p = config.num_heads, config.dropout
        self.fc_q = nn.Linear(dim_q, e)
        self.q = nn.Linear(e, e)
        self.kv = nn.Linear(dim_k, 2 * e)
        self.out = nn.Linear(e, e)
        self.fc_o = nn.Linear(e, e)
        self.ln0 = nn.LayerNorm(e) if config.layer_norm else nn.Identity()
        self.ln1 = nn.LayerNorm(e) if config.layer_norm else nn.Identity()
        self.gate = nn.Sequential(nn.Linear(dim_q, e), nn.SiLU()) if gated else None

    def forward(self, query: Tensor, keys: Tensor, key_mask: Tensor | None, weights: bool = False):
        """``(B, Q, dq)`` queries, ``(B, L, dk)`` keys, ``(B, L)`` mask -> ``(B, Q, E)`` (and the ``(B, H, Q, L)``
        attention weights when ``weights``)."""
        b, nq, nk = query.shape[0], query.shape[1], keys.shape[1]
        q0 = self.fc_q(query)  # (B, Q, E)
        q = self.q(q0).view(b, nq, self.heads, -1).transpose(1, 2)  # (B, H, Q, d)
        k, v = self.kv(keys).view(b, nk, 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, L, d) each
        mask = None if key_mask is None else key_mask.view(b, 1, 1, nk)
        p = self.p if self.training else 0.0
        att = None
        if weights:
            with torch.autocast(query.device.type, enabled=False):
                scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Q, L)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                att = scores.softmax(-1)
            a = F.dropout(att, p, self.training).to(v.dtype) @ v  # (B, H, Q, d)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, Q, d)
        o = self.ln0(q0 + self.out(a.transpose(1, 2).reshape(b, nq, -1)))  # (B, Q, E)
        o = self.ln1(o + F.relu(self.fc_o(o)))
        if self.gate is not None:
            o = o * self.gate(query)
        return (o, att) if weights else o


class _GAB(nn.Module):
    """Gated attention block: latent tokens gather the bag (``H = MHA(L, X)``), cells read them back."""

    def __init__(self, dim_in: int, config: ILRAConfig) -> None:
        super().__init__()
        self.latent = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, config.rank, config.embed_dim)))
        self.forward_block = _Block(config.embed_dim, dim_in, config, gated=True)
        self.backward_block = _Block(dim_in, config.embed_dim, config, gated=True)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        latent = self.latent.expand(x.shape[0], -1, -1).to(x.dtype)  # (B, r, E)
        h = self.forward_block(latent, x, mask)  # (B, r, E) low-rank projection of the bag
        return self.backward_block(x, h, None)  # (B, L, E) every cell attends to the r latent tokens


@register_aggregator("ilra", config=ILRAConfig)
class ILRA(MILAggregator):
    """ILRA-MIL (Xiang et al. 2023): stacked low-rank latent attention blocks, non-local seed pooling."""

    search_space = declare_space(
        embed_dim=SearchDim(choices=(64, 128, 256, 512)),
        num_layers=SearchDim(1, 3),
        num_heads=SearchDim(choices=(1, 4, 8)),
        rank=SearchDim(1, 64, log=True),
    )

    def __init__(self, config: ILRAConfig) -> None:
        super().__init__(config)
        e = config.embed_dim
        self.blocks = nn.ModuleList(_GAB(config.in_dim if i == 0 else e, config) for i in range(config.num_layers))
        self.seed = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, e)))
        self.pooling = _Block(e, e, config, gated=False)
        self.head = nn.Linear(e, config.num_classes)

    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        tokens, mask = to_padded(autocast_input(x), ptr, index)  # (B, L, D), (B, L)
        if tokens.shape[1] == 0:  # every bag is empty: one padding row to attend to
            tokens, mask = F.pad(tokens, (0, 0, 0, 1)), F.pad(mask, (0, 1))
        keys = mask | ~mask.any(dim=1, keepdim=True)  # an empty bag attends to its (zero) padding
        for block in self.blocks:
            tokens = block(tokens, keys)  # (B, L, E)
        seed = self.seed.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        pooled, att = self.pooling(seed, tokens, keys, weights=True)  # (B, 1, E), (B, H, 1, L)
        embedding = pooled[:, 0]  # (B, E)
        return MILOutput(self.head(embedding), att[:, :, 0].mean(1)[mask], embedding)

    def _resize_head(self, num_classes: int) -> None:
        self.head = resize_linear(self.head, num_classes)
