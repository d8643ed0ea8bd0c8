"""RRT-MIL: a region re-embedding transformer (R-MSA within regions, CR-MSA across them), then attention MIL.

Reference:
    Tang, Zhou, Huang, Zhu, Zhang, Liu. "Feature Re-Embedding: Towards Foundation Model-Level Performance
    in Computational Pathology." CVPR 2024 (RRT-MIL).

RRT re-embeds the instance features before an ABMIL-style aggregator: ``h = ReLU(W x)``; a region
multi-head self-attention layer (**R-MSA**: full attention inside each region, with the embedded position
encoding generator **EPEG**, a depthwise ``(epeg_k, 1)`` convolution over the attention logits along the
query axis); a cross-region layer (**CR-MSA**: each region is summarised by ``crmsa_k`` representative
tokens -- softmax-weighted sums of its cells through a learned ``(E, k)`` matrix -- which attend to the
representatives of the other regions, and are dispatched back to the cells with min-max normalised and
softmax-combined weights); pre-norm residuals, a final LayerNorm, then attention pooling (``Linear ->
ReLU -> Linear``, softmax within the bag: the reported attention, which sums to 1) and a linear classifier.

**Regions on a smear.** In a slide a region is a square of neighbouring patches, and neighbours share
tissue context. Cells of a blood smear have no meaningful neighbourhood (where a cell lies on the glass
says nothing about it), so regions are made in **feature space**: each bag's cell embeddings are
projected onto the bag's own first principal direction (8 power iterations on the centred embeddings,
sign fixed so that the largest component is positive; no gradient) and cut, in that order, into
``ceil(n / region_size)`` consecutive regions of near-equal size. A region is thus a group of cells of
similar morphology along the direction in which the bag varies most (a 1-D k-means-like grouping that
needs no iterations to converge and gives equal sizes, so the cost stays linear in the bag size and no
region is padded by more than one cell); R-MSA compares a cell with similar cells, CR-MSA relates the
morphological groups. Inside a region the cells keep their order along the principal direction, which is
the order EPEG convolves over (a feature-space position in place of the slide's spatial one). The
grouping depends only on the features, so the model stays invariant to the order of the cells and a
bag scores the same alone or in a batch. Random fixed-size groups were not used: they would make
predictions random at inference (or depend on the cell order).

Defaults follow the reference (8 heads, EPEG kernel 15, 3 representatives per region, 8 CR-MSA heads,
one R-MSA layer then one CR-MSA layer) with ``embed_dim`` 256 as the engine's other aggregators (the
reference: 512) and no dropout (the engine's convention; the reference: 0.25 on the embedding, 0.1 in
the attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feature_cache.errors import InvalidArgumentError
from milcore.models.bag_ranks import SubBags, contiguous_chunks, segment_rank, split_bags
from milcore.models.base import AggregatorConfig, MILAggregator, check_range
from milcore.models.layers import autocast_input, resize_linear
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.models.search import SearchDim, declare_space
from milcore.ops import (
    ptr_to_sizes,
    segment_max,
    segment_mean,
    segment_softmax,
    segment_sum,
    to_padded,
    weighted_segment_sum,
)

__all__ = ["RRTMIL", "RRTMILConfig", "principal_direction"]

_POWER_ITERATIONS = 8


@dataclass(frozen=True)
class RRTMILConfig(AggregatorConfig):
    """RRT-MIL hyper-parameters.

    Attributes:
        embed_dim: token width (divisible by ``num_heads`` and ``crmsa_heads``).
        num_heads: heads of the region attention (R-MSA).
        region_size: cells per region at most (a bag of ``n`` cells has ``ceil(n / region_size)`` regions).
        epeg_k: kernel of the EPEG convolution over the region attention logits (odd; 0: no EPEG).
        crmsa_k: representative tokens per region in the cross-region attention.
        crmsa_heads: heads of the cross-region attention.
        attention_dim: hidden width of the attention pooling.
        all_shortcut: add the embedding to the re-embedded features before the final LayerNorm.
        dropout: dropout on the embedding and the attention weights.
    """

    embed_dim: int = 256
    num_heads: int = 8
    region_size: int = 64
    epeg_k: int = 15
    crmsa_k: int = 3
    crmsa_heads: int = 8
    attention_dim: int = 128
    all_shortcut: bool = False
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_range("embed_dim", self.embed_dim, 1, integer=True)
        check_range("num_heads", self.num_heads, 1, integer=True)
        check_range("crmsa_heads", self.crmsa_heads, 1, integer=True)
        for heads in ("num_heads", "crmsa_heads"):
            if self.embed_dim % getattr(self, heads):
                raise InvalidArgumentError(
                    f"embed_dim ({self.embed_dim}) must be divisible by {heads} ({getattr(self, heads)})"
                )
        check_range("region_size", self.region_size, 1, integer=True)
        check_range("epeg_k", self.epeg_k, 0, integer=True)
        if self.epeg_k % 2 == 0 and self.epeg_k:
            raise InvalidArgumentError(f"epeg_k must be odd (or 0: no EPEG), got {self.epeg_k}")
        check_range("crmsa_k", self.crmsa_k, 1, integer=True)
        check_range("attention_dim", self.attention_dim, 1, integer=True)
        check_range("dropout", self.dropout, 0.0, 0.99)


class _SelfAttention(nn.Module):
    """Multi-head self-attention over padded groups ``(G, S, E)`` with a ``(G, S)`` mask, optional EPEG."""

    def __init__(self, dim: int, heads: int, epeg_k: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.p = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.epeg = nn.Conv2d(heads, heads, (epeg_k, 1), padding=(epeg_k // 2, 0), groups=heads) if epeg_k else None

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        g, s, dim = x.shape
        if s == 0:  # no rows at all
            return x
        q, k, v = self.qkv(x).view(g, s, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)  # (G, H, S, d)
        p = self.p if self.training else 0.0
        if self.epeg is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(g, 1, 1, s), dropout_p=p)
        else:
            with torch.autocast(x.device.type, enabled=False):  # logits and their convolution in float32
                logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (G, H, S, S)
                logits = logits.masked_fill(~mask.view(g, 1, s, 1), 0.0)  # padding rows read as the conv's zeros
                logits = logits + self._epeg(logits)  # along the query axis
                att = logits.masked_fill(~mask.view(g, 1, 1, s), float("-inf")).softmax(-1)
            out = F.dropout(att, p, self.training).to(v.dtype) @ v  # (G, H, S, d)
        return self.proj(out.transpose(1, 2).reshape(g, s, dim))  # (G, S, E)

    def _epeg(self, logits: Tensor) -> Tensor:
        """``self.epeg(logits)`` (the depthwise ``(k, 1)`` convolution along the query axis, zero padding) as
        a product with each head's ``(S, S)`` banded Toeplitz matrix of the kernel: equal up to float32
        rounding, and cheaper on CPU than oneDNN's depthwise convolution, whose backward pass dominated it
        on the demo cohort's ``(G, 8, 64, 64)`` logits (RRT-MIL's CPU seconds per epoch in the full
        benchmark, same machine state: 0.87 before, 0.82 after; ``benchmarks/README.md``, issue 18 speed)."""
        s, k = logits.shape[-2], self.epeg.kernel_size[0]
        offset = torch.arange(s, device=logits.device)
        tap = offset.unsqueeze(0) - offset.unsqueeze(1) + k // 2  # (S, S): kernel tap of row j for output row i
        inside = (tap >= 0) & (tap < k)
        band = self.epeg.weight[:, 0, :, 0][:, tap.clamp(0, k - 1)] * inside  # (H, S, S)
        return band @ logits + self.epeg.bias.view(1, -1, 1, 1)  # (G, H, S, S)


class _CrossRegion(nn.Module):
    """CR-MSA: ``k`` representatives per region attend across the bag's regions, then return to the cells."""

    def __init__(self, dim: int, heads: int, k: int, dropout: float) -> None:
        super().__init__()
        self.phi = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(k, dim), a=math.sqrt(5)).T.contiguous())
        self.attention = _SelfAttention(dim, heads, 0, dropout)

    def forward(self, xs: Tensor, sub: SubBags, region: Tensor) -> Tensor:
        """``(N, E)`` cells in region order, their regions ``sub``, ``(N,)`` region of every row -> ``(N, E)``."""
        logits = (xs @ self.phi.to(xs.dtype)).float()  # (N, k)
        dispatch = segment_softmax(logits, sub.ptr, region)  # (N, k) within each region
        combine = logits.softmax(dim=1)  # (N, k) over the representatives
        high = segment_max(logits, sub.ptr, region).index_select(0, region)  # (N, k)
        low = -segment_max(-logits, sub.ptr, region).index_select(0, region)
        spread = (logits - low) / (high - low + 1e-8)  # (N, k) min-max within each region
        reps = weighted_segment_sum(xs, dispatch, sub.ptr, region)  # (P, k, E)
        num_bags, k, dim = sub.bag_ptr.numel() - 1, reps.shape[1], reps.shape[2]
        dense, real = to_padded(reps, sub.bag_ptr)  # (B, R, k, E), (B, R)
        if dense.shape[1] == 0:
            return torch.zeros_like(xs)
        keys = real | ~real.any(dim=1, keepdim=True)  # an empty bag attends to its padding
        tokens = dense.permute(0, 2, 1, 3).reshape(num_bags * k, -1, dim)  # (B*k, R, E)
        mixed = self.attention(tokens, keys.repeat_interleave(k, dim=0))  # (B*k, R, E)
        mixed = mixed.view(num_bags, k, -1, dim).permute(0, 2, 1, 3)[real]  # (P, k, E)
        weight = (combine * spread).to(mixed.dtype)  # (N, k)
        return (weight.unsqueeze(-1) * mixed.index_select(0, region)).sum(1)  # (N, E)


@torch.no_grad()
def principal_direction(h: Tensor, ptr: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Each bag's centred rows ``(N, E)`` and its first principal direction ``(B, E)`` (unit norm, largest
    component positive), by power iteration on the bag's covariance (segment sums, no ``E x E`` matrix)."""
    hc = h.float()
    hc = hc - segment_mean(hc, ptr, index).index_select(0, index)  # (N, E) centred within each bag
    v = hc.new_full((ptr.numel() - 1, hc.shape[1]), hc.shape[1] ** -0.5)  # (B, E)
    for _ in range(_POWER_ITERATIONS):
        proj = (hc * v.index_select(0, index)).sum(1, keepdim=True)  # (N, 1)
        v = segment_sum(hc * proj, ptr, index)  # (B, E) = covariance @ v, per bag
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sign = v.gather(1, v.abs().argmax(1, keepdim=True)).sign()  # largest component positive
    return hc, v * torch.where(sign == 0, torch.ones_like(sign), sign)


@register_aggregator("rrt", config=RRTMILConfig)
class RRTMIL(MILAggregator):
    """RRT-MIL (Tang et al. 2024): region re-embedding (R-MSA + EPEG, CR-MSA), feature-space regions, ABMIL."""

    casts_input_first = True  # x is read only through autocast_input(x)
    search_space = declare_space(
        embed_dim=SearchDim(choices=(128, 256, 512)),
        region_size=SearchDim(16, 256, log=True),
        epeg_k=SearchDim(choices=(0, 7, 15, 21)),
        crmsa_k=SearchDim(1, 5),
        all_shortcut=SearchDim(choices=(False, True)),
    )

    def __init__(self, config: RRTMILConfig) -> None:
        super().__init__(config)
        e = config.embed_dim
        layers: list[nn.Module] = [nn.Linear(config.in_dim, e), nn.ReLU()]
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        self.embed = nn.Sequential(*layers)
        self.norm1 = nn.LayerNorm(e)
        self.region_attention = _SelfAttention(e, config.num_heads, config.epeg_k, config.dropout)
        self.norm2 = nn.LayerNorm(e)
        self.cross_region = _CrossRegion(e, config.crmsa_heads, config.crmsa_k, config.dropout)
        self.norm = nn.LayerNorm(e)
        a = config.attention_dim
        self.attention = nn.Sequential(nn.Linear(e, a), nn.ReLU(), nn.Linear(a, 1))
        self.head = nn.Linear(e, config.num_classes)

    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        h = self.embed(autocast_input(x))  # (N, E)
        sub = self.regions(h, ptr, index)
        region = sub.sub_of_row.index_select(0, sub.order)  # (N,) region of every row in region order
        xs = h.index_select(0, sub.order)  # (N, E) regions contiguous; each bag keeps its rows ptr[b]:ptr[b+1]
        tokens, mask = to_padded(self.norm1(xs), sub.ptr, region)  # (P, S, E)
        z = xs + self.region_attention(tokens, mask)[mask]  # R-MSA
        z = z + self.cross_region(self.norm2(z), sub, region)  # CR-MSA
        if self.config.all_shortcut:
            z = z + xs
        z = self.norm(z)  # (N, E)
        bag_index = index.index_select(0, sub.order)  # (N,) = index: regions never leave their bag
        att = segment_softmax(self.attention(z), ptr, bag_index)  # (N, 1)
        embedding = weighted_segment_sum(z, att, ptr, bag_index)[:, 0]  # (B, E)
        attention = torch.empty_like(att[:, 0]).index_copy(0, sub.order, att[:, 0])  # back to the input order
        return MILOutput(self.head(embedding), attention, embedding)

    @torch.no_grad()
    def regions(self, h: Tensor, ptr: Tensor, index: Tensor) -> SubBags:
        """Each bag cut into ``ceil(n / region_size)`` regions along its first principal direction."""
        hc, v = principal_direction(h, ptr, index)  # (N, E) centred, (B, E)
        rank = segment_rank((hc * v.index_select(0, index)).sum(1), ptr, index)  # (N,) along the direction
        sizes = ptr_to_sizes(ptr)
        count = torch.div(sizes + self.config.region_size - 1, self.config.region_size, rounding_mode="floor")
        part = contiguous_chunks(rank, count.index_select(0, index), sizes.index_select(0, index))
        return split_bags(ptr, index, count, part, within=rank)

    def _resize_head(self, num_classes: int) -> None:
        self.head = resize_linear(self.head, num_classes)
