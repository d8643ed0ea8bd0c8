"""Bags and packed batches of bags: one ``(N, D)`` matrix plus ``ptr`` offsets (PyG style).

A :class:`Bag` is one patient's cells. A :class:`BagBatch` concatenates ``B`` bags into ``x (N, D)`` with
``ptr (B+1,)``: bag ``b`` is rows ``ptr[b]:ptr[b+1]``; ``index (N,)`` (the bag of every row) is derived
on demand. Padding exists only behind :meth:`BagBatch.to_padded`, for models that need dense attention.

Example:
    >>> bags = [Bag(torch.randn(3, 8), label=1, bag_id="p1"), Bag(torch.randn(5, 8), label=0, bag_id="p2")]
    >>> batch = collate_bags(bags)
    >>> batch.ptr.tolist(), batch.labels.tolist()
    ([0, 3, 8], [1, 0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from feature_cache.errors import InvalidArgumentError
from milcore.ops import ptr_to_index, ptr_to_sizes, to_padded

__all__ = ["Bag", "BagBatch", "collate_bags"]


@dataclass
class Bag:
    """One bag (patient): its instance features and what is known about it.

    Attributes:
        x: ``(n, D)`` instance features (``n`` may be 0).
        label: bag label (class index) or ``None`` when unknown (prediction time).
        bag_id: identifier joining the bag to the cohort table.
        coords: optional ``(n, k)`` spatial coordinates of the instances.
        metadata: free-form per-bag information (age, sex, site, ...).
    """

    x: Tensor
    label: int | None = None
    bag_id: str = ""
    coords: Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor) or self.x.dim() != 2:
            shape = tuple(self.x.shape) if isinstance(self.x, Tensor) else type(self.x).__name__
            raise InvalidArgumentError(f"bag {self.bag_id!r}: x must be a (n, D) tensor, got {shape}")
        if self.coords is not None and (self.coords.dim() != 2 or self.coords.shape[0] != self.x.shape[0]):
            raise InvalidArgumentError(
                f"bag {self.bag_id!r}: coords must be (n={self.x.shape[0]}, k), got {tuple(self.coords.shape)}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class BagBatch:
    """``B`` bags packed into one matrix.

    Attributes:
        x: ``(N, D)`` features of all instances, bag after bag.
        ptr: ``(B+1,)`` int64 offsets, ``ptr[0] == 0``, ``ptr[-1] == N``.
        labels: ``(B,)`` int64 labels, or ``None`` when any bag's label is unknown.
        bag_ids: the ``B`` bag ids.
        coords: ``(N, k)`` coordinates, or ``None`` (all bags have coords or none does).
        metadata: the ``B`` per-bag metadata dicts.
    """

    x: Tensor
    ptr: Tensor
    labels: Tensor | None = None
    bag_ids: list[str] = field(default_factory=list)
    coords: Tensor | None = None
    metadata: list[dict[str, Any]] = field(default_factory=list)
    _index: Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.x.dim() != 2:
            raise InvalidArgumentError(f"BagBatch.x must be (N, D), got {tuple(self.x.shape)}")
        if self.ptr.dim() != 1 or self.ptr.numel() < 1 or self.ptr.is_floating_point():
            raise InvalidArgumentError("BagBatch.ptr must be a 1-D integer tensor of B+1 offsets")
        b = self.ptr.numel() - 1
        if not self.bag_ids:
            self.bag_ids = [str(i) for i in range(b)]
        if not self.metadata:
            self.metadata = [{} for _ in range(b)]
        if len(self.bag_ids) != b or len(self.metadata) != b:
            raise InvalidArgumentError(f"BagBatch: {b} bags but {len(self.bag_ids)} ids, {len(self.metadata)} metadata")
        if self.labels is not None and self.labels.shape != (b,):
            raise InvalidArgumentError(f"BagBatch.labels must be (B={b},), got {tuple(self.labels.shape)}")

    @property
    def num_bags(self) -> int:
        """``B``."""
        return self.ptr.numel() - 1

    @property
    def num_instances(self) -> int:
        """``N``."""
        return self.x.shape[0]

    @property
    def sizes(self) -> Tensor:
        """``(B,)`` bag sizes."""
        return ptr_to_sizes(self.ptr)

    @property
    def index(self) -> Tensor:
        """``(N,)`` bag index of every row (derived from ``ptr``, cached)."""
        if self._index is None or self._index.device != self.ptr.device:
            self._index = ptr_to_index(self.ptr, self.num_instances)
        return self._index

    def __len__(self) -> int:
        return self.num_bags

    def to_padded(self, fill_value: float = 0.0) -> tuple[Tensor, Tensor]:
        """Dense copy for models that need it: ``(B, N_max, D)`` features and a ``(B, N_max)`` bool mask."""
        return to_padded(self.x, self.ptr, self.index, fill_value=fill_value)

    def bag(self, i: int) -> Bag:
        """The ``i``-th bag as a :class:`Bag` (views, no copy)."""
        start, end = int(self.ptr[i]), int(self.ptr[i + 1])
        return Bag(
            x=self.x[start:end],
            label=None if self.labels is None else int(self.labels[i]),
            bag_id=self.bag_ids[i],
            coords=None if self.coords is None else self.coords[start:end],
            metadata=self.metadata[i],
        )

    def unbatch(self) -> list[Bag]:
        """All bags, in order."""
        return [self.bag(i) for i in range(self.num_bags)]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BagBatch:
        """A copy on ``device`` (tensors only; ids and metadata are shared)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(
            self, x=move(self.x), ptr=move(self.ptr), labels=move(self.labels), coords=move(self.coords), _index=None
        )

    def pin_memory(self) -> BagBatch:
        """Page-locked copy for fast asynchronous host-to-GPU copies (DataLoader calls this)."""

        def pin(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.pin_memory()

        return replace(
            self, x=pin(self.x), ptr=pin(self.ptr), labels=pin(self.labels), coords=pin(self.coords), _index=None
        )


def collate_bags(bags: Sequence[Bag]) -> BagBatch:
    """Pack bags into a :class:`BagBatch` (usable as a DataLoader ``collate_fn``).

    Raises:
        InvalidArgumentError: no bags, different feature dims or dtypes, or coords on only some bags.
    """
    if len(bags) == 0:
        raise InvalidArgumentError("collate_bags needs at least one bag")
    dims = {b.x.shape[1] for b in bags}
    if len(dims) > 1:
        raise InvalidArgumentError(f"collate_bags: bags have different feature dims {sorted(dims)}")
    dtypes = {b.x.dtype for b in bags}
    if len(dtypes) > 1:
        raise InvalidArgumentError(f"collate_bags: bags have different dtypes {sorted(map(str, dtypes))}")
    with_coords = [b.coords is not None for b in bags]
    if any(with_coords) and not all(with_coords):
        raise InvalidArgumentError("collate_bags: some bags have coords and others do not")
    sizes = torch.tensor([len(b) for b in bags], dtype=torch.long)
    ptr = torch.zeros(len(bags) + 1, dtype=torch.long)
    torch.cumsum(sizes, 0, out=ptr[1:])
    known = all(b.label is not None for b in bags)
    return BagBatch(
        x=torch.cat([b.x for b in bags]),
        ptr=ptr,
        labels=torch.tensor([int(b.label) for b in bags], dtype=torch.long) if known else None,
        bag_ids=[b.bag_id for b in bags],
        coords=torch.cat([b.coords for b in bags]) if all(with_coords) else None,
        metadata=[b.metadata for b in bags],
    )
