"""Bag, BagBatch and collate_bags."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from feature_cache.errors import InvalidArgumentError
from milcore.data import Bag, BagBatch, collate_bags


def make_bags(with_coords: bool = False) -> list[Bag]:
    torch.manual_seed(0)
    sizes, labels = [3, 0, 5], [1, 0, 2]
    return [
        Bag(torch.randn(n, 4), label=y, bag_id=f"p{i}", coords=torch.rand(n, 2) if with_coords else None,
            metadata={"age": 40 + i})
        for i, (n, y) in enumerate(zip(sizes, labels, strict=True))
    ]


def test_collate_packs_rows_and_offsets() -> None:
    bags = make_bags(with_coords=True)
    batch = collate_bags(bags)
    assert batch.ptr.tolist() == [0, 3, 3, 8] and batch.ptr.dtype == torch.long
    assert batch.x.shape == (8, 4) and batch.coords.shape == (8, 2)
    assert batch.labels.tolist() == [1, 0, 2] and batch.bag_ids == ["p0", "p1", "p2"]
    assert batch.metadata[2] == {"age": 42}
    assert batch.index.tolist() == [0, 0, 0, 2, 2, 2, 2, 2]
    assert batch.sizes.tolist() == [3, 0, 5] and len(batch) == 3 and batch.num_instances == 8
    torch.testing.assert_close(batch.x[3:], bags[2].x)


def test_unbatch_round_trip() -> None:
    bags = make_bags(with_coords=True)
    for original, back in zip(bags, collate_bags(bags).unbatch(), strict=True):
        torch.testing.assert_close(back.x, original.x)
        torch.testing.assert_close(back.coords, original.coords)
        assert (back.label, back.bag_id, back.metadata) == (original.label, original.bag_id, original.metadata)


def test_to_padded_has_a_mask() -> None:
    batch = collate_bags(make_bags())
    dense, mask = batch.to_padded()
    assert dense.shape == (3, 5, 4) and mask.sum(1).tolist() == [3, 0, 5]
    torch.testing.assert_close(dense[mask], batch.x)
    assert torch.all(dense[~mask] == 0)


def test_unknown_labels_give_none() -> None:
    bags = make_bags()
    bags[1].label = None
    assert collate_bags(bags).labels is None


def test_bad_bags_are_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="x must be a"):
        Bag(torch.randn(3))
    with pytest.raises(InvalidArgumentError, match="coords"):
        Bag(torch.randn(3, 2), coords=torch.randn(2, 2))
    with pytest.raises(InvalidArgumentError, match="at least one"):
        collate_bags([])
    with pytest.raises(InvalidArgumentError, match="feature dims"):
        collate_bags([Bag(torch.randn(2, 3)), Bag(torch.randn(2, 4))])
    with pytest.raises(InvalidArgumentError, match="coords"):
        collate_bags([Bag(torch.randn(2, 3), coords=torch.zeros(2, 2)), Bag(torch.randn(2, 3))])
    with pytest.raises(InvalidArgumentError, match="labels"):
        BagBatch(torch.randn(4, 2), torch.tensor([0, 4]), labels=torch.tensor([0, 1]))


def test_to_device_and_dataloader_collate() -> None:
    loader = DataLoader(make_bags(), batch_size=2, collate_fn=collate_bags)
    first, second = list(loader)
    assert first.ptr.tolist() == [0, 3, 3] and second.ptr.tolist() == [0, 5]
    moved = first.to("cpu", non_blocking=True)
    assert moved.x.device.type == "cpu" and moved.bag_ids == first.bag_ids
    assert moved.index.tolist() == [0, 0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pin_memory() -> None:
    batch = collate_bags(make_bags(with_coords=True)).pin_memory()
    assert batch.x.is_pinned() and batch.ptr.is_pinned() and batch.coords.is_pinned()
    gpu = batch.to("cuda", non_blocking=True)
    assert gpu.index.device.type == "cuda"
