"""Labelled bags for training and inference: held in memory when they fit a budget, streamed otherwise.

A :class:`FeatureStore` is the data object of the engine: a fixed list of a bank's bags with their
labels, patient groups and class names (from a :class:`~milcore.data.cohort.Cohort`), sliced into
packed batches (``x`` + ``ptr``). :func:`open_bags` builds one from a bank and a cohort table.

Measured on this project's reference machine: a 610 MB float16 bank loads into RAM in about 0.15 s,
while DataLoader workers that hand over one bag per item stall near 1,000 bags/s. So the store
slices packed batches in-process from one in-memory matrix when the bags fit ``memory_budget``, and
only otherwise streams with DataLoader workers that each collate a *whole batch* (many bags) per item,
keeping resident memory independent of the cohort's size. Features are read on first use, so building
a store (and checking what it will be used for) costs no feature read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from feature_cache.errors import InvalidArgumentError, UserError
from milcore.data.bag import BagBatch

if TYPE_CHECKING:
    from milcore.data.cohort import Cohort

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


@dataclass
class _Resident:
    """The in-memory features of a store and of every view on it (read once, on first use)."""

    ids: list[str]
    x: torch.Tensor | None = None  # (N, D), the bank's dtype
    coords: torch.Tensor | None = None  # (N, 2) float32
    loaded: bool = False
    announced: bool = False  # streaming: said once
    spare: int = 0  # bytes of the memory budget left beside x, for copies in a compute dtype
    cast: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # dtype -> (N, D) copy of x in it


class FeatureStore:
    """The features of a fixed list of bags from a bank, with their labels, sliced into packed batches.

    Args:
        bank: a :class:`feature_cache.bank.BankReader` (or anything with ``read_packed``,
            ``read_packed_coords``, ``bag_sizes``, ``index_of``, ``dim``).
        bag_ids: the bags this store serves, in order.
        memory_budget_bytes: hold everything in memory when the features fit (float16 kept as is); a copy
            in a model's compute dtype (:meth:`gather` ``dtype``) is kept too when it fits beside them.
        with_coords: also provide coordinates (aggregators that declare they need them).
        labels: (B,) int labels aligned with ``bag_ids`` (-1: unknown); ``None`` for unlabelled bags.
        groups: (B,) patient of each bag (bags of one patient stay in one fold); ``None``: the bag itself.
        classes: class names that ``labels`` index.
        cohort: the cohort table the labels come from (recorded by run folders), if any.

    Raises:
        UserError: labels or groups not aligned with ``bag_ids``, or a label outside ``classes``.
    """

    def __init__(
        self, bank, bag_ids: Sequence[str], memory_budget_bytes: int = 4 << 30, with_coords: bool = False, *,
        labels: Sequence[int] | np.ndarray | None = None, groups: Sequence[str] | np.ndarray | None = None,
        classes: Sequence[str] | None = None, cohort: Cohort | None = None,
    ) -> None:  # fmt: skip
        self.bank = bank
        self.bag_ids = [str(b) for b in bag_ids]
        all_sizes = bank.bag_sizes()
        self.sizes = np.asarray([all_sizes[bank.index_of(b)] for b in self.bag_ids], dtype=np.int64)
        self.dim = int(bank.dim)
        self.with_coords = with_coords
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)  # (B,)
        self.groups = None if groups is None else np.asarray(groups)  # (B,)
        self.classes = None if classes is None else [str(c) for c in classes]
        self.cohort = cohort
        for name, arr in (("labels", self.labels), ("groups", self.groups)):
            if arr is not None and len(arr) != len(self.bag_ids):
                raise UserError(f"{name}: {len(arr)} values for {len(self.bag_ids)} bags")
        if self.labels is not None and self.classes is not None and len(self.labels) and (
                self.labels.max() >= len(self.classes) or self.labels.min() < -1):  # fmt: skip
            raise UserError(f"labels must lie in [-1, {len(self.classes) - 1}] for classes {self.classes}")
        itemsize = np.dtype(bank.dtype).itemsize
        self._need = int(self.sizes.sum()) * self.dim * itemsize
        self.in_memory = self._need <= memory_budget_bytes
        self._copy_budget = memory_budget_bytes - self._need  # bytes left for copies in a compute dtype
        self._resident = _Resident(list(self.bag_ids), spare=self._copy_budget)
        self._starts = np.concatenate(([0], np.cumsum(self.sizes)[:-1])).astype(np.int64)  # (B,) rows in x

    @property
    def num_classes(self) -> int:
        """Number of classes (from ``classes``, else from the largest label)."""
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if self.labels is not None and len(self.labels) else 0

    def require_labels(self, what: str = "training") -> np.ndarray:
        """(B,) the labels, refusing a store without them or with unknown ones."""
        if self.labels is None:
            raise UserError(f"{what} needs labelled bags (build the store with labels=, or with open_bags from a "
                            "cohort table)")  # fmt: skip
        unknown = [b for b, y in zip(self.bag_ids, self.labels, strict=True) if y < 0]
        if unknown:
            raise UserError(f"{what}: {len(unknown)} bag(s) have no label (e.g. {', '.join(unknown[:3])})")
        return self.labels

    def _load(self) -> None:
        """Read the features (and coordinates) of every bag of the original store, once."""
        res = self._resident
        if res.loaded or not self.in_memory:
            return
        if not res.ids:
            res.loaded = True
            return
        x, _ = self.bank.read_packed(res.ids)  # (N, D); a damaged bank raises here, and a retry reads again
        coords = None
        if self.with_coords:
            c, _ = self.bank.read_packed_coords(res.ids)
            coords = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))
        res.x, res.coords = torch.from_numpy(np.ascontiguousarray(x)), coords
        res.loaded = True  # only once everything was read
        log.debug("holding %d bags (%.1f MB) in memory", len(res.ids), self._need / 1e6)

    def _resident_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The in-memory features to gather ``dtype`` batches from: a copy in ``dtype`` made once, for a
        compute dtype other than the bank's and float32, when it fits the memory budget beside the bank's
        copy (converting every batch cost a quarter of a mean-pooling fit on the demo bank: ``benchmarks/README.md``,
        issue 18 speed); otherwise the bank's copy, converted batch by batch."""
        res = self._resident
        if dtype in (res.x.dtype, torch.float32):
            return res.x
        if dtype not in res.cast:
            size = res.x.numel() * dtype.itemsize
            if size > res.spare:
                return res.x
            res.cast[dtype] = res.x.to(dtype)  # the same rounding as converting each batch
            res.spare -= size
        return res.cast[dtype]

    def __len__(self) -> int:
        return len(self.bag_ids)

    def view(self, bag_ids: Sequence[str]) -> FeatureStore:
        """A store over a subset of these bags (with their labels and groups) sharing the same memory (no copy)."""
        pos = {b: i for i, b in enumerate(self.bag_ids)}
        missing = [str(b) for b in bag_ids if str(b) not in pos]
        if missing:
            raise UserError(f"{len(missing)} bag(s) are not in this store (e.g. {', '.join(missing[:3])})")
        idx = np.asarray([pos[str(b)] for b in bag_ids], dtype=np.int64)
        sub = object.__new__(FeatureStore)
        sub.__dict__.update(self.__dict__)
        sub.bag_ids = [self.bag_ids[i] for i in idx]
        sub.sizes = self.sizes[idx]
        sub._starts = self._starts[idx]
        sub.labels = None if self.labels is None else self.labels[idx]
        sub.groups = None if self.groups is None else self.groups[idx]
        return sub

    def with_coordinates(self) -> FeatureStore:
        """This store serving the cells' coordinates too (itself if it already does; otherwise a copy that
        reads features and coordinates on first use)."""
        if self.with_coords:
            return self
        other = object.__new__(FeatureStore)
        other.__dict__.update(self.__dict__)
        other.with_coords = True
        other._resident = _Resident(list(self._resident.ids), spare=self._copy_budget)
        return other

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
        self, positions: np.ndarray, cap: int = 0, rng: np.random.Generator | None = None, keep: float = 1.0,
        dtype: torch.dtype = torch.float32,
    ) -> BagBatch:  # fmt: skip
        """Collate the bags at ``positions``, optionally with random rows left out of each.

        Args:
            positions: bag positions in this store.
            cap: keep at most this many random rows per bag (0 = no cap).
            rng: generator for the random rows (no sub-sampling without one).
            keep: keep this fraction of each bag's rows, at least one (instance dropout, a training
                augmentation); applied before ``cap``.
            dtype: the floating dtype of ``x``: float32, or the compute dtype of a model that casts its
                input first (the bank's values rounded once, as that cast would round them).

        Returns:
            A :class:`BagBatch` (``x`` in ``dtype``, ``ptr``, ``coords`` when kept, ``bag_ids``) whose
            per-bag ``metadata`` holds the bag's ``position`` in this store.

        Raises:
            InvalidArgumentError: ``dtype`` is not a floating dtype (integer features would be truncated).
        """
        if not dtype.is_floating_point:
            raise InvalidArgumentError(f"features are gathered in a floating dtype, got {dtype}")
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
        self._load()
        res = self._resident
        if res.x is not None:
            starts = np.repeat(self._starts[positions], counts)
            index = torch.from_numpy(starts + local)
            x = self._resident_in(dtype).index_select(0, index).to(dtype)
            coords = None if res.coords is None else res.coords.index_select(0, index)
        else:
            ids = [self.bag_ids[p] for p in positions]
            full, _ = self.bank.read_packed(ids)
            starts = np.repeat(np.concatenate(([0], np.cumsum(self.sizes[positions])))[:-1], counts)
            sel = starts + local
            x = torch.from_numpy(np.ascontiguousarray(full[sel])).to(dtype)
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
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[BagBatch]:
        """Yield packed batches over the bags in ``order`` within an instance ``budget``.

        ``cap`` and ``keep`` sub-sample each bag as in :meth:`gather` (the budget counts the kept rows);
        ``x`` comes in ``dtype`` as there.
        In memory, batches are sliced in-process; when streaming and ``num_workers > 0``, a DataLoader
        whose items are *whole batches* reads and collates them in worker processes.
        """
        sizes = self.sizes if keep >= 1 else np.asarray([_kept(int(n), 0, keep) for n in self.sizes])
        groups = budget_batches(sizes, order, budget, cap)
        sample = bool(cap) or keep < 1
        if self.in_memory:
            self._load()
        elif len(self.bag_ids) and not self._resident.announced:
            self._resident.announced = True
            log.info("streaming %d bags (%.1f GB > memory budget) from %s", len(self.bag_ids), self._need / 1e9,
                     getattr(self.bank, "path", "the bank"))  # fmt: skip
        if self._resident.x is not None or num_workers == 0:
            for i, g in enumerate(groups):  # one generator per batch, as in the workers: same sub-samples
                rng = np.random.default_rng(None if seed is None else [seed, i]) if sample else None
                batch = self.gather(g, cap, rng, keep, dtype)
                yield batch.pin_memory() if pin_memory else batch
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(_BatchDataset(self, groups, cap, seed, keep, dtype), batch_size=None, shuffle=False,
                            num_workers=num_workers, pin_memory=pin_memory, collate_fn=_identity)  # fmt: skip
        yield from loader


class _BatchDataset(torch.utils.data.Dataset):
    """Items are whole packed batches, read and collated in the worker processes (picklable)."""

    def __init__(
        self, store: FeatureStore, groups: list[np.ndarray], cap: int, seed: int | None, keep: float = 1.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:  # fmt: skip
        self.store, self.groups, self.cap, self.seed, self.keep, self.dtype = store, groups, cap, seed, keep, dtype

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> BagBatch:
        sample = bool(self.cap) or self.keep < 1
        rng = np.random.default_rng(None if self.seed is None else [self.seed, i]) if sample else None
        return self.store.gather(self.groups[i], self.cap, rng, self.keep, self.dtype)


def _kept(n: int, cap: int, keep: float) -> int:
    """Rows kept of a bag of ``n``: the ``keep`` fraction (at least one), then at most ``cap``."""
    m = n if keep >= 1 else min(n, max(1, round(n * keep)))
    return min(m, cap) if cap > 0 else m


def _identity(item: BagBatch) -> BagBatch:
    return item


def open_bags(bank: Any, cohort: Any, task: str | None = None, *, group_column: str | None = "patient",
              memory_budget_gb: float = 4.0, with_coords: bool = False) -> FeatureStore:  # fmt: skip
    """The labelled bags of a bank: a :class:`FeatureStore` over the cohort's bags that the bank holds.

    Args:
        bank: a bank path or an open :class:`feature_cache.bank.BankReader`.
        cohort: a cohort table path (``task`` names its label column) or a :class:`~milcore.data.cohort.Cohort`.
        task: the label column when ``cohort`` is a path.
        group_column: cohort column grouping several bags of one patient (kept together by the folds).
        memory_budget_gb: bags whose features fit this budget are held in memory, others streamed.
        with_coords: also serve cell coordinates (aggregators that declare they need them).

    Returns:
        The store, in cohort order; bags of the cohort that the bank lacks, and bags with no cell, are left
        out (logged with counts both ways).

    Raises:
        UserError: an unreadable bank or table, a missing column, no bag in common.
    """
    from feature_cache.bank import open_reader
    from milcore.data.cohort import Cohort, join_bank, read_cohort

    reader = open_reader(bank) if isinstance(bank, str | Path) else bank
    if not isinstance(cohort, Cohort):
        if task is None:
            raise UserError(f"{cohort}: give the label column (task=...) to read a cohort table")
        cohort = read_cohort(cohort, task, group_column=group_column)
    table, join = join_bank(cohort, reader.bag_ids(), sizes=reader.bag_sizes())
    log.info("%s: %s", table.path, join.summary())
    return FeatureStore(reader, list(table.bag_ids), int(memory_budget_gb * (1 << 30)), with_coords,
                        labels=table.labels, groups=table.groups, classes=table.classes, cohort=table)  # fmt: skip
