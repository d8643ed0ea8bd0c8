"""Bag cross-entropy, class weights, BEL and the instance loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from feature_cache.errors import InvalidArgumentError
from milcore.losses import BagEmbeddingLoss, bag_cross_entropy, class_weights, instance_cross_entropy
from milcore.models import create_aggregator


def test_class_weights_are_balanced_and_zero_for_absent_classes() -> None:
    w = class_weights(torch.tensor([0, 0, 0, 1]), num_classes=3)
    torch.testing.assert_close(w, torch.tensor([4 / 9, 4 / 3, 0.0]))


def test_bag_cross_entropy_matches_torch_and_uses_weights() -> None:
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 1])
    torch.testing.assert_close(bag_cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    w = torch.tensor([1.0, 2.0, 0.5])
    torch.testing.assert_close(bag_cross_entropy(logits.bfloat16(), labels, w),
                               F.cross_entropy(logits.bfloat16().float(), labels, weight=w))  # fmt: skip
    with pytest.raises(InvalidArgumentError):
        bag_cross_entropy(logits, labels[:3])


def test_instance_cross_entropy_gives_every_cell_its_bag_label() -> None:
    logits = torch.randn(5, 2)
    ptr, labels = torch.tensor([0, 2, 5]), torch.tensor([1, 0])
    expected = F.cross_entropy(logits, torch.tensor([1, 1, 0, 0, 0]))
    torch.testing.assert_close(instance_cross_entropy(logits, ptr, labels), expected)
    weights = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    expected = 0.5 * (F.cross_entropy(logits[:1], torch.tensor([1])) + F.cross_entropy(logits[4:], torch.tensor([0])))
    torch.testing.assert_close(instance_cross_entropy(logits, ptr, labels, weights), expected)
    assert instance_cross_entropy(logits[:0], torch.tensor([0, 0]), labels[:1]) == 0


def test_bel_pulls_to_own_prototype_and_pushes_others() -> None:
    bel = BagEmbeddingLoss(num_classes=2, dim=2, margin=0.5, momentum=0.0)
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    assert bel(e, labels) == pytest.approx(0.0, abs=1e-6)  # on their prototypes, orthogonal (distance 1 > margin)
    torch.testing.assert_close(bel.prototypes, e)
    close = torch.tensor([[1.0, 0.2], [0.2, 1.0]])  # near the other class too: push term > 0
    assert bel.eval()(close, labels) > 0


def test_bel_prototypes_update_with_momentum_only_in_training() -> None:
    bel = BagEmbeddingLoss(num_classes=3, dim=2, momentum=0.5)
    bel(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert bel.initialized.tolist() == [True, False, False]
    bel(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    torch.testing.assert_close(bel.prototypes[0], F.normalize(torch.tensor([0.5, 0.5]), dim=0))
    bel.eval()
    bel(torch.tensor([[-1.0, 0.0]]), torch.tensor([0]))
    torch.testing.assert_close(bel.prototypes[0], F.normalize(torch.tensor([0.5, 0.5]), dim=0))


def test_bel_separates_class_embeddings_of_any_aggregator() -> None:
    """Optimising a model on BEL alone makes same-class bag embeddings closer than other-class ones."""
    torch.manual_seed(0)
    model = create_aggregator("mean", in_dim=4, num_classes=2, embed_dim=8)
    bel = BagEmbeddingLoss(num_classes=2, dim=8, margin=0.8)
    x = torch.randn(40, 4)
    x[20:] += 1.5
    ptr, labels = torch.arange(0, 41, 5), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = bel(model(x, ptr).embedding, labels)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    e = F.normalize(model(x, ptr).embedding.detach(), dim=1)
    cos = e @ e.T
    same = labels[:, None] == labels[None, :]
    assert cos[same].mean() > cos[~same].mean() + 0.3


def test_bel_resize_keeps_prototypes_and_rejects_bad_shapes() -> None:
    bel = BagEmbeddingLoss(num_classes=2, dim=3)
    bel(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    old = bel.prototypes.clone()
    bel.resize(4)
    assert bel.prototypes.shape == (4, 3) and bel.initialized.tolist() == [True, True, False, False]
    torch.testing.assert_close(bel.prototypes[:2], old)
    assert bel(torch.randn(2, 3), torch.tensor([3, 0])) >= 0
    with pytest.raises(InvalidArgumentError, match=r"\(B, 3\)"):
        bel(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(InvalidArgumentError):
        BagEmbeddingLoss(num_classes=2, dim=3, margin=3.0)
    assert bel(torch.randn(0, 3), torch.tensor([], dtype=torch.long)) == 0
