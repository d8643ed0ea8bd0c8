"""Per-bag ranks and sub-bags (pseudo-bags, regions) over packed ``ptr`` batches, shared by several aggregators.

CLAM picks each bag's top-k / bottom-k cells by attention, ACMIL masks its top-k, DTFD-MIL splits every
bag into pseudo-bags and RRT-MIL into regions. All of them need, for every row, its **rank within its own
bag** under some score, computed for the whole packed batch at once: :func:`segment_rank` (two stable
sorts, no padding, no Python loop over bags). :func:`split_bags` then turns a per-row sub-bag number into
a packed batch of sub-bags: the row order that makes every sub-bag contiguous, the sub-bags' ``ptr`` and,
per bag, the ``ptr`` of its sub-bags, so the segment ops of :mod:`milcore.ops` run on sub-bags exactly as
they run on bags. Ranks are computed without gradient (they only choose rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from milcore.ops import ptr_to_sizes

__all__ = ["SubBags", "bag_sizes_of_rows", "contiguous_chunks", "round_robin", "segment_rank", "split_bags"]


@torch.no_grad()
def segment_rank(score: Tensor, ptr: Tensor, index: Tensor, descending: bool = True) -> Tensor:
    """Rank of every row within its bag under ``score`` (0 = the largest when ``descending``).

    Args:
        score: ``(N,)`` or ``(N, K)`` scores (each column ranked on its own).
        ptr: ``(B+1,)`` offsets.
        index: ``(N,)`` bag of every row.
        descending: rank 0 for the largest score (else for the smallest).

    Returns:
        int64 ranks shaped like ``score``; ties keep row order (stable sorts).
    """
    column = score.dim() == 1
    s = score.detach().float()
    s = s.unsqueeze(1) if column else s.flatten(1)  # (N, K)
    order = torch.sort(s, dim=0, descending=descending, stable=True).indices  # (N, K) by score
    by_bag = torch.sort(index[order], dim=0, stable=True).indices  # (N, K) then by bag (stable)
    perm = order.gather(0, by_bag)  # (N, K) rows grouped by bag, by score within each bag
    position = torch.arange(s.shape[0], device=s.device).unsqueeze(1) - ptr[index[perm]]  # (N, K)
    rank = torch.empty_like(perm).scatter_(0, perm, position)
    return rank[:, 0] if column else rank


@dataclass
class SubBags:
    """Bags split into sub-bags, packed like bags.

    Attributes:
        order: ``(N,)`` rows in sub-bag order (``x[order]`` makes every sub-bag contiguous).
        ptr: ``(P+1,)`` offsets of the ``P`` sub-bags in ``x[order]``.
        bag_ptr: ``(B+1,)`` offsets of each bag's sub-bags among the ``P`` (a bag of ``n`` rows in ``g``
            sub-bags owns ``g`` of them; an empty bag none).
        sub_of_row: ``(N,)`` sub-bag of every row, in the original row order.
    """

    order: Tensor
    ptr: Tensor
    bag_ptr: Tensor
    sub_of_row: Tensor


@torch.no_grad()
def split_bags(ptr: Tensor, index: Tensor, groups: Tensor, part: Tensor, within: Tensor | None = None) -> SubBags:
    """Pack sub-bags: row ``i`` of bag ``b`` goes to sub-bag ``part[i]`` (``0 <= part[i] < groups[b]``).

    Args:
        ptr: ``(B+1,)`` offsets.
        index: ``(N,)`` bag of every row.
        groups: ``(B,)`` number of sub-bags of each bag (0 for an empty bag, >= 1 otherwise); every
            sub-bag should receive at least one row.
        part: ``(N,)`` sub-bag of every row within its bag.
        within: optional ``(N,)`` key ordering the rows inside each sub-bag (default: row order).
    """
    bag_ptr = F.pad(groups.cumsum(0), (1, 0))  # (B+1,)
    sub = bag_ptr[:-1].index_select(0, index) + part  # (N,) global sub-bag id
    if within is None:
        order = torch.sort(sub, stable=True).indices  # (N,) sub-bags contiguous, row order kept within each
    else:
        by_key = torch.sort(within, stable=True).indices
        order = by_key[torch.sort(sub[by_key], stable=True).indices]  # sub-bags contiguous, by key within each
    num_sub = int(bag_ptr[-1])
    counts = torch.bincount(sub, minlength=num_sub)  # (P,)
    return SubBags(order, F.pad(counts.cumsum(0), (1, 0)), bag_ptr, sub)


def round_robin(rank: Tensor, groups_of_row: Tensor) -> Tensor:
    """Deal the rows of each bag, in rank order, into its groups: ``rank mod g`` (sizes differ by <= 1)."""
    return rank % groups_of_row.clamp(min=1)


def contiguous_chunks(rank: Tensor, groups_of_row: Tensor, sizes_of_row: Tensor) -> Tensor:
    """Cut each bag, in rank order, into ``g`` consecutive chunks of near-equal size (differing by <= 1)."""
    return torch.div(rank * groups_of_row, sizes_of_row.clamp(min=1), rounding_mode="floor")


def bag_sizes_of_rows(ptr: Tensor, index: Tensor) -> Tensor:
    """``(N,)`` size of every row's bag."""
    return ptr_to_sizes(ptr).index_select(0, index)
