"""Bags for training and inference: held in memory when they fit a budget, streamed otherwise.

Measured on this project's reference machine: a 610 MB float16 bank loads into RAM in about 0.15 s,
while DataLoader workers that hand over one bag per item stall near 1,000 bags/s. So the store
slices packed batches in-process from one in-memory matrix when the bags fit ``memory_budget``, and
only otherwise streams with DataLoader workers that each collate a *whole batch* (many bags) per item,
keeping resident memory independent of the cohort's size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from milcore.data.bag import BagBatch

log = logging.getLogger(__name__)


def budget_batches(
    sizes: np.ndarray, order: np.ndarray, budget: int, cap: int = 0
) -> list[np.ndarray]:
    """Group bags (in ``order``) into batches whose instance counts stay within ``budget``.

    Args:
        sizes: (B,) instances per bag.
        order: bag positions in the order to batch them.
        budget: instances per batch; a bag larger than it forms a batch alone.
        cap: per-bag sub-sampling cap counted instead of the full size (0 = none).

    Returns:
        Lists of bag positions.
    """
    batches: list[np.ndarray] = []
    current: list[int] = []
    used = 0
    for pos in order:
        n = int(sizes[pos]) if cap <= 0 else min(int(sizes[pos]), cap)
        n = max(n, 1)
        if current and used + n > budget:
            batches.append(np.asarray(current, dtype=np.int64))
            current, used = [], 0
        current.append(int(pos))
        used += n
    if current:
        batches.append(np.asarray(current, dtype=np.int64))
    return batches


class FeatureStore:
    """The features of a fixed list of bags from a bank, sliced into packed batches.

    Args:
        bank: a :class:`feature_cache.bank.BankReader` (or anything with ``read_packed``,
            ``read_packed_coords``, ``bag_sizes``, ``index_of``, ``dim``).
        bag_ids: the bags this store serves, in order.
        memory_budget_bytes: hold everything in memory when the features fit (float16 kept as is).
        with_coords: also provide coordinates (graph MIL uses them).
    """

    def __init__(
        self, bank, bag_ids: Sequence[str], memory_budget_bytes: int = 4 << 30, with_coords: bool = False
    ) -> None:
        self.bank = bank
        self.bag_ids = [str(b) for b in bag_ids]
        all_sizes = bank.bag_sizes()
        self.sizes = np.asarray([all_sizes[bank.index_of(b)] for b in self.bag_ids], dtype=np.int64)
        self.dim = int(bank.dim)
        self.with_coords = with_coords
        itemsize = np.dtype(bank.dtype).itemsize
        need = int(self.sizes.sum()) * self.dim * itemsize
        self.in_memory = need <= memory_budget_bytes
        self._x: torch.Tensor | None = None
        self._coords: torch.Tensor | None = None
        self._starts = np.concatenate(([0], np.cumsum(self.sizes)[:-1])).astype(np.int64)  # (B,) rows in _x
        if self.in_memory and len(self.bag_ids):
            x, _ = bank.read_packed(self.bag_ids)  # (N, D)
            self._x = torch.from_numpy(np.ascontiguousarray(x))
            if with_coords:
                c, _ = bank.read_packed_coords(self.bag_ids)
                self._coords = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))
            log.debug("holding %d bags (%.1f MB) in memory", len(self.bag_ids), need / 1e6)
        elif len(self.bag_ids):
            log.info("streaming %d bags (%.1f GB > memory budget) from %s", len(self.bag_ids), need / 1e9,
                     getattr(bank, "path", "the bank"))  # fmt: skip

    def __len__(self) -> int:
        return len(self.bag_ids)

    def view(self, bag_ids: Sequence[str]) -> FeatureStore:
        """A store over a subset of these bags sharing the same memory (no copy)."""
        pos = {b: i for i, b in enumerate(self.bag_ids)}
        idx = np.asarray([pos[str(b)] for b in bag_ids], dtype=np.int64)
        sub = object.__new__(FeatureStore)
        sub.__dict__.update(self.__dict__)
        sub.bag_ids = [self.bag_ids[i] for i in idx]
        sub.sizes = self.sizes[idx]
        sub._starts = self._starts[idx]
        return sub

    def moments(self, budget: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and standard deviation over every cell of these bags (float64 sums).

        Streams in batches of ``budget`` cells, so it works whether the store is in memory or not.

        Returns:
            ``(mean (D,), std (D,))`` as float32.
        """
        total = np.zeros(self.dim, dtype=np.float64)
        squares = np.zeros(self.dim, dtype=np.float64)
        count = 0
        for batch in self.batches(np.arange(len(self)), budget):
            x = batch.x.double().numpy()  # (n, D)
            total += x.sum(0)
            squares += np.square(x).sum(0)
            count += len(x)
        if count == 0:
            return np.zeros(self.dim, dtype=np.float32), np.ones(self.dim, dtype=np.float32)
        mean = total / count
        var = np.maximum(squares / count - np.square(mean), 0.0)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)

    def gather(
        self, positions: np.ndarray, cap: int = 0, rng: np.random.Generator | None = None, keep: float = 1.0
    ) -> BagBatch:
        """Collate the bags at ``positions``, optionally with random rows left out of each.

        Args:
            positions: bag positions in this store.
            cap: keep at most this many random rows per bag (0 = no cap).
            rng: generator for the random rows (no sub-sampling without one).
            keep: keep this fraction of each bag's rows, at least one (instance dropout, a training
                augmentation); applied before ``cap``.

        Returns:
            A :class:`BagBatch` (float32 ``x``, ``ptr``, ``coords`` when kept, ``bag_ids``) whose
            per-bag ``metadata`` holds the bag's ``position`` in this store.
        """
        rows_per_bag = []
        for pos in positions:
            n = int(self.sizes[pos])
            m = _kept(n, cap, keep) if rng is not None else n
            if m < n:
                rows_per_bag.append(np.sort(rng.choice(n, m, replace=False)))
            else:
                rows_per_bag.append(np.arange(n))
        counts = np.asarray([len(r) for r in rows_per_bag], dtype=np.int64)
        ptr = torch.from_numpy(np.concatenate(([0], np.cumsum(counts))).astype(np.int64))
        local = np.concatenate(rows_per_bag) if len(rows_per_bag) else np.zeros(0, dtype=np.int64)
        if self._x is not None:
            starts = np.repeat(self._starts[positions], counts)
            index = torch.from_numpy(starts + local)
            x = self._x.index_select(0, index).float()
            coords = None if self._coords is None else self._coords.index_select(0, index)
        else:
            ids = [self.bag_ids[p] for p in positions]
            full, _ = self.bank.read_packed(ids)
            starts = np.repeat(np.concatenate(([0], np.cumsum(self.sizes[positions])))[:-1], counts)
            sel = starts + local
            x = torch.from_numpy(np.ascontiguousarray(full[sel], dtype=np.float32))
            coords = None
            if self.with_coords:
                c, _ = self.bank.read_packed_coords(ids)
                coords = torch.from_numpy(np.ascontiguousarray(c[sel], dtype=np.float32))
        ids = [self.bag_ids[int(p)] for p in positions]
        return BagBatch(x, ptr, bag_ids=ids, coords=coords, metadata=[{"position": int(p)} for p in positions])

    def batches(
        self,
        order: np.ndarray,
        budget: int,
        cap: int = 0,
        seed: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        keep: float = 1.0,
    ) -> Iterator[BagBatch]:
        """Yield packed batches over the bags in ``order`` within an instance ``budget``.

        ``cap`` and ``keep`` sub-sample each bag as in :meth:`gather` (the budget counts the kept rows).
        In memory, batches are sliced in-process; when streaming and ``num_workers > 0``, a DataLoader
        whose items are *whole batches* reads and collates them in worker processes.
        """
        sizes = self.sizes if keep >= 1 else np.asarray([_kept(int(n), 0, keep) for n in self.sizes])
        groups = budget_batches(sizes, order, budget, cap)
        sample = bool(cap) or keep < 1
        if self._x is not None or num_workers == 0:
            for i, g in enumerate(groups):  # one generator per batch, as in the workers: same sub-samples
                rng = np.random.default_rng(None if seed is None else [seed, i]) if sample else None
                batch = self.gather(g, cap, rng, keep)
                yield batch.pin_memory() if pin_memory else batch
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(_BatchDataset(self, groups, cap, seed, keep), batch_size=None, shuffle=False,
                            num_workers=num_workers, pin_memory=pin_memory, collate_fn=_identity)  # fmt: skip
        yield from loader


class _BatchDataset(torch.utils.data.Dataset):
    """Items are whole packed batches, read and collated in the worker processes (picklable)."""

    def __init__(
        self, store: FeatureStore, groups: list[np.ndarray], cap: int, seed: int | None, keep: float = 1.0
    ) -> None:
        self.store, self.groups, self.cap, self.seed, self.keep = store, groups, cap, seed, keep

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> BagBatch:
        sample = bool(self.cap) or self.keep < 1
        rng = np.random.default_rng(None if self.seed is None else [self.seed, i]) if sample else None
        return self.store.gather(self.groups[i], self.cap, rng, self.keep)


def _kept(n: int, cap: int, keep: float) -> int:
    """Rows kept of a bag of ``n``: the ``keep`` fraction (at least one), then at most ``cap``."""
    m = n if keep >= 1 else min(n, max(1, round(n * keep)))
    return min(m, cap) if cap > 0 else m


def _identity(item: BagBatch) -> BagBatch:
    return item
