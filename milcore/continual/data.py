"""Bags and pseudo-bags of a bank as packed batches: training items, their cache, and inference.

A training *item* is a whole bag (``rows is None``) or a stored pseudo-bag (some of its bank rows).
Bags are read once from the bank (float16 kept, float32 on use) and cached for the run; memory
entries are resolved from their global row indices through the bank's CSR offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from milcore.data.store import budget_batches


@dataclass
class Items:
    """Training items.

    Attributes:
        bag_ids: (K,) bag of each item.
        labels: (K,) int64 global labels.
        rows: per item, ``None`` (all rows of the bag) or (n,) int64 global bank rows.
        from_memory: (K,) bool, True for replayed pseudo-bags.
    """

    bag_ids: list[str] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rows: list[np.ndarray | None] = field(default_factory=list)
    from_memory: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def __len__(self) -> int:
        return len(self.bag_ids)

    @classmethod
    def bags(cls, bag_ids: Sequence[str], labels: np.ndarray) -> Items:
        """Whole bags."""
        return cls(list(bag_ids), np.asarray(labels, dtype=np.int64), [None] * len(bag_ids),
                   np.zeros(len(bag_ids), dtype=bool))  # fmt: skip

    def __add__(self, other: Items) -> Items:
        return Items(self.bag_ids + other.bag_ids, np.concatenate([self.labels, other.labels]),
                     self.rows + other.rows, np.concatenate([self.from_memory, other.from_memory]))  # fmt: skip


@dataclass
class TrainBatch:
    """One packed training batch.

    Attributes:
        x: (N, D) float32 features; ptr: (B+1,) offsets.
        y: (B,) int64 labels; from_memory: (B,) bool.
        class_weights: (C,) loss weights of the seen classes.
    """

    x: torch.Tensor
    ptr: torch.Tensor
    y: torch.Tensor
    from_memory: torch.Tensor
    class_weights: torch.Tensor


class BagData:
    """Cached access to a bank's bags for one continual run.

    Args:
        bank: an open :class:`feature_cache.bank.BankReader`.
    """

    def __init__(self, bank) -> None:
        self.bank = bank
        self.offsets = np.asarray(bank.offsets(), dtype=np.int64)  # (B_bank+1,)
        self.dim = int(bank.dim)
        self._cache: dict[str, torch.Tensor] = {}
        self.shift: torch.Tensor | None = None  # (D,)
        self.scale: torch.Tensor | None = None  # (D,)

    def standardize(self, bag_ids: Sequence[str]) -> None:
        """Standardise every feature with the mean and std of these bags' cells (then frozen).

        The runner fits it on the first task's training bags only, so no later task leaks into it and
        old tasks, the memory and new tasks all see one fixed transform.
        """
        self.preload(bag_ids)
        x = torch.cat([self._cache[b].float() for b in bag_ids])  # (N, D)
        self.shift = x.mean(dim=0)
        self.scale = x.std(dim=0).clamp(min=1e-6)

    def preload(self, bag_ids: Sequence[str]) -> None:
        """Read the given bags (one packed read) into the cache."""
        todo = [b for b in dict.fromkeys(bag_ids) if b not in self._cache]
        if not todo:
            return
        x, ptr = self.bank.read_packed(todo)  # (N, D), (B+1,)
        x = torch.from_numpy(np.ascontiguousarray(x))
        for i, b in enumerate(todo):
            self._cache[b] = x[int(ptr[i]) : int(ptr[i + 1])]

    def bag(self, bag_id: str) -> torch.Tensor:
        """(n, D) float32 features of one bag."""
        if bag_id not in self._cache:
            self.preload([bag_id])
        x = self._cache[bag_id].float()
        return x if self.shift is None else (x - self.shift) / self.scale

    def size(self, bag_id: str) -> int:
        """Rows of a bag."""
        i = self.bank.index_of(bag_id)
        return int(self.offsets[i + 1] - self.offsets[i])

    def global_rows(self, bag_id: str, local: np.ndarray) -> np.ndarray:
        """Bag-local row positions -> int64 global bank rows."""
        return self.offsets[self.bank.index_of(bag_id)] + np.asarray(local, dtype=np.int64)

    def item_x(self, items: Items, k: int) -> torch.Tensor:
        """(n, D) features of item ``k``."""
        x = self.bag(items.bag_ids[k])
        rows = items.rows[k]
        if rows is None:
            return x
        local = rows - self.offsets[self.bank.index_of(items.bag_ids[k])]
        return x[torch.from_numpy(local)]

    def item_sizes(self, items: Items) -> np.ndarray:
        """(K,) rows per item."""
        return np.asarray(
            [self.size(b) if r is None else len(r) for b, r in zip(items.bag_ids, items.rows, strict=True)],
            dtype=np.int64,
        )

    def batches(self, items: Items, order: np.ndarray, budget: int, cap: int, rng: np.random.Generator):
        """Yield ``(positions, x (N, D), ptr (B+1,))`` over items in ``order`` within an instance budget.

        Items larger than ``cap`` (> 0) are randomly sub-sampled to ``cap`` rows.
        """
        sizes = self.item_sizes(items)
        for group in budget_batches(sizes, order, budget, cap):
            xs = []
            for k in group:
                x = self.item_x(items, int(k))
                if cap > 0 and len(x) > cap:
                    x = x[torch.from_numpy(np.sort(rng.choice(len(x), cap, replace=False)))]
                xs.append(x)
            counts = [len(x) for x in xs]
            ptr = torch.tensor(np.concatenate(([0], np.cumsum(counts))), dtype=torch.int64)
            yield group, torch.cat(xs) if xs else torch.zeros(0, self.dim), ptr


@dataclass
class Inference:
    """A model's outputs over whole bags, in the order asked.

    Attributes:
        logits: (B, C) float64; embedding: (B, E) float32.
        attention: per bag, (n,) float32 attention (the bag-label column for multi-branch models).
    """

    logits: np.ndarray
    embedding: np.ndarray
    attention: list[np.ndarray]


@torch.inference_mode()
def infer(model: torch.nn.Module, data: BagData, bag_ids: Sequence[str], labels: np.ndarray | None = None,
          budget: int = 16384, device: torch.device | None = None) -> Inference:  # fmt: skip
    """Run ``model`` over whole bags (no sub-sampling), in packed batches.

    Args:
        labels: (B,) labels; with a multi-column attention, the column of each bag's label is returned.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    items = Items.bags(list(bag_ids), np.zeros(len(bag_ids), dtype=np.int64) if labels is None else labels)
    n = len(items)
    logits: list[np.ndarray | None] = [None] * n
    emb: list[np.ndarray | None] = [None] * n
    att: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * n
    rng = np.random.default_rng(0)
    for group, x, ptr in data.batches(items, np.arange(n), budget, 0, rng):
        out = model(x.to(device), ptr.to(device))
        lg = out.logits.float().cpu().numpy().astype(np.float64)
        em = out.embedding.float().cpu().numpy()
        a = out.attention.float().cpu().numpy()
        p = ptr.numpy()
        for j, k in enumerate(group):
            logits[k], emb[k] = lg[j], em[j]
            bag_att = a[p[j] : p[j + 1]]
            if bag_att.ndim == 2:
                col = int(items.labels[k]) if labels is not None and bag_att.shape[1] > 1 else 0
                bag_att = bag_att[:, min(col, bag_att.shape[1] - 1)]
            att[k] = bag_att
    model.train(was_training)
    return Inference(np.stack(logits) if n else np.zeros((0, 0)), np.stack(emb) if n else np.zeros((0, 0)), att)
