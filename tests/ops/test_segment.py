"""Segment ops over ptr against per-bag loops, with empty bags, trailing dims and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from milcore.ops import (
    from_padded,
    knn_graph,
    ptr_to_index,
    segment_argmax,
    segment_inner,
    segment_max,
    segment_mean,
    segment_softmax,
    segment_sum,
    segment_topk,
    to_padded,
    weighted_segment_sum,
)

SIZES = [3, 0, 5, 1, 0, 4]
PTR = torch.tensor([0, 3, 3, 8, 9, 9, 13])


def bags(src: torch.Tensor) -> list[torch.Tensor]:
    return [src[int(PTR[b]) : int(PTR[b + 1])] for b in range(len(SIZES))]


@pytest.mark.parametrize("shape", [(13,), (13, 3), (13, 2, 4)])
def test_sum_mean_max_match_per_bag_loops(shape: tuple[int, ...]) -> None:
    src = torch.randn(shape)
    zeros = torch.zeros(shape[1:])
    ref_sum = torch.stack([b.sum(0) if len(b) else zeros for b in bags(src)])
    ref_mean = torch.stack([b.mean(0) if len(b) else zeros for b in bags(src)])
    ref_max = torch.stack([b.amax(0) if len(b) else zeros for b in bags(src)])
    torch.testing.assert_close(segment_sum(src, PTR), ref_sum)
    torch.testing.assert_close(segment_mean(src, PTR), ref_mean)
    torch.testing.assert_close(segment_max(src, PTR), ref_max)


def test_index_and_softmax() -> None:
    assert ptr_to_index(PTR).tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 3, 5, 5, 5, 5]
    src = torch.randn(13, 2) * 30  # large values: the max shift keeps it stable
    out = segment_softmax(src, PTR)
    ref = torch.cat([b.softmax(0) for b in bags(src) if len(b)])
    torch.testing.assert_close(out, ref)
    assert segment_softmax(src.bfloat16(), PTR).dtype == torch.float32


def test_weighted_segment_sum_matches_the_naive_product_in_groups() -> None:
    torch.manual_seed(0)
    sizes = torch.randint(0, 7, (150,))  # many bags: several groups of the block GEMM
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    src, weight = torch.randn(int(ptr[-1]), 5), torch.rand(int(ptr[-1]), 3)
    ref = segment_sum(weight.unsqueeze(-1) * src.unsqueeze(1), ptr)  # (B, K, D)
    torch.testing.assert_close(weighted_segment_sum(src, weight, ptr), ref)
    torch.testing.assert_close(weighted_segment_sum(src, weight[:, 0], ptr), ref[:, :1])
    assert weighted_segment_sum(src[:0], weight[:0], torch.tensor([0])).shape == (0, 3, 5)


def test_weighted_segment_sum_of_wide_weights_takes_one_product_per_bag() -> None:
    """From PER_BAG_MIN_COLUMNS columns on (ILRA-MIL's latent tokens x heads), the per-bag path: same sums,
    empty bags included, gradients by finite differences."""
    from milcore.ops.segment import PER_BAG_MIN_COLUMNS

    torch.manual_seed(0)
    k = PER_BAG_MIN_COLUMNS + 3
    src, weight = torch.randn(13, 5, dtype=torch.float64), torch.rand(13, k, dtype=torch.float64)
    ref = segment_sum(weight.unsqueeze(-1) * src.unsqueeze(1), PTR)  # (B, K, D), bags 1 and 4 empty
    torch.testing.assert_close(weighted_segment_sum(src, weight, PTR), ref)
    src.requires_grad_(True), weight.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, w: weighted_segment_sum(s, w, PTR), (src, weight))


def test_segment_inner_dots_rows_with_their_own_bag() -> None:
    torch.manual_seed(0)
    sizes = torch.randint(0, 6, (90,))
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    src, per_bag = torch.randn(int(ptr[-1]), 4), torch.randn(90, 3, 4)
    ref = torch.einsum("nq,nkq->nk", src, per_bag[ptr_to_index(ptr, src.shape[0])])
    torch.testing.assert_close(segment_inner(src, per_bag, ptr), ref)
    assert segment_inner(src[:0], per_bag[:1], torch.tensor([0, 0])).shape == (0, 3)


def test_gradients_match_finite_differences() -> None:
    src = torch.randn(13, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(13, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: segment_softmax(s, PTR).double(), (src,))
    assert torch.autograd.gradcheck(lambda s: segment_max(s, PTR), (src,))
    assert torch.autograd.gradcheck(lambda s, w: weighted_segment_sum(s, w, PTR), (src, weight))
    assert torch.autograd.gradcheck(lambda s: to_padded(s, PTR)[0], (src,))
    per_bag = torch.randn(6, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, p: segment_inner(s, p, PTR), (src, per_bag))


def test_padded_round_trip_and_mask() -> None:
    src = torch.randn(13, 3)
    dense, mask = to_padded(src, PTR, fill_value=-1.0)
    assert dense.shape == (6, 5, 3) and mask.sum(1).tolist() == SIZES
    assert torch.all(dense[~mask] == -1.0)
    torch.testing.assert_close(from_padded(dense, mask), src)


def test_argmax_and_topk() -> None:
    src = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0, 0.0, 9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0])
    assert segment_argmax(src, PTR).tolist() == [1, -1, 6, 8, -1, 9]
    values, rows = segment_topk(src, PTR, k=2)
    assert rows.tolist() == [[1, 2], [-1, -1], [6, 7], [8, -1], [-1, -1], [9, 12]]
    assert values[0].tolist() == [3.0, 2.0] and values[3, 1] == float("-inf")
    with pytest.raises(ValueError):
        segment_topk(src.unsqueeze(1), PTR, k=2)


def _brute_knn(pos: torch.Tensor, ptr: torch.Tensor, k: int) -> set[tuple[int, int]]:
    edges = set()
    for b in range(ptr.numel() - 1):
        start, end = int(ptr[b]), int(ptr[b + 1])
        d = torch.cdist(pos[start:end], pos[start:end])
        d.fill_diagonal_(float("inf"))
        kk = min(k, end - start - 1)
        if kk > 0:
            for i, nbrs in enumerate(d.topk(kk, largest=False).indices.tolist()):
                edges |= {(start + j, start + i) for j in nbrs}
    return edges


@pytest.mark.parametrize(
    ("sizes", "block_rows", "dim"), [([5, 1, 0, 12, 3], 1024, 3), ([2100, 4], 256, 3), ([600, 20, 30], 128, 64)]
)
def test_knn_graph_matches_brute_force(sizes: list[int], block_rows: int, dim: int) -> None:
    """Small batches go through the dense path, a bag of 2,100 through the blockwise path, and a batch whose
    padding would be mostly waste (one bag of 600 beside small ones) bag by bag."""
    torch.manual_seed(0)
    ptr = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    pos = torch.randn(int(ptr[-1]), dim) * 3 + 5  # away from the origin: norms matter in the ranking
    edge_index = knn_graph(pos, ptr, k=4, block_rows=block_rows)
    assert edge_index.shape[1] == sum(min(4, max(n - 1, 0)) * n for n in sizes)
    assert set(map(tuple, edge_index.T.tolist())) == _brute_knn(pos, ptr, 4)
    assert knn_graph(pos[:0], torch.tensor([0]), k=3).shape == (2, 0)


def test_knn_graph_is_exact_on_slide_coordinates() -> None:
    """Integer slide coordinates near 20,000 px: the ranking subtracts squared norms (~8e8), where float32
    rounds by ~64 px^2, so every edge must still be among the exact k nearest (float64 reference, ties
    allowed)."""
    rng = np.random.default_rng(0)
    sizes = [300, 250]
    ptr = torch.tensor([0, *np.cumsum(sizes).tolist()])
    coords = rng.integers(19_000, 20_000, size=(sum(sizes), 2))
    edge_index = knn_graph(torch.from_numpy(coords.astype(np.float32)), ptr, k=8)
    src, tgt = edge_index.numpy()
    for b in range(len(sizes)):
        lo, hi = int(ptr[b]), int(ptr[b + 1])
        p = coords[lo:hi].astype(np.float64)
        d = ((p[:, None] - p[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        kth = np.sort(d, axis=1)[:, 7]
        mine = (tgt >= lo) & (tgt < hi)
        assert mine.sum() == 8 * (hi - lo)
        assert (d[tgt[mine] - lo, src[mine] - lo] <= kth[tgt[mine] - lo]).all()


def test_pairwise_padding_pays_only_when_padding_is_small_and_mostly_real() -> None:
    """One padded (B, N_max, N_max) product for many small or similar bags; bag by bag when one large bag would
    make the padding most of the work, or when the padded tensor exceeds the budget."""
    from milcore.ops import pairwise_padding_pays

    assert pairwise_padding_pays(torch.tensor([5, 1, 0, 12, 3]), 1 << 22)  # tiny bags: within the slack
    assert pairwise_padding_pays(torch.tensor([400, 380, 390]), 1 << 22)  # similar sizes: mostly real pairs
    assert not pairwise_padding_pays(torch.tensor([600, 20, 30]), 1 << 22)  # 3 x 600^2 vs ~361k real pairs
    assert not pairwise_padding_pays(torch.tensor([2100, 2000]), 1 << 22)  # over the budget
    assert pairwise_padding_pays(torch.tensor([], dtype=torch.long), 1 << 22)
