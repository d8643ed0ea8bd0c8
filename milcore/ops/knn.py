"""k-nearest-neighbour graphs within each bag, in pure torch (no ``torch-cluster`` needed).

Memory stays linear in the bag size: distances are computed for blocks of at most ``block_rows`` query
rows at a time (compute is quadratic in the bag size, as for any exact kNN).

Neighbours are ranked by ``2 <q, p> - |p|^2`` (the squared distance ``|q - p|^2`` minus the query's own
``|q|^2``, which does not change a query's ranking): one matrix product per block, without the square
root, the norms' concatenation and the padding of :func:`torch.cdist` on a padded batch, which took three
quarters of a GraphMIL training step with its graph in feature space (``graph_space="features"``, or a bank
without coordinates) on the demo bank's 1,280-d features (``torch.profiler``, one thread).
"""

from __future__ import annotations

import torch
from torch import Tensor

from milcore.ops.segment import pairwise_padding_pays, ptr_to_index, ptr_to_sizes, segment_mean, to_padded

__all__ = ["knn_graph"]

_DENSE_BUDGET = 1 << 22  # elements of the (B, N_max, N_max) distance tensor handled in one go
_FLOAT64_MAX_DIM = 16  # points of at most this many dimensions are ranked in float64


def knn_graph(pos: Tensor, ptr: Tensor, k: int, block_rows: int = 1024) -> Tensor:
    """Directed kNN edges inside each bag (Euclidean in ``pos``), self loops excluded.

    Args:
        pos: ``(N, F)`` points (features or spatial coordinates).
        ptr: ``(B+1,)`` offsets; edges never cross bags.
        k: neighbours per node; a bag of ``n`` rows gives each node ``min(k, n - 1)`` neighbours.
        block_rows: query rows per distance block for large bags (bounds memory).

    Returns:
        ``edge_index (2, E)`` int64 with ``edge_index[0]`` the neighbour (source) and
        ``edge_index[1]`` the query node (target), PyG's ``source_to_target`` flow.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # low-dimensional points (coordinates) in float64: the ranking subtracts squared norms, and in float32
    # slide coordinates of ~20,000 px leave ~64 px^2 of rounding (2 of 192,096 demo edges were not among the
    # exact k nearest); each bag centred first, which shrinks the norms for features too
    pos = pos.detach().double() if pos.shape[1] <= _FLOAT64_MAX_DIM else pos.detach().float()
    sizes = ptr_to_sizes(ptr)
    if pos.shape[0]:
        pos = pos - segment_mean(pos, ptr, ptr_to_index(ptr, pos.shape[0])).repeat_interleave(sizes, dim=0)
    num_bags = sizes.numel()
    if num_bags == 0 or pos.shape[0] == 0:
        return torch.empty(2, 0, dtype=torch.long, device=pos.device)
    max_size = int(sizes.max())
    if pairwise_padding_pays(sizes, _DENSE_BUDGET):  # all bags in one padded product, else bag by bag
        return _knn_dense(pos, ptr, k, max_size)
    ptr_cpu = ptr.tolist()
    edges = []
    for b in range(num_bags):
        start, end = ptr_cpu[b], ptr_cpu[b + 1]
        if end - start > 1:
            edges.append(_knn_single(pos[start:end], k, block_rows) + start)
    if not edges:
        return torch.empty(2, 0, dtype=torch.long, device=pos.device)
    return torch.cat(edges, dim=1)


def _knn_dense(pos: Tensor, ptr: Tensor, k: int, max_size: int) -> Tensor:
    """All bags at once through a padded ``(B, N_max, N_max)`` distance tensor (small batches)."""
    dense, mask = to_padded(pos, ptr, max_size=max_size)  # (B, M, F), (B, M)
    kk = min(k, max_size - 1)
    if kk < 1:
        return torch.empty(2, 0, dtype=torch.long, device=pos.device)
    norms = dense.square().sum(-1).unsqueeze(1)  # (B, 1, M)
    score = torch.baddbmm(norms, dense, dense.transpose(1, 2), beta=-1, alpha=2)  # (B, M, M) 2<q, p> - |p|^2
    eye = torch.eye(max_size, dtype=torch.bool, device=pos.device)
    score = score.masked_fill(~mask.unsqueeze(1) | eye, float("-inf"))
    val, nbr = score.topk(kk, dim=2)  # (B, M, kk) nearest first
    keep = torch.isfinite(val) & mask.unsqueeze(2)  # (B, M, kk)
    offset = ptr[:-1].view(-1, 1, 1)
    target = (torch.arange(max_size, device=pos.device).view(1, -1, 1) + offset).expand_as(nbr)
    source = nbr + offset
    return torch.stack([source[keep], target[keep]])


def _knn_single(pos: Tensor, k: int, block_rows: int) -> Tensor:
    """kNN of one bag, ``block_rows`` query rows at a time; local indices."""
    n = pos.shape[0]
    kk = min(k, n - 1)
    sources, targets = [], []
    norms = pos.square().sum(-1)  # (n,)
    for start in range(0, n, block_rows):
        query = pos[start : start + block_rows]  # (R, F)
        score = torch.addmm(norms, query, pos.T, beta=-1, alpha=2)  # (R, n) 2<q, p> - |p|^2
        rows = torch.arange(query.shape[0], device=pos.device)
        score[rows, rows + start] = float("-inf")
        nbr = score.topk(kk, dim=1).indices  # (R, kk) nearest first
        sources.append(nbr.reshape(-1))
        targets.append((rows + start).repeat_interleave(kk))
    return torch.stack([torch.cat(sources), torch.cat(targets)])
