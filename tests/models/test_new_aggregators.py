"""What each issue-18 aggregator adds beyond the contract: its auxiliary losses, pseudo-bags, masks, regions, graph.

The contract (``test_contract.py``) and the learning check (``test_learning.py``) cover them through the
registry; these tests check the model-specific parts against direct, loop-per-bag computations.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from feature_cache.errors import InvalidArgumentError
from milcore.models import create_aggregator
from milcore.models.bag_ranks import segment_rank, split_bags
from milcore.models.rrt import principal_direction
from milcore.models.wikg import top_affinities
from milcore.ops import ptr_to_index, segment_sum

D = 12
SIZES = [5, 1, 17, 0, 9]


def batch(sizes: list[int] = SIZES, seed: int = 1, dim: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ptr = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    return torch.randn(int(ptr[-1]), dim, generator=g), ptr


def rows_of(ptr: torch.Tensor, b: int) -> slice:
    return slice(int(ptr[b]), int(ptr[b + 1]))


# --------------------------------------------------------------------------------------------- bag_ranks
def test_segment_rank_matches_a_sort_per_bag() -> None:
    x, ptr = batch()
    score = torch.stack([x[:, 0], x[:, 1]], 1)  # (N, 2)
    rank = segment_rank(score, ptr, ptr_to_index(ptr, x.shape[0]))
    for b in range(len(SIZES)):
        for col in range(2):
            expected = torch.argsort(torch.argsort(score[rows_of(ptr, b), col], descending=True))
            assert torch.equal(rank[rows_of(ptr, b), col], expected)


def test_split_bags_packs_sub_bags_like_bags() -> None:
    x, ptr = batch()
    index = ptr_to_index(ptr, x.shape[0])
    groups = (ptr[1:] - ptr[:-1]).clamp(max=3)
    part = segment_rank(x[:, 0], ptr, index) % groups.index_select(0, index)
    sub = split_bags(ptr, index, groups, part)
    assert sub.bag_ptr.tolist() == [0, 3, 4, 7, 7, 10]
    for p in range(int(sub.bag_ptr[-1])):
        rows = sub.order[int(sub.ptr[p]) : int(sub.ptr[p + 1])]
        assert rows.numel() > 0 and torch.all(sub.sub_of_row[rows] == p)
        bag = int(index[rows[0]])
        assert torch.all(index[rows] == bag) and sub.bag_ptr[bag] <= p < sub.bag_ptr[bag + 1]


# ------------------------------------------------------------------------------------------------- CLAM
def _clam_loss_per_bag(model, x: torch.Tensor, ptr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference's per-bag loop: top-k positive / bottom-k negative for the bag's class, top-k negative
    for the other classes (subtyping), BCE per classifier averaged over its cells, averaged over classes."""
    h = model.embed(x)
    scores, logits = model.attention(h), model.instance_head(h)  # (N, K), (N, C)
    c, losses = model.num_classes, []
    for b in range(len(ptr) - 1):
        n = int(ptr[b + 1] - ptr[b])
        k = min(model.config.k_sample, n // 2)
        if k == 0:
            continue
        rows, total = rows_of(ptr, b), 0.0
        for cls in range(c):
            a = scores[rows, cls if scores.shape[1] > 1 else 0]
            top, bottom = a.topk(k).indices, (-a).topk(k).indices
            lg = logits[rows, cls]
            if cls == int(labels[b]):
                target = torch.cat([torch.ones(k), torch.zeros(k)])
                total = total + F.binary_cross_entropy_with_logits(lg[torch.cat([top, bottom])], target)
            elif model.config.subtyping:
                total = total + F.binary_cross_entropy_with_logits(lg[top], torch.zeros(k))
        losses.append(total / (c if model.config.subtyping else 1))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("subtyping", [True, False])
@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
def test_clam_clustering_loss_equals_the_per_bag_reference(name: str, subtyping: bool) -> None:
    torch.manual_seed(0)
    model = create_aggregator(name, in_dim=D, num_classes=3, k_sample=3, subtyping=subtyping).eval()
    x, ptr = batch()
    labels = torch.tensor([0, 1, 2, 1, 2])
    out = model(x, ptr, labels=labels)
    expected = model.config.instance_loss_weight * _clam_loss_per_bag(model, x, ptr, labels)
    torch.testing.assert_close(out.aux_losses["instance"], expected, atol=1e-5, rtol=1e-5)
    assert out.instance_scores["logits"].shape == (x.shape[0], 3)
    assert model(x, ptr).aux_losses == {}  # no labels (prediction): no instance loss


# ------------------------------------------------------------------------------------------------- DTFD
def test_dtfd_afs_attention_is_the_exact_pooling_weight() -> None:
    torch.manual_seed(0)
    model = create_aggregator("dtfd", in_dim=D, num_classes=3, num_groups=3).eval()
    x, ptr = batch()
    with torch.no_grad():
        out = model(x, ptr)
        pooled = segment_sum(out.attention.unsqueeze(1) * model.embed(x), ptr)  # sum_i (b_m a_i) h_i
    torch.testing.assert_close(pooled, out.embedding, atol=1e-5, rtol=1e-4)


def test_dtfd_splits_at_random_in_training_and_deterministically_in_evaluation() -> None:
    torch.manual_seed(0)
    model = create_aggregator("dtfd", in_dim=D, num_classes=3, num_groups=4)
    x, ptr = batch([40, 33])
    labels = torch.tensor([1, 2])
    model.train()
    first, second = (model(x, ptr, labels=labels).aux_losses["tier1"] for _ in range(2))
    assert not torch.allclose(first, second)  # a new random split at every step
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, ptr).logits, model(x, ptr).logits, rtol=0, atol=0)


def test_dtfd_maxmin_keeps_the_contract_that_does_not_depend_on_the_head() -> None:
    """MaxMinS passes each pseudo-bag's top and bottom cells on (chosen for the pseudo-bag's predicted class,
    so growing the head may change them): sums, batch and order invariance, gradients."""
    torch.manual_seed(0)
    model = create_aggregator("dtfd", in_dim=D, num_classes=3, distill="maxmin", num_groups=3).eval()
    x, ptr = batch()
    with torch.no_grad():
        out = model(x, ptr)
        sums = segment_sum(out.attention.double(), ptr)[ptr[1:] > ptr[:-1]]
        torch.testing.assert_close(sums, torch.ones_like(sums))
        for b in range(len(SIZES)):
            alone = model(x[rows_of(ptr, b)], torch.tensor([0, SIZES[b]]))
            torch.testing.assert_close(alone.logits[0], out.logits[b], atol=1e-5, rtol=1e-4)
        perm = torch.cat([torch.randperm(n) + int(ptr[b]) for b, n in enumerate(SIZES)])
        torch.testing.assert_close(model(x[perm], ptr).logits, out.logits, atol=1e-5, rtol=1e-4)
    passed = (out.attention > 0).sum()
    assert passed <= 2 * 3 * len(SIZES)  # at most top + bottom of each pseudo-bag
    model.train()
    o = model(x, ptr, labels=torch.tensor([0, 1, 2, 0, 1]))
    (o.logits.sum() + sum(o.aux_losses.values())).backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------------ ACMIL
def test_acmil_masks_a_random_share_of_each_branch_top_cells_only_in_training() -> None:
    torch.manual_seed(0)
    model = create_aggregator("acmil", in_dim=D, num_classes=3, num_branches=3, masked_instances=5, mask_drop=0.6)
    x, ptr = batch([20, 4, 9])
    index = ptr_to_index(ptr, x.shape[0])
    with torch.no_grad():
        scores = model.attention(model.embed(x)).float()  # (N, K) no dropout: the same scores as the forward
        model.train()
        att = model(x, ptr).instance_scores["branch_attention"]  # (N, K)
    masked = att == 0
    rank = segment_rank(scores, ptr, index)
    for b, n in enumerate([20, 4, 9]):
        top, drop = min(5, n), int(min(5, n) * 0.6)
        for k in range(3):
            m = masked[rows_of(ptr, b), k]
            assert int(m.sum()) == drop and torch.all(rank[rows_of(ptr, b), k][m] < top)
    model.eval()
    with torch.no_grad():
        assert not bool((model(x, ptr).instance_scores["branch_attention"] == 0).any())


def test_acmil_diversity_is_the_mean_pairwise_cosine_of_branch_attention() -> None:
    torch.manual_seed(0)
    model = create_aggregator("acmil", in_dim=D, num_classes=3, num_branches=3, masked_instances=0).eval()
    x, ptr = batch([6, 9])
    out = model(x, ptr, labels=torch.tensor([0, 2]))
    att = out.instance_scores["branch_attention"]
    cos = [F.cosine_similarity(att[rows_of(ptr, b), i], att[rows_of(ptr, b), j], dim=0)
           for b in range(2) for i in range(3) for j in range(i + 1, 3)]  # fmt: skip
    torch.testing.assert_close(out.aux_losses["diversity"], torch.stack(cos).mean())
    assert set(out.aux_losses) == {"branches", "diversity"}
    torch.testing.assert_close(out.attention, att.mean(1))


# -------------------------------------------------------------------------------------------------- RRT
def test_rrt_regions_are_near_equal_runs_along_the_principal_direction() -> None:
    torch.manual_seed(0)
    model = create_aggregator("rrt", in_dim=D, num_classes=2, region_size=8, embed_dim=32, num_heads=4,
                              crmsa_heads=4).eval()  # fmt: skip
    x, ptr = batch([30, 8, 3, 0])
    index = ptr_to_index(ptr, x.shape[0])
    with torch.no_grad():
        h = model.embed(x)
        sub = model.regions(h, ptr, index)
        hc, direction = principal_direction(h, ptr, index)
    assert sub.bag_ptr.tolist() == [0, 4, 5, 6, 6]  # ceil(30 / 8), ceil(8 / 8), 1, 0 regions
    assert sorted((sub.ptr[1:5] - sub.ptr[:4]).tolist()) == [7, 7, 8, 8]  # near-equal sizes
    proj = hc @ direction[0]
    regions = [sub.order[int(sub.ptr[p]) : int(sub.ptr[p + 1])] for p in range(6)]
    spans = [(float(proj[r].min()), float(proj[r].max())) for r in regions[:4]]
    assert all(spans[i][0] > spans[i + 1][1] for i in range(3)), spans  # disjoint runs, in order
    for r in regions:  # inside a region the cells keep their order along the direction (what EPEG sees)
        along = hc[r] @ direction[int(index[r[0]])]
        assert torch.all(along[:-1] >= along[1:])
    perm = torch.cat([torch.randperm(30), torch.randperm(8) + 30, torch.randperm(3) + 38])
    with torch.no_grad():
        shuffled = model.regions(h[perm], ptr, index)
    same = {frozenset(perm[shuffled.order[int(shuffled.ptr[p]) : int(shuffled.ptr[p + 1])]].tolist()) for p in range(6)}
    assert same == {frozenset(r.tolist()) for r in regions}  # independent of the order of the cells


@pytest.mark.parametrize("size", [1, 6, 64])
def test_rrt_epeg_band_product_equals_the_depthwise_convolution(size: int) -> None:
    """EPEG runs as a banded matrix product; it must equal the (k, 1) depthwise convolution it replaces,
    gradients included (float64), at region sizes below, near and at the kernel's reach."""
    from milcore.models.rrt import _SelfAttention

    torch.manual_seed(0)
    layer = _SelfAttention(16, 4, 15, 0.0).double()
    with torch.no_grad():
        layer.epeg.bias.normal_()
    x = torch.randn(3, 4, size, size, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, size, size, dtype=torch.float64)
    ref = layer.epeg(x)
    ref_grads = torch.autograd.grad(ref, [x, layer.epeg.weight, layer.epeg.bias], grad)
    out = layer._epeg(x)
    grads = torch.autograd.grad(out, [x, layer.epeg.weight, layer.epeg.bias], grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_rrt_direction_is_the_first_principal_component_when_one_stands_out() -> None:
    g = torch.Generator().manual_seed(0)
    axis = F.normalize(torch.randn(16, generator=g), dim=0)
    h = torch.randn(200, 16, generator=g) + 4.0 * torch.randn(200, 1, generator=g) * axis  # one dominant axis
    ptr = torch.tensor([0, 120, 200])
    _, v = principal_direction(h, ptr, ptr_to_index(ptr, 200))
    for b in range(2):
        hb = h[rows_of(ptr, b)]
        svd = torch.linalg.svd(hb - hb.mean(0), full_matrices=False).Vh[0]
        assert abs(float(v[b] @ svd)) > 0.999


@pytest.mark.parametrize(("overrides", "message"), [({"epeg_k": 4}, "epeg_k must be odd"),
                                                    ({"embed_dim": 30}, "divisible by num_heads")])  # fmt: skip
def test_rrt_refuses_bad_options(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        create_aggregator("rrt", in_dim=D, num_classes=2, **overrides)


# ------------------------------------------------------------------------------------------------- WiKG
def test_wikg_neighbours_are_the_top_affinities_within_each_bag() -> None:
    x, ptr = batch()
    q, k = x[:, :6], x[:, 6:]
    rows, valid = top_affinities(q, k, ptr, 4)
    blocked = top_affinities(q, k, ptr, 4, block_rows=3)
    import milcore.models.wikg as wikg

    budget, wikg._DENSE_BUDGET = wikg._DENSE_BUDGET, 0  # force the per-bag blockwise path
    try:
        looped = top_affinities(q, k, ptr, 4, block_rows=3)
    finally:
        wikg._DENSE_BUDGET = budget
    for other in (blocked, looped):
        assert torch.equal(other[1], valid) and torch.equal(other[0], rows)
    for b, n in enumerate(SIZES):
        r = rows_of(ptr, b)
        if n == 0:
            continue
        expected = (q[r] @ k[r].T).topk(min(4, n), dim=1).indices + int(ptr[b])
        assert torch.equal(rows[r][:, : min(4, n)], expected) and int(valid[r].sum()) == n * min(4, n)


def test_wikg_attention_rolls_the_readout_out_along_the_edges() -> None:
    torch.manual_seed(0)
    model = create_aggregator("wikg", in_dim=D, num_classes=3, embed_dim=32).eval()
    x, ptr = batch()
    with torch.no_grad():
        out = model(x, ptr)
    readout = out.instance_scores["readout_attention"]
    for att in (out.attention, readout):
        sums = segment_sum(att.double(), ptr)[ptr[1:] > ptr[:-1]]
        torch.testing.assert_close(sums, torch.ones_like(sums))
    assert not torch.allclose(out.attention, readout)


# ------------------------------------------------------------------------------------------------- ILRA
def test_ilra_rank_sets_the_latent_tokens() -> None:
    model = create_aggregator("ilra", in_dim=D, num_classes=2, rank=5, num_layers=3, embed_dim=32, num_heads=4)
    assert [tuple(b.latent.shape) for b in model.blocks] == [(1, 5, 32)] * 3
    with pytest.raises(InvalidArgumentError, match=r"embed_dim \(30\) must be divisible by num_heads \(8\)"):
        create_aggregator("ilra", in_dim=D, num_classes=2, embed_dim=30)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_ilra_gather_with_folded_projections_equals_multi_head_attention_per_bag(dropout: float) -> None:
    """The shared queries absorb the key and value projection: outputs, weights and gradients equal the
    per-bag ``softmax(q (W_k k + b_k)^T) (W_v k + b_v)``, float64 (with attention dropout: the same mask)."""
    torch.manual_seed(0)
    model = create_aggregator("ilra", in_dim=D, num_classes=2, rank=3, embed_dim=16, num_heads=4, dropout=dropout)
    block = model.pooling.double().train()
    query = torch.randn(3, 16, dtype=torch.float64)
    sizes = [4, 1, 9]
    ptr = F.pad(torch.tensor(sizes).cumsum(0), (1, 0)).tolist()
    keys = torch.randn(ptr[-1], 16, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    out, weights = block.gather(query, keys, ptr, weights=True)  # (B, Q, E), (N, H, Q)
    torch.manual_seed(1)
    mask = F.dropout(torch.ones(ptr[-1], 4 * 3, dtype=torch.float64), dropout, True).view(-1, 4, 3)  # same draw

    q0 = block.fc_q(query)
    q = block.q(q0).view(3, 4, 4)  # (Q, H, d)
    k, v = block.kv(keys).view(-1, 2, 4, 4).unbind(1)  # (N, H, d) each
    ref, ref_w = [], []
    for a, b in itertools.pairwise(ptr):
        att = (torch.einsum("qhd,nhd->nhq", q, k[a:b]) / 2).softmax(0)  # (n, H, Q), d = 4
        ref_w.append(att)
        ref.append(torch.einsum("nhq,nhd->qhd", att * mask[a:b], v[a:b]).reshape(3, 16))
    ref_out = block._finish(query, q0, torch.stack(ref))
    torch.testing.assert_close(weights, torch.cat(ref_w).float())
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    probe = torch.randn_like(out)
    params = [keys, *block.parameters()]
    for a, b in zip(torch.autograd.grad((out * probe).sum(), params, allow_unused=True),
                    torch.autograd.grad((ref_out * probe).sum(), params, allow_unused=True), strict=True):  # fmt: skip
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("clam", {}, r"unknown aggregator 'clam'; did you mean 'clam_sb', 'clam_mb'"),
        ("dtfd", {"distill": "max"}, r"distill must be one of 'afs', 'maxmin', got 'max'"),
        ("acmil", {"mask_drop": 1.0}, r"mask_drop must be in \[0.0, 1.0\)"),
        ("wikg", {"aggregation": "gat"}, "aggregation must be one of 'bi-interaction', 'gcn', 'sage'"),
        ("clam_sb", {"k_sample": 0}, "k_sample must be >= 1"),
    ],
)
def test_unknown_aggregators_and_bad_options_are_one_line_errors(name: str, overrides: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as err:
        create_aggregator(name, in_dim=D, num_classes=3, **overrides)
    assert "\n" not in str(err.value)
