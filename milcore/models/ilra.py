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

The cells stay **packed** (no padding): the token-wise layers run once on the ``(N, .)`` rows of the whole
batch and each attention runs on the bag's own rows (a segment softmax over ``ptr`` and one product per bag
where the latent tokens or the seed read the cells, ``(H, n_b, r)`` products bag by bag where the cells read
their bag's latent tokens), instead of padding every bag to the batch's largest: 1.70x fewer CPU seconds in
the full benchmark (``benchmarks/README.md``, issue 18 speed). Where a few shared queries read the cells, the
key and value projection is folded into the queries (:meth:`_Block.gather`): the same function with a quarter
of the products on the 1,280-d cells of the first block. An empty bag is given a single zero row (as the padded
form of the reference would see it), which gives it a finite embedding independent of the other bags.
Defaults are the reference's released configuration (2 layers, 256 wide, 8 heads, LayerNorm) except
``rank``: the released configuration uses a single latent token (``topk: 1``), here 8 (searchable over 1-64).
Queries of the attention proper are ``W_q`` applied to ``q`` and its keys and values one linear map of
the keys (the reference composes two linear maps there, ``fc_k`` then the ``nn.MultiheadAttention``
input projection: the same function class).
"""

from __future__ import annotations

import itertools
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
from milcore.ops import segment_softmax, segment_sum, weighted_segment_sum

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
    """The reference's multi-head block: ``q = W_q Q``; ``O = LN(q + MHA(q, K))``; ``LN(O + ReLU(W_o O))``.

    Two packed forms: :meth:`gather` (a few queries shared by every bag attend to each bag's rows) and
    :meth:`scatter` (every row attends to a few tokens of its own bag).
    """

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

    def _finish(self, query: Tensor, q0: Tensor, attended: Tensor) -> Tensor:
        """``LN(q0 + W_out a)``, ``LN(o + ReLU(W_o o))`` and the gate, on ``(.., E)`` rows."""
        o = self.ln0(q0 + self.out(attended))
        o = self.ln1(o + F.relu(self.fc_o(o)))
        return o * self.gate(query) if self.gate is not None else o

    def gather(self, query: Tensor, keys: Tensor, ptr: list[int], weights: bool = False):
        """``(Q, dq)`` queries shared by every bag attend to the packed ``(N, dk)`` rows of each bag ``ptr``
        -> ``(B, Q, E)`` (and each row's ``(N, H, Q)`` float32 attention weights when ``weights``).

        The key and value projection is folded into the ``H Q`` shared queries instead of being applied to every
        row: the logits are ``<W_k^h^T q_h, k_i>`` (the key bias moves all of a query's logits by one constant,
        which the softmax ignores) and the output ``W_v^h sum_i a_i k_i + b_v^h sum_i a_i``, so each row meets
        ``H Q`` vectors (64 by default) instead of a ``(dk, 2E)`` projection: on the 1,280-d cells of the first
        block a quarter of the products, the same function.
        """
        nq, heads = query.shape[0], self.heads
        q0 = self.fc_q(query)  # (Q, E)
        width = q0.shape[1]
        d = width // heads
        q = self.q(q0).view(nq, heads, d)  # (Q, H, d)
        w_k, w_v = self.kv.weight.split(width)  # (E, dk) each; rows h*d .. h*d + d - 1 belong to head h
        probe = torch.einsum("qhd,hdk->hqk", q, w_k.view(heads, d, -1)).reshape(heads * nq, -1) * d**-0.5  # (HQ, dk)
        offsets = torch.tensor(ptr, device=keys.device)
        if weights:  # the reported attention: logits in float32 (or wider)
            acc = torch.promote_types(keys.dtype, torch.float32)
            with torch.autocast(keys.device.type, enabled=False):
                logits = keys.to(acc) @ probe.to(acc).T  # (N, H*Q)
        else:
            logits = F.linear(keys, probe)  # (N, H*Q)
        att = segment_softmax(logits, offsets)  # (N, H*Q), at least float32; sums to 1 per bag and column
        dropped = F.dropout(att, self.p, self.training)
        pooled = weighted_segment_sum(keys, dropped, offsets).view(-1, heads, nq, keys.shape[1])  # (B, H, Q, dk)
        out = torch.einsum("bhqk,hdk->bqhd", pooled, w_v.view(heads, d, -1))  # (B, Q, H, d)
        mass = segment_sum(dropped, offsets).view(-1, heads, nq).transpose(1, 2).unsqueeze(-1)  # (B, Q, H, 1)
        out = out + mass.to(out.dtype) * self.kv.bias[width:].view(heads, d).to(out.dtype)  # the value bias
        o = self._finish(query, q0, out.reshape(-1, nq, width))  # (B, Q, E)
        if not weights:
            return o
        return o, att.view(-1, heads, nq).float()  # (N, H, Q)

    def scatter(self, rows: Tensor, tokens: Tensor, ptr: list[int]) -> Tensor:
        """Packed ``(N, dq)`` rows each attend to the ``(B, T, dk)`` tokens of their own bag -> ``(N, E)``."""
        n, heads = rows.shape[0], self.heads
        q0 = self.fc_q(rows)  # (N, E)
        q = self.q(q0).view(n, heads, -1).transpose(0, 1)  # (H, N, d)
        scale = q.shape[-1] ** -0.5
        num_bags, t = tokens.shape[:2]
        k, v = self.kv(tokens).view(num_bags, t, 2, heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, T, d) each
        outs = []
        sizes = [b - a for a, b in itertools.pairwise(ptr)]
        for qb, kb, vb in zip(q.split(sizes, dim=1), k.unbind(0), v.unbind(0), strict=True):  # split, not slices
            if qb.shape[1]:
                att = ((qb @ kb.transpose(-1, -2)) * scale).softmax(-1)  # (H, n, T)
                outs.append(F.dropout(att, self.p, self.training).to(v.dtype) @ vb)  # (H, n, d)
        attended = torch.cat(outs, dim=1).transpose(0, 1).reshape(n, -1) if outs else q0  # (N, E)
        return self._finish(rows, q0, attended)


class _GAB(nn.Module):
    """Gated attention block: latent tokens gather the bag (``H = MHA(L, X)``), cells read them back."""

    def __init__(self, dim_in: int, config: ILRAConfig) -> None:
        super().__init__()
        self.latent = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, config.rank, config.embed_dim)))
        self.forward_block = _Block(config.embed_dim, dim_in, config, gated=True)
        self.backward_block = _Block(dim_in, config.embed_dim, config, gated=True)

    def forward(self, x: Tensor, ptr: list[int]) -> Tensor:
        """Packed ``(N, D)`` rows of the bags ``ptr`` -> ``(N, E)``."""
        h = self.forward_block.gather(self.latent[0].to(x.dtype), x, ptr)  # (B, r, E) low-rank projection of each bag
        return self.backward_block.scatter(x, h, ptr)  # (N, E) every cell attends to its bag's r latent tokens


@register_aggregator("ilra", config=ILRAConfig)
class ILRA(MILAggregator):
    """ILRA-MIL (Xiang et al. 2023): stacked low-rank latent attention blocks, non-local seed pooling."""

    casts_input_first = True  # x is read only through autocast_input(x)
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
        tokens = autocast_input(x)  # (N, D)
        sizes = ptr[1:] - ptr[:-1]
        real = None
        empty = sizes == 0
        if bool(empty.any()):  # an empty bag gets one zero row (dropped from the attention at the end)
            ptr = F.pad(sizes.clamp(min=1).cumsum(0), (1, 0))
            real = torch.ones(int(ptr[-1]), dtype=torch.bool, device=x.device)
            real[ptr[:-1][empty]] = False
            tokens = tokens.new_zeros(len(real), tokens.shape[1]).index_copy(0, real.nonzero().squeeze(1), tokens)
        offsets = ptr.tolist()
        for block in self.blocks:
            tokens = block(tokens, offsets)  # (N, E)
        pooled, att = self.pooling.gather(self.seed[0].to(tokens.dtype), tokens, offsets, weights=True)  # (B, 1, E)
        embedding = pooled[:, 0]  # (B, E)
        att = att[:, :, 0].mean(1)  # (N,) the seed's attention, heads averaged
        return MILOutput(self.head(embedding), att if real is None else att[real], embedding)

    def _resize_head(self, num_classes: int) -> None:
        self.head = resize_linear(self.head, num_classes)
