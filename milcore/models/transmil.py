"""TransMIL: transformer-based correlated MIL with the PPEG positional encoding and a class token.

Reference:
    Shao, Bian, Chen, et al. "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole
    Slide Image Classification." NeurIPS 2021.
    Xiong, Zeng, Chakraborty, et al. "Nystromformer: A Nystrom-Based Algorithm for Approximating
    Self-Attention." AAAI 2021 (the approximation used beyond ``exact_max_tokens``).

Pipeline (Algorithm 2 of the paper): ``h = ReLU(fc(x))``; prepend a class token; transformer layer;
PPEG (depthwise 7x7, 5x5 and 3x3 convolutions over the instances laid out row-major on a
``ceil(sqrt(n))`` square grid); transformer layer(s); LayerNorm; the class token feeds the classifier.

Differences from the reference code, all on purpose:

* attention is **exact** (``torch.nn.functional.scaled_dot_product_attention``, a fused kernel whose
  memory is linear in the bag size) for bags of up to ``exact_max_tokens`` tokens. On smear-sized bags
  (hundreds to a few thousand cells) this is both faster and more accurate than Nystrom; bigger bags use
  Nystrom attention (``num_landmarks`` segment-mean landmarks, iterative pseudo-inverse), so the choice
  is per bag and a bag scores the same alone or in any batch;
* the packed path (``forward(x, ptr)``) never pads: the token-wise layers (projections, LayerNorm) run
  on the packed ``(N + B, E)`` rows (one class token per bag) and attention runs bag by bag on that
  bag's own tokens. Padding a batch of log-uniform bag sizes to its largest bag multiplied the
  attention work by about 3.5x and the token-wise work by about 2.5x on the synthetic cohort (the
  padded path, ``forward_padded``, masks instead and agrees to float precision);
* padded batches **respect the mask**: padding keys are masked out of attention, and the square grid of
  PPEG is filled with zeros (the reference duplicates the first instances), each bag on its own
  ``ceil(sqrt(n_b))`` grid placed in the corner of a shared canvas, which is exactly equivalent to
  convolving it alone (the convolution's own zero padding);
* the three PPEG kernels (+ identity) are summed into one 7x7 depthwise kernel before convolving
  (mathematically identical, one convolution instead of three);
* the **last layer computes the class tokens only**: nothing reads the instance tokens after it (the
  classifier reads the class token, the reported attention the class token's logits), so it projects
  queries for the class tokens alone and attends with one query row per bag instead of ``L``, with the
  key and value projections folded into that query (the same function and gradients, tested in float64;
  in the full benchmark on the demo cohort 2.07 -> 1.48 CPU s per TransMIL epoch, ``benchmarks/README.md``).

TransMIL is **not permutation invariant**: PPEG depends on the order of the instances.
``attention`` is the class token's attention to the instances (softmax over the real instances; the
class token's weight on itself dropped and the rest renormalised), averaged over heads **and layers**,
so it sums to 1 within each bag. Averaging over layers is a linear-memory stand-in for attention rollout
(Abnar & Zuidema 2020): the last layer alone is less instance-specific because its tokens are already
mixed (on the synthetic learning check its instance AUROC was 0.73-0.81 against 0.97 for the first).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcore.models.base import AggregatorConfig, MILAggregator, check_range
from milcore.models.layers import autocast_input, resize_linear
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.models.search import SearchDim, declare_space
from milcore.ops import ptr_to_sizes, segment_mean
from milcore.ops.depthwise import depthwise_conv2d

__all__ = ["TransMIL", "TransMILConfig"]


@dataclass(frozen=True)
class TransMILConfig(AggregatorConfig):
    """TransMIL hyper-parameters (defaults follow the paper).

    Attributes:
        dim: token width after the input projection.
        num_heads: attention heads (``dim`` must be divisible by it).
        num_layers: transformer layers (>= 2; PPEG sits after the first).
        dropout: dropout on attention weights and the attention output.
        exact_max_tokens: bags with at most this many tokens (instances + class token) use exact fused
            attention; larger bags use Nystrom attention. On a 1-thread CPU a 512-wide TransMIL step costs
            the same either way at ~2,500 cells (exact: 0.84 s vs 0.97 s at 2,000; 3.0 s vs 1.6 s at
            4,000); the default keeps exactness up to 4,096 (on GPU the fused kernel is far cheaper).
        num_landmarks: Nystrom landmarks.
        pinv_iterations: iterations of the Moore-Penrose pseudo-inverse in Nystrom attention.
    """

    dim: int = 512
    num_heads: int = 8
    num_layers: int = 2
    dropout: float = 0.0
    exact_max_tokens: int = 4096
    num_landmarks: int = 256
    pinv_iterations: int = 6

    def validate(self) -> None:
        super().validate()
        check_range("dim", self.dim, 1, integer=True)
        check_range("num_heads", self.num_heads, 1, integer=True)
        if self.dim % self.num_heads:
            from feature_cache.errors import InvalidArgumentError

            raise InvalidArgumentError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        check_range("num_layers", self.num_layers, 2, integer=True)
        check_range("dropout", self.dropout, 0.0, 0.99)
        check_range("exact_max_tokens", self.exact_max_tokens, 2, integer=True)
        check_range("num_landmarks", self.num_landmarks, 1, integer=True)
        check_range("pinv_iterations", self.pinv_iterations, 1, integer=True)


class _AttentionLayer(nn.Module):
    """Pre-norm self-attention block ``x + proj(attn(norm(x)))`` (TransMIL's TransLayer)."""

    def __init__(self, config: TransMILConfig) -> None:
        super().__init__()
        self.heads = config.num_heads
        self.dropout = config.dropout
        self.norm = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim)
        self.num_landmarks = config.num_landmarks
        self.pinv_iterations = config.pinv_iterations

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Padded ``(B, L, E)`` tokens (token 0 = class token) -> new tokens and the class token's ``(B, H, L)``
        attention logits (float32, masked keys get -inf); exact attention."""
        b, length, dim = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, length, 3, self.heads, dim // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
        key_mask = None if mask is None else mask.view(b, 1, 1, length)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)  # (B, H, L, d)
        out = out.transpose(1, 2).reshape(b, length, dim)
        x = x + F.dropout(self.proj(out), p, self.training)
        with torch.autocast(x.device.type, enabled=False):  # attention weights reported in float32
            scores = (q[:, :, :1].float() @ k.float().transpose(-1, -2)).squeeze(2) / math.sqrt(q.shape[-1])
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask.view(b, 1, length), float("-inf"))
            return x, scores  # (B, L, E), (B, H, L)

    def forward_class(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The last layer of the padded path: :meth:`forward`'s class token ``(B, E)`` and its ``(B, H, L)`` logits,
        from the class tokens' queries only (as :meth:`forward_class_packed`)."""
        b, length, dim = x.shape
        w_q, w_kv = self.qkv.weight.split([dim, 2 * dim])
        normed = self.norm(x)
        q = F.linear(normed[:, 0], w_q).view(b, self.heads, 1, -1)  # (B, H, 1, d)
        k, v = F.linear(normed, w_kv).view(b, length, 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, L, d) each
        p = self.dropout if self.training else 0.0
        acc = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)).squeeze(2) / math.sqrt(q.shape[-1])  # (B, H, L)
            if mask is not None:
                scores = scores.masked_fill(~mask.view(b, 1, length), float("-inf"))
            att = F.dropout(scores.softmax(-1), p, self.training)
            out = (att.unsqueeze(2) @ v.to(acc)).reshape(b, dim)  # (B, E)
        return x[:, 0] + F.dropout(self.proj(out.to(x.dtype)), p, self.training), scores.float()  # float32 weights

    def forward_packed(self, x: Tensor, sptr: list[int], exact_max_tokens: int) -> tuple[Tensor, list[Tensor]]:
        """Packed ``(T, E)`` tokens of ``B`` bags (bag ``b`` is rows ``sptr[b]:sptr[b+1]``, its class token
        first) -> new tokens and, per bag, the class token's ``(H, L_b)`` float32 attention logits.

        Attention runs bag by bag (exact up to ``exact_max_tokens`` tokens, Nystrom beyond); the
        projections run once on all rows.
        """
        total, dim = x.shape
        # one head-major copy of q, k and v for all bags: each bag's (H, L, d) slice then feeds the products
        # without a copy of its own, and the bags' outputs are put back in row order by one copy at the end
        qkv = self.qkv(self.norm(x)).view(total, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3).contiguous()
        p = self.dropout if self.training else 0.0
        outs, weights = [], []
        # split, not slices: the backward of B slices would fill B zero tensors of the full size
        bags = qkv.split([end - start for start, end in itertools.pairwise(sptr)], dim=2)
        for (start, end), bag in zip(itertools.pairwise(sptr), bags, strict=True):
            q, k, v = bag.unsqueeze(1).unbind(0)  # 3 x (1, H, L, d)
            if end - start <= exact_max_tokens:
                out = _exact_attention(q, k, v, p)  # (1, H, L, d)
            else:
                out = _nystrom(q, k, v, self.num_landmarks, self.pinv_iterations)
            outs.append(out[0])  # (H, L, d)
            with torch.autocast(x.device.type, enabled=False):  # attention weights reported in float32
                scores = (q[0, :, :1].float() @ k[0].float().transpose(-1, -2)).squeeze(1) / math.sqrt(q.shape[-1])
                weights.append(scores)  # (H, L)
        out = torch.cat(outs, dim=1).transpose(0, 1).reshape(total, dim) if outs else x.new_zeros(0, dim)  # (T, E)
        return x + F.dropout(self.proj(out), p, self.training), weights  # (T, E)

    def forward_class_packed(self, x: Tensor, sptr: list[int], exact_max_tokens: int) -> tuple[Tensor, list[Tensor]]:
        """The last layer: only the class tokens' outputs are read after it, so only their queries are formed.

        Packed ``(T, E)`` tokens as :meth:`forward_packed` -> the ``(B, E)`` new class tokens (the rows
        :meth:`forward_packed` would return at ``sptr[:-1]``) and the same per-bag ``(H, L_b)`` float32 logits.

        With one query per bag and head, the key and value projections are folded into it instead of being
        applied to every token: the logits are ``<W_k^h^T q_h, x_i>`` (the layer has no bias) and the output
        ``W_v^h sum_i a_i x_i``, so the ``L`` normalised tokens meet ``H`` vectors per bag instead of a ``(E, 2E)``
        projection, in float32 (or wider). A bag beyond ``exact_max_tokens`` gets Nystrom attention as in
        :meth:`forward_packed`, whose landmarks need every token's query, key and value.
        """
        dim = x.shape[1]
        heads, d = self.heads, dim // self.heads
        p = self.dropout if self.training else 0.0
        acc = torch.promote_types(x.dtype, torch.float32)
        normed = self.norm(x)  # (T, E)
        w_q, w_k, w_v = self.qkv.weight.split(dim)  # (E, E) each; rows h*d .. h*d + d - 1 belong to head h
        cls = torch.tensor(sptr[:-1], device=x.device)
        sizes = [end - start for start, end in itertools.pairwise(sptr)]
        with torch.autocast(x.device.type, enabled=False):
            tokens = normed.to(acc)
            q = F.linear(tokens.index_select(0, cls), w_q.to(acc)).view(-1, heads, d)  # (B, H, d)
            probe = torch.einsum("bhd,hde->bhe", q, w_k.to(acc).view(heads, d, dim)) / math.sqrt(d)  # (B, H, E)
            weights, pooled = [], []
            for rows, probe_b in zip(tokens.split(sizes), probe, strict=True):  # one bag: (L, E), (H, E)
                logits = rows @ probe_b.T  # (L, H) every token's logit for the class token
                weights.append(logits.T.float())  # (H, L) reported in float32
                pooled.append(F.dropout(logits.softmax(0), p, self.training).T @ rows)  # (H, E)
            pooled = torch.stack(pooled) if pooled else tokens.new_zeros(0, heads, dim)  # (B, H, E)
            out = torch.einsum("bhe,hde->bhd", pooled, w_v.to(acc).view(heads, d, dim))  # (B, H, d)
        big = [b for b, size in enumerate(sizes) if size > exact_max_tokens]
        if big:
            out = out.clone()
            for b in big:
                rows = normed[sptr[b] : sptr[b + 1]]
                q_all, k, v = (F.linear(rows, w).view(-1, heads, d).transpose(0, 1)[None] for w in (w_q, w_k, w_v))
                out[b] = _nystrom(q_all, k, v, self.num_landmarks, self.pinv_iterations)[0, :, 0].to(acc)  # (H, d)
        out = out.reshape(-1, dim)  # (B, E)
        return x.index_select(0, cls) + F.dropout(self.proj(out.to(x.dtype)), p, self.training), weights  # (B, E)


#: Largest bag (tokens) whose exact attention is computed as ``softmax(q k^T) v`` in plain matrix products
#: (in blocks of ``QUERY_BLOCK`` query rows) rather than by the fused kernel, per compute dtype. Forward +
#: backward of one 8-head, 64-d bag on one CPU thread (``python benchmarks/bench_speed.py --attention-only``;
#: ``benchmarks/README.md``, issue 18 speed): in bfloat16 the blocked products beat the fused kernel at every
#: size measured (320 tokens: 0.006 vs 0.009 s; 1,342: 0.052 vs 0.113; 3,000: 0.31 vs 0.58); unblocked, they
#: fell behind it from about 1,500 tokens (the ``(H, L, L)`` weights no longer fit the cache); the softmax runs
#: in the products' dtype (2x faster than autocast's float32 softmax plus a cast back). In float32
#: the fused kernel wins above about 200 tokens, blocked or not. The plain form stores the weights for the
#: backward pass (``H L^2`` values per bag, 268 MB at 4,096 tokens in bfloat16).
EXPLICIT_MAX_TOKENS = {torch.bfloat16: 1 << 30, torch.float16: 1 << 30, torch.float32: 160}
QUERY_BLOCK = 512


def _exact_attention(q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
    """Exact ``softmax(q k^T / sqrt(d)) v`` of one bag ``(1, H, L, d)``, by the faster of two equal forms."""
    if q.shape[2] > EXPLICIT_MAX_TOKENS.get(q.dtype, 0):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    return blocked_attention(q, k, v, dropout)


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` of one bag ``(1, H, L, d)`` as plain products, ``QUERY_BLOCK`` query rows
    at a time (the ``(H, block, L)`` weights stay in cache), in the inputs' dtype."""
    length = q.shape[2]
    keys = k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (1, H, d, L)
    out = []
    # autocast off: the softmax stays in the products' dtype (it accumulates in float32 internally) instead of
    # being promoted to a float32 (H, l, L) copy and cast back, which took half of the time in bfloat16
    with torch.autocast(q.device.type, enabled=False):
        for start in range(0, length, QUERY_BLOCK):
            weights = (q[:, :, start : start + QUERY_BLOCK] @ keys).softmax(dim=-1)  # (1, H, l, L)
            if dropout > 0:
                weights = F.dropout(weights, dropout)
            out.append(weights @ v)  # (1, H, l, d)
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)  # (1, H, L, d)


def _nystrom(q: Tensor, k: Tensor, v: Tensor, num_landmarks: int, iters: int) -> Tensor:
    """Nystrom approximation of ``softmax(q k^T / sqrt(d)) v`` for one unpadded bag ``(1, H, L, d)``."""
    length = q.shape[2]
    m = min(num_landmarks, length)
    q = q * q.shape[-1] ** -0.5
    bounds = torch.linspace(0, length, m + 1, device=q.device).round().long()  # m near-equal segments
    land_q = segment_mean(q.squeeze(0).transpose(0, 1), bounds).transpose(0, 1).unsqueeze(0)  # (1, H, m, d)
    land_k = segment_mean(k.squeeze(0).transpose(0, 1), bounds).transpose(0, 1).unsqueeze(0)
    kernel1 = (q @ land_k.transpose(-1, -2)).softmax(-1)  # (1, H, L, m)
    kernel2 = (land_q @ land_k.transpose(-1, -2)).float().softmax(-1)  # (1, H, m, m)
    kernel3 = (land_q @ k.transpose(-1, -2)).softmax(-1)  # (1, H, m, L)
    eye = torch.eye(m, device=q.device)
    z = kernel2.transpose(-1, -2) / (kernel2.abs().sum(-1).amax() * kernel2.abs().sum(-2).amax())
    for _ in range(iters):  # Moore-Penrose iterations (Razavi et al. 2014), as in the paper
        kz = kernel2 @ z
        z = 0.25 * z @ (13 * eye - kz @ (15 * eye - kz @ (7 * eye - kz)))
    return (kernel1 @ z.to(kernel1.dtype)) @ (kernel3 @ v)  # (1, H, L, d)


def instance_attention(layer_scores: list[Tensor]) -> Tensor:
    """The class token's float32 logits ``(..., H, 1 + L)`` of every layer (column 0: the class token itself;
    masked keys ``-inf``) -> ``(..., L)`` instance attention: each layer's softmax weights on the instances, summed
    over layers and renormalised over the instances (the class token's weight on itself dropped), averaged over
    heads.

    Computed in log space. From the weights themselves, a head whose class token attends almost only to itself
    has instance weights that underflow to 0 in float32: one such head of 8 left a bag's attention summing to
    7/8 (a contract failure met in the full benchmark); here it still gives a distribution over the instances.
    """
    s = torch.stack(layer_scores)  # (layers, ..., H, 1 + L)
    inst = s[..., 1:]
    log_mass = torch.logsumexp(inst, -1) - torch.logsumexp(s, -1)  # (layers, ..., H) log weight on the instances
    rel = (log_mass - log_mass.amax(0, keepdim=True)).exp()  # (layers, ..., H), the largest 1
    att = (rel.unsqueeze(-1) * inst.softmax(-1)).sum(0) / rel.sum(0).unsqueeze(-1)  # (..., H, L)
    return att.mean(-2)


class _PPEG(nn.Module):
    """Pyramid position encoding generator: ``x + dw7(x) + dw5(x) + dw3(x)`` on the square grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens: Tensor, mask: Tensor, sizes: Tensor) -> Tensor:
        """``(B, L, E)`` instance tokens (no class token), ``(B, L)`` mask, ``(B,)`` sizes -> same shape."""
        b, length, dim = tokens.shape
        sides = torch.ceil(torch.sqrt(sizes.double())).long()  # (B,)
        side = int(sides.max()) if b else 0
        if side == 0:
            return tokens
        j = torch.arange(length, device=tokens.device).unsqueeze(0)  # (1, L)
        s = sides.clamp(min=1).unsqueeze(1)  # (B, 1)
        flat = torch.where(mask, (j // s) * side + j % s, 0)  # (B, L) position on the canvas
        bag = torch.arange(b, device=tokens.device).unsqueeze(1).expand(b, length)
        canvas = tokens.new_zeros(b, side * side, dim).index_put((bag[mask], flat[mask]), tokens[mask])
        out = self._convolve(canvas, side)  # (B, S*S, E)
        return out.gather(1, flat.unsqueeze(-1).expand(b, length, dim)) * mask.unsqueeze(-1)  # (B, L, E)

    def forward_packed(self, tokens: Tensor, ptr: Tensor, index: Tensor) -> Tensor:
        """Packed ``(N, E)`` instance tokens of the bags ``ptr`` (``index``: unused, kept for the call
        signature) -> same shape; each bag convolved alone on its own ``ceil(sqrt(n_b))`` grid, as :meth:`forward`.

        One convolution per bag instead of one over a shared canvas of the largest bag's grid: the canvas
        was 2.2x the real grids' area on the demo cohort's batches (log-uniform bag sizes).
        """
        if tokens.shape[0] == 0:
            return tokens
        weight, bias = self._kernel()
        bounds = ptr.tolist()
        out = [self._convolve_bag(tokens[a:b], weight, bias) for a, b in itertools.pairwise(bounds) if b > a]
        return torch.cat(out)  # (N, E)

    def _kernel(self) -> tuple[Tensor, Tensor]:
        """The three kernels and the identity merged into one float32 7x7 depthwise kernel and bias."""
        dim = self.proj7.weight.shape[0]
        weight = self.proj7.weight + F.pad(self.proj5.weight, (1, 1, 1, 1)) + F.pad(self.proj3.weight, (2,) * 4)
        weight = weight + F.pad(weight.new_ones(dim, 1, 1, 1), (3,) * 4)  # identity at the centre
        bias = self.proj7.bias + self.proj5.bias + self.proj3.bias
        return weight.float(), bias.float()

    @staticmethod
    def _convolve_bag(rows: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """One bag's ``(n, E)`` tokens laid row-major on a ``ceil(sqrt(n))`` square grid, convolved -> ``(n, E)``."""
        n, dim = rows.shape
        side = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
        grid = F.pad(rows.float(), (0, 0, 0, side * side - n)).view(1, side, side, dim).permute(0, 3, 1, 2)
        with torch.autocast(rows.device.type, enabled=False):  # bf16 depthwise convolution is slow on CPU
            if rows.device.type == "cpu":  # faster backward on CPU (measured); not measured on a GPU
                out = depthwise_conv2d(grid, weight, bias, (3, 3))  # (1, E, S, S), channels-last memory
            else:
                out = F.conv2d(grid, weight, bias, padding=3, groups=dim)
        return out.permute(0, 2, 3, 1).reshape(side * side, dim)[:n].to(rows.dtype)

    def _convolve(self, canvas: Tensor, side: int) -> Tensor:
        """The merged 7x7 depthwise kernel (+ identity) over ``(B, S*S, E)`` canvases."""
        b, _, dim = canvas.shape
        weight, bias = self._kernel()
        grid = canvas.view(b, side, side, dim).permute(0, 3, 1, 2)  # (B, E, S, S), channels-last memory
        with torch.autocast(canvas.device.type, enabled=False):  # bf16 depthwise backward is slow on CPU
            out = F.conv2d(grid.float(), weight, bias, padding=3, groups=dim)
        return out.permute(0, 2, 3, 1).reshape(b, side * side, dim).to(canvas.dtype)


@register_aggregator("transmil", config=TransMILConfig)
class TransMIL(MILAggregator):
    """TransMIL (Shao et al. 2021) with exact fused attention up to ``exact_max_tokens``, Nystrom beyond."""

    casts_input_first = True  # x is read only through autocast_input(x)
    permutation_invariant = False
    search_space = declare_space(
        dim=SearchDim(choices=(128, 256, 512)),
        num_heads=SearchDim(choices=(4, 8)),
        num_layers=SearchDim(2, 3),
    )

    def __init__(self, config: TransMILConfig) -> None:
        super().__init__(config)
        self.fc = nn.Sequential(nn.Linear(config.in_dim, config.dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.dim) * 0.02)
        self.layers = nn.ModuleList([_AttentionLayer(config) for _ in range(config.num_layers)])
        self.ppeg = _PPEG(config.dim)
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.num_classes)

    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        h = self.fc(autocast_input(x))  # (N, E)
        b, n = ptr.numel() - 1, h.shape[0]
        # packed sequence: bag b's class token at row ptr[b] + b, its instances right after it
        cls_rows = ptr[:-1] + torch.arange(b, device=ptr.device)  # (B,)
        inst_rows = torch.arange(n, device=ptr.device) + index + 1  # (N,)
        seq = h.new_zeros(n + b, h.shape[1])
        seq = seq.index_copy(0, cls_rows, self.cls_token[0].to(h.dtype).expand(b, -1)).index_copy(0, inst_rows, h)
        sptr = (ptr + torch.arange(b + 1, device=ptr.device)).tolist()
        seq, scores = self.layers[0].forward_packed(seq, sptr, self.config.exact_max_tokens)
        layer_scores = [scores]  # per layer, per bag: (H, L_b) class-token logits
        seq = seq.index_copy(0, inst_rows, self.ppeg.forward_packed(seq.index_select(0, inst_rows), ptr, index))
        for layer in self.layers[1:-1]:
            seq, scores = layer.forward_packed(seq, sptr, self.config.exact_max_tokens)
            layer_scores.append(scores)
        cls, scores = self.layers[-1].forward_class_packed(seq, sptr, self.config.exact_max_tokens)  # (B, E)
        layer_scores.append(scores)
        embedding = self.norm(cls)  # (B, E)
        att = [instance_attention(list(per_bag)) for per_bag in zip(*layer_scores, strict=True)]  # (n_b,) each
        attention = torch.cat(att) if att else h.new_zeros(0, dtype=torch.float32)
        return self._output(embedding, attention)  # (N,) attention, heads and layers averaged

    def pool_padded(
        self, x: Tensor, mask: Tensor, ptr: Tensor, coords: Tensor | None, labels: Tensor | None
    ) -> MILOutput:
        sizes = ptr_to_sizes(ptr)
        if bool((sizes + 1 > self.config.exact_max_tokens).any()):
            return self.forward(x[mask], ptr)
        tokens = self.fc(autocast_input(x)) * mask.unsqueeze(-1)  # (B, L, E)
        embedding, att = self._encode(tokens, mask, sizes)
        return self._output(embedding, att[mask])

    def _encode(self, tokens: Tensor, mask: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """Padded instance tokens ``(B, L, E)`` -> class embedding ``(B, E)`` and instance attention ``(B, L)``."""
        b = tokens.shape[0]
        full_mask = None if bool(mask.all()) else F.pad(mask, (1, 0), value=True)  # (B, 1 + L)
        x = torch.cat([self.cls_token.expand(b, 1, -1).to(tokens.dtype), tokens], dim=1)  # (B, 1+L, E)
        x, scores = self.layers[0](x, full_mask)
        layer_scores = [scores]  # (B, H, 1 + L) class-token logits per layer
        x = torch.cat([x[:, :1], self.ppeg(x[:, 1:], mask, sizes)], dim=1)
        for layer in self.layers[1:-1]:
            x, scores = layer(x, full_mask)
            layer_scores.append(scores)
        cls, scores = self.layers[-1].forward_class(x, full_mask)  # (B, E): nothing reads the instance tokens after it
        layer_scores.append(scores)
        embedding = self.norm(cls)  # (B, E)
        return embedding, instance_attention(layer_scores)  # (B, L); rows of padding are not used

    def _output(self, embedding: Tensor, attention: Tensor) -> MILOutput:
        return MILOutput(logits=self.head(embedding), attention=attention, embedding=embedding)

    def _resize_head(self, num_classes: int) -> None:
        self.head = resize_linear(self.head, num_classes)
