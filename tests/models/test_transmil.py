"""TransMIL specifics: PPEG equivalence, exact vs Nystrom choice per bag, mask respect."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from milcore.models import create_aggregator
from milcore.models.transmil import _PPEG, _nystrom
from milcore.ops import to_padded


def test_merged_ppeg_kernel_equals_the_three_convolutions() -> None:
    torch.manual_seed(0)
    ppeg = _PPEG(8)
    side, dim = 5, 8
    tokens = torch.randn(2, side * side, dim)
    mask = torch.ones(2, side * side, dtype=torch.bool)
    out = ppeg(tokens, mask, torch.tensor([side * side, side * side]))
    grid = tokens.transpose(1, 2).reshape(2, dim, side, side)
    ref = grid + ppeg.proj7(grid) + ppeg.proj5(grid) + ppeg.proj3(grid)  # the paper's PPEG
    torch.testing.assert_close(out, ref.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_ppeg_of_a_small_bag_in_a_big_canvas_equals_its_own_grid() -> None:
    torch.manual_seed(0)
    ppeg = _PPEG(4)
    tokens = torch.randn(2, 20, 4)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, :7], mask[1, :20] = True, True  # sides 3 and 5
    both = ppeg(tokens * mask.unsqueeze(-1), mask, torch.tensor([7, 20]))
    alone = ppeg(tokens[:1, :7], mask[:1, :7], torch.tensor([7]))
    torch.testing.assert_close(both[0, :7], alone[0], atol=1e-6, rtol=1e-5)
    assert torch.all(both[0, 7:] == 0)


def test_large_bags_use_nystrom_alone_and_small_bags_exact_together() -> None:
    torch.manual_seed(0)
    model = create_aggregator("transmil", in_dim=6, num_classes=2, dim=16, num_heads=2,
                              exact_max_tokens=40, num_landmarks=8).eval()  # fmt: skip
    sizes = [20, 90, 3, 60]
    ptr = F.pad(torch.tensor(sizes).cumsum(0), (1, 0))
    x = torch.randn(int(ptr[-1]), 6)
    with torch.no_grad():
        out = model(x, ptr)
        for b, n in enumerate(sizes):
            rows = slice(int(ptr[b]), int(ptr[b + 1]))
            alone = model(x[rows], torch.tensor([0, n]))
            torch.testing.assert_close(alone.logits[0], out.logits[b], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(alone.attention, out.attention[rows], atol=1e-6, rtol=1e-4)
        padded = model.forward_padded(*to_padded(x, ptr))
    torch.testing.assert_close(padded.logits, out.logits, atol=1e-5, rtol=1e-4)


def test_nystrom_with_one_landmark_per_token_is_close_to_exact_attention() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 4) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(_nystrom(q, k, v, num_landmarks=12, iters=20), exact, atol=1e-3, rtol=1e-3)
    coarse = _nystrom(q, k, v, num_landmarks=4, iters=6)
    assert coarse.shape == exact.shape and torch.isfinite(coarse).all()


def test_padding_never_leaks_into_a_bag() -> None:
    """Whatever sits in the padded slots, the outputs of the real rows do not change."""
    torch.manual_seed(0)
    model = create_aggregator("transmil", in_dim=6, num_classes=3, dim=16, num_heads=2).eval()
    dense = torch.randn(2, 9, 6)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 4:] = False
    noisy = dense.clone()
    noisy[0, 4:] = 100.0
    with torch.no_grad():
        a, b = model.forward_padded(dense, mask), model.forward_padded(noisy, mask)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.attention, b.attention)


def test_explicit_and_fused_exact_attention_agree_in_both_dtypes() -> None:
    """Both forms of exact attention (plain products below EXPLICIT_MAX_TOKENS, the fused kernel above)."""
    from milcore.models import transmil

    torch.manual_seed(0)
    for length in (7, 150, 400, 1100):  # both forms in both dtypes
        q, k, v = (torch.randn(1, 2, length, 8) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(transmil._exact_attention(q, k, v, 0.0), ref, atol=1e-5, rtol=1e-4)
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        out = transmil._exact_attention(qb, kb, vb, 0.0).float()
        torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)


def test_packed_path_equals_padded_path_on_mixed_bag_sizes() -> None:
    """The packed path runs without padding; the padded path masks: same logits, attention, gradients."""
    torch.manual_seed(0)
    model = create_aggregator("transmil", in_dim=6, num_classes=2, dim=16, num_heads=2).eval()
    sizes = [1, 17, 5, 40]
    ptr = F.pad(torch.tensor(sizes).cumsum(0), (1, 0))
    x = torch.randn(int(ptr[-1]), 6, requires_grad=True)
    packed = model(x, ptr)
    dense, mask = to_padded(x, ptr)
    padded = model.forward_padded(dense, mask)
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed.attention, padded.attention, atol=1e-6, rtol=1e-4)
    (g_packed,) = torch.autograd.grad(packed.logits.sum(), x)
    (g_padded,) = torch.autograd.grad(padded.logits.sum(), x)
    torch.testing.assert_close(g_packed, g_padded, atol=1e-5, rtol=1e-4)


def test_instance_attention_survives_a_head_that_attends_only_to_the_class_token() -> None:
    """A head whose class token puts all but e-200 of its weight on itself still gives a distribution over the
    instances (its float32 weights there underflow to 0, which once left a bag's attention summing to 7/8)."""
    from milcore.models.transmil import instance_attention

    torch.manual_seed(0)
    scores = [torch.randn(8, 1 + 30), torch.randn(8, 1 + 30)]  # 2 layers, 8 heads, class token + 30 cells
    naive = sum(s.softmax(-1) for s in scores)[:, 1:]
    torch.testing.assert_close(instance_attention(scores), (naive / naive.sum(-1, keepdim=True)).mean(0))
    for s in scores:
        s[0, 0] = 200.0  # head 0: the class token attends to itself alone, in both layers
    att = instance_attention(scores)
    assert torch.isfinite(att).all() and abs(float(att.sum()) - 1.0) < 1e-5
    old_way = sum(s.softmax(-1) for s in scores)[:, 1:]  # the weights themselves: head 0 underflows to 0
    assert float(old_way[0].sum()) == 0.0
    padded = instance_attention([torch.cat([s, torch.full((8, 5), float("-inf"))], -1) for s in scores])
    torch.testing.assert_close(padded[:30], att)  # masked keys (-inf) get no weight
    assert torch.all(padded[30:] == 0)


def test_last_layer_of_class_tokens_only_equals_the_full_layer() -> None:
    """The last layer forms only the class tokens' queries: its class rows, logits and gradients equal the full
    layer's (exact bags and a Nystrom bag, packed and padded), in float64."""
    torch.manual_seed(0)
    model = create_aggregator("transmil", in_dim=6, num_classes=3, dim=16, num_heads=2, exact_max_tokens=40,
                              num_landmarks=8).double().train()  # fmt: skip
    layer = model.layers[-1]
    sizes = [1, 17, 60, 5]  # 61 tokens: Nystrom
    sptr = F.pad(torch.tensor(sizes).cumsum(0) + torch.arange(1, 5), (1, 0)).tolist()
    x = torch.randn(sptr[-1], 16, dtype=torch.float64, requires_grad=True)
    full, full_scores = layer.forward_packed(x, sptr, 40)
    cls, scores = layer.forward_class_packed(x, sptr, 40)
    torch.testing.assert_close(cls, full[sptr[:-1]], atol=1e-12, rtol=1e-10)
    for a, b in zip(scores, full_scores, strict=True):
        torch.testing.assert_close(a, b)
    probe = torch.randn_like(cls)
    grads = [torch.autograd.grad((out * probe).sum(), [x, *layer.parameters()]) for out in (cls, full[sptr[:-1]])]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    small = x.detach()[sptr[1] : sptr[2]].unsqueeze(0)  # the 17-cell bag with its class token, padded form
    padded_full, _ = layer(small, None)
    padded_cls, _ = layer.forward_class(small, None)
    torch.testing.assert_close(padded_cls, padded_full[:, 0], atol=1e-12, rtol=1e-10)
