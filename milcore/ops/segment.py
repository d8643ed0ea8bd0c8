"""Segment reductions over ``ptr`` (CSR offsets), in pure torch.

A batch of ``B`` bags is one matrix ``src`` of ``N`` rows and a ``ptr`` of ``B + 1`` offsets: bag ``b`` is
rows ``ptr[b]:ptr[b + 1]`` (the PyTorch Geometric convention). Every function here reduces or normalises
along dim 0 within each bag, works for trailing dims (``(N,)``, ``(N, H)``, ``(N, H, D)``) and has
autograd. Empty bags are allowed everywhere: their sum, mean and max are 0 and they own no rows.

The derived ``index`` (``(N,)``, bag id of every row) can be passed to skip recomputing it.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = [
    "from_padded",
    "pairwise_padding_pays",
    "ptr_to_index",
    "ptr_to_sizes",
    "segment_argmax",
    "segment_inner",
    "segment_max",
    "segment_mean",
    "segment_softmax",
    "segment_sum",
    "segment_topk",
    "to_padded",
    "weighted_segment_sum",
]


def ptr_to_sizes(ptr: Tensor) -> Tensor:
    """Bag sizes ``(B,)`` from offsets ``(B+1,)``."""
    return ptr[1:] - ptr[:-1]


def ptr_to_index(ptr: Tensor, num_rows: int | None = None) -> Tensor:
    """Bag index of every row, ``(N,)`` int64, from offsets ``(B+1,)``.

    Args:
        ptr: Offsets, ``ptr[0] == 0`` and non-decreasing.
        num_rows: ``N`` if known (avoids a device sync for ``repeat_interleave``).
    """
    sizes = ptr_to_sizes(ptr)
    bags = torch.arange(sizes.numel(), device=ptr.device)
    return torch.repeat_interleave(bags, sizes, output_size=num_rows)


def _index(src: Tensor, ptr: Tensor, index: Tensor | None) -> Tensor:
    return ptr_to_index(ptr, src.shape[0]) if index is None else index


def segment_sum(src: Tensor, ptr: Tensor, index: Tensor | None = None) -> Tensor:
    """Sum of the rows of each bag: ``(N, *F) -> (B, *F)``; an empty bag sums to 0."""
    index = _index(src, ptr, index)
    out = src.new_zeros((ptr.numel() - 1, *src.shape[1:]))
    return out.index_add(0, index, src)


def segment_mean(src: Tensor, ptr: Tensor, index: Tensor | None = None) -> Tensor:
    """Mean of the rows of each bag: ``(N, *F) -> (B, *F)``; an empty bag gives 0."""
    total = segment_sum(src, ptr, index)  # (B, *F)
    sizes = ptr_to_sizes(ptr).clamp(min=1).to(total.dtype)
    return total / sizes.view(-1, *([1] * (src.dim() - 1)))


def segment_max(src: Tensor, ptr: Tensor, index: Tensor | None = None) -> Tensor:
    """Element-wise max over the rows of each bag: ``(N, *F) -> (B, *F)``; an empty bag gives 0.

    The gradient goes to the rows that attain the max (split evenly between ties, as in ``amax``).
    """
    index = _index(src, ptr, index)
    shape = (ptr.numel() - 1, *src.shape[1:])
    expanded = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    out = src.new_full(shape, float("-inf")).scatter_reduce(0, expanded, src, "amax", include_self=True)
    empty = (ptr_to_sizes(ptr) == 0).view(-1, *([1] * (src.dim() - 1)))
    return out.masked_fill(empty, 0.0)


def segment_softmax(src: Tensor, ptr: Tensor, index: Tensor | None = None) -> Tensor:
    """Softmax over the rows of each bag, independently per trailing column: ``(N, *F) -> (N, *F)``.

    Computed and returned in at least float32 (a bf16/fp16 input under autocast is upcast), so
    attention always sums to 1 within each bag up to float32 rounding.
    """
    index = _index(src, ptr, index)
    if src.dtype in (torch.float16, torch.bfloat16):
        src = src.float()
    with torch.no_grad():
        bag_max = segment_max(src, ptr, index)  # (B, *F), a constant shift for stability
    shifted = (src - bag_max.index_select(0, index)).exp()  # (N, *F)
    denom = segment_sum(shifted, ptr, index).index_select(0, index)  # (N, *F)
    return shifted / denom


def _bag_groups(offsets: list[int], num_rows: int) -> list[tuple[int, int, int, int]]:
    """Consecutive groups of bags ``(g0, g1, r0, r1)`` for the block GEMMs below.

    Group size ``g`` is 8..64 bags (about 2,048 rows), so a block GEMM costs ``g`` times a per-bag GEMV:
    a few percent of an attention MLP, and linear in the number of bags.
    """
    num_bags = len(offsets) - 1
    group = int(min(64, max(8, 2048 // max(1, num_rows // max(1, num_bags)))))
    return [
        (g0, min(num_bags, g0 + group), offsets[g0], offsets[min(num_bags, g0 + group)])
        for g0 in range(0, num_bags, group)
    ]


#: Weight columns from which :func:`weighted_segment_sum` takes one product per bag: the block-structured product
#: multiplies ``g`` times the useful work, which stops being small beside the model once ``K`` is wide (ILRA-MIL's
#: 64 latent-token x head columns and its seed's 8 heads; ILRA-MIL's CPU s per epoch in the full benchmark,
#: ``benchmarks/README.md``, issue 18 speed).
PER_BAG_MIN_COLUMNS = 8


def weighted_segment_sum(src: Tensor, weight: Tensor, ptr: Tensor, index: Tensor | None = None) -> Tensor:
    """Attention pooling: ``(N, D)`` rows and ``(N, K)`` weights -> ``(B, K, D)`` weighted sums per bag.

    Equal to ``segment_sum(weight[:, :, None] * src[:, None, :], ptr)``, computed as one small dense
    GEMM per group of consecutive bags (``(g*K, n_rows) @ (n_rows, D)`` with a block-structured left
    matrix), which keeps the work on BLAS (and bf16 under autocast) and never materialises ``(N, K, D)``;
    from ``PER_BAG_MIN_COLUMNS`` columns on, one ``(K, n_b) @ (n_b, D)`` product per bag instead (the block
    costs ``g`` times the useful work). An empty bag pools to zeros. Needs ``ptr`` on the host (one sync).
    """
    if weight.dim() == 1:
        weight = weight.unsqueeze(-1)
    num_rows, k = weight.shape
    offsets = ptr.tolist()
    if len(offsets) == 1:
        return src.new_zeros((0, k, src.shape[1]))
    if weight.dtype != src.dtype and not torch.is_autocast_enabled(src.device.type):
        weight = weight.to(src.dtype)
    if k >= PER_BAG_MIN_COLUMNS:
        sizes = [b - a for a, b in itertools.pairwise(offsets)]
        pairs = zip(weight.split(sizes), src.split(sizes), strict=True)
        return torch.stack([w.T.to(rows.dtype) @ rows for w, rows in pairs])  # (B, K, D)
    index = _index(src, ptr, index)
    branches = torch.arange(k, device=src.device).unsqueeze(0)  # (1, K)
    outs = []
    for g0, g1, r0, r1 in _bag_groups(offsets, num_rows):
        rows = torch.arange(r1 - r0, device=src.device).unsqueeze(1)  # (n, 1)
        local = (index[r0:r1] - g0).unsqueeze(1)  # (n, 1)
        block = weight.new_zeros((g1 - g0, k, r1 - r0))
        block = block.index_put((local, branches, rows), weight[r0:r1])  # (g, K, n)
        pooled = block.view((g1 - g0) * k, r1 - r0) @ src[r0:r1]  # (g*K, D)
        outs.append(pooled.view(g1 - g0, k, src.shape[1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def segment_inner(src: Tensor, per_bag: Tensor, ptr: Tensor, index: Tensor | None = None) -> Tensor:
    """Inner products of every row with vectors of its own bag: ``out[i, k] = <src[i], per_bag[bag(i), k]>``.

    Args:
        src: ``(N, Q)`` rows.
        per_bag: ``(B, K, Q)`` vectors per bag (e.g. DSMIL's critical-instance queries).

    Returns:
        ``(N, K)``, via one GEMM per group of bags (no ``(N, K, Q)`` gather).
    """
    index = _index(src, ptr, index)
    offsets = ptr.tolist()
    k = per_bag.shape[1]
    outs = []
    for g0, g1, r0, r1 in _bag_groups(offsets, src.shape[0]):
        full = src[r0:r1] @ per_bag[g0:g1].reshape((g1 - g0) * k, -1).T  # (n, g*K)
        local = (index[r0:r1] - g0).unsqueeze(1) * k + torch.arange(k, device=src.device)  # (n, K)
        outs.append(full.gather(1, local))
    if not outs:
        return src.new_zeros((src.shape[0], k))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


#: Padded elements of a ``(B, N_max, N_max)`` pairwise tensor always accepted: for many tiny bags one padded
#: product beats a Python loop over the bags.
PADDING_SLACK = 1 << 16


def pairwise_padding_pays(sizes: Tensor, budget: int) -> bool:
    """Whether a pairwise computation over the bags of ``sizes`` (``(B,)``) should run as one padded
    ``(B, N_max, N_max)`` tensor rather than bag by bag: when that tensor holds at most ``budget`` elements and
    is mostly real pairs (at most twice the ``sum n_b^2`` real ones, plus :data:`PADDING_SLACK`). Used by the
    kNN graph and WiKG's neighbour search, where padding a batch to its largest bag had made 2.7x the work."""
    if sizes.numel() == 0:
        return True
    largest = int(sizes.max())
    padded = sizes.numel() * largest * largest
    return padded <= budget and padded <= 2 * int((sizes * sizes).sum()) + PADDING_SLACK


def to_padded(
    src: Tensor, ptr: Tensor, index: Tensor | None = None, fill_value: float = 0.0, max_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Scatter rows into a dense batch: ``(N, *F) -> (B, N_max, *F)`` plus a ``(B, N_max)`` bool mask.

    ``mask[b, j]`` is True for real rows. ``max_size`` (>= the largest bag) avoids a device sync.
    """
    index = _index(src, ptr, index)
    sizes = ptr_to_sizes(ptr)
    num_bags = sizes.numel()
    if max_size is None:
        max_size = int(sizes.max()) if num_bags > 0 else 0
    pos = torch.arange(src.shape[0], device=src.device) - ptr.index_select(0, index)  # (N,)
    out = src.new_full((num_bags, max_size, *src.shape[1:]), fill_value)
    out = out.index_put((index, pos), src)
    mask = torch.arange(max_size, device=src.device).unsqueeze(0) < sizes.unsqueeze(1)  # (B, N_max)
    return out, mask


def from_padded(dense: Tensor, mask: Tensor) -> Tensor:
    """Inverse of :func:`to_padded`: ``(B, N_max, *F)`` and its mask -> the ``(N, *F)`` real rows."""
    return dense[mask]


def segment_argmax(src: Tensor, ptr: Tensor, index: Tensor | None = None) -> Tensor:
    """Global row index of the max of each bag (first one on ties): ``(N, *F) -> (B, *F)`` int64.

    Empty bags get ``-1``.
    """
    dense, _ = to_padded(src.detach(), ptr, index, fill_value=float("-inf"))  # (B, N_max, *F)
    if dense.shape[1] == 0:
        return torch.full((dense.shape[0], *src.shape[1:]), -1, dtype=torch.long, device=src.device)
    arg = dense.argmax(dim=1) + ptr[:-1].view(-1, *([1] * (src.dim() - 1)))  # (B, *F)
    empty = (ptr_to_sizes(ptr) == 0).view(-1, *([1] * (src.dim() - 1)))
    return arg.masked_fill(empty, -1)


def segment_topk(src: Tensor, ptr: Tensor, k: int, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` largest values of a ``(N,)`` score within each bag.

    Returns:
        ``values (B, k)`` (differentiable) and ``rows (B, k)`` global row indices; a bag with fewer than
        ``k`` rows has its missing slots filled with value ``-inf`` and row ``-1``.
    """
    if src.dim() != 1:
        raise ValueError(f"segment_topk expects a (N,) score, got shape {tuple(src.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dense, mask = to_padded(src, ptr, index, fill_value=float("-inf"))  # (B, N_max)
    if dense.shape[1] < k:
        dense = torch.nn.functional.pad(dense, (0, k - dense.shape[1]), value=float("-inf"))
        mask = torch.nn.functional.pad(mask, (0, k - mask.shape[1]), value=False)
    values, pos = dense.topk(k, dim=1)  # (B, k)
    valid = mask.gather(1, pos)
    rows = torch.where(valid, pos + ptr[:-1].unsqueeze(1), torch.full_like(pos, -1))
    return values, rows
