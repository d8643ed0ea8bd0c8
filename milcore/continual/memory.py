"""The exemplar memory: bag ids and 64-bit bank row indices (never feature copies), under an instance budget.

An entry is a *pseudo-bag*: some rows of one stored bag, in priority order (the selection strategy's
ranking). Entries belong to a group ``(task, label)``; the budget, counted in instances, is shared
equally by the groups seen so far, and when a new group arrives every group is shrunk by recomputing
its bag quotas and keeping each pseudo-bag's best rows (a prefix). Rows are global row indices into
the bank (``offsets[bag] + local``), int64, so a memory is small, exact and valid for any bank size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import InvalidArgumentError, UserError


def group_budgets(budget: int, num_groups: int) -> list[int]:
    """Split an instance budget equally over groups (the remainder to the first ones).

    Raises:
        InvalidArgumentError: a budget smaller than one instance per group.
    """
    if num_groups < 1:
        return []
    if budget < num_groups:
        raise InvalidArgumentError(
            f"memory budget of {budget} instance(s) is smaller than one instance per class "
            f"({num_groups} task/class groups to keep)"
        )
    base, extra = divmod(budget, num_groups)
    return [base + (1 if g < extra else 0) for g in range(num_groups)]


def bag_quotas(budget: int, sizes: Sequence[int], per_bag: int) -> np.ndarray:
    """Instances kept per bag for one group, bags in priority order.

    ``ceil(budget / per_bag)`` bags (at most all) share the budget evenly; what a small bag cannot
    take goes to the next bags with room, so the quotas sum to exactly ``min(budget, sum(sizes))``.

    Args:
        budget: the group's instances.
        sizes: (n,) available rows per candidate bag, in priority order.
        per_bag: target instances per stored bag (more bags, fewer cells each, means more diversity).

    Returns:
        (n,) int64 quotas (0 = bag not kept).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    quotas = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) == 0 or budget <= 0:
        return quotas
    m = min(len(sizes), max(1, math.ceil(budget / max(per_bag, 1))))
    base, extra = divmod(budget, m)
    quotas[:m] = np.minimum(sizes[:m], base + (np.arange(m) < extra))
    left = budget - int(quotas.sum())
    while left > 0:  # hand the rest to bags with room, in priority order (the first m, then the others)
        room = sizes - quotas
        open_bags = np.flatnonzero(room > 0)
        if len(open_bags) == 0:
            break
        share = max(1, left // len(open_bags))
        for b in open_bags:
            add = int(min(room[b], share, left))
            quotas[b] += add
            left -= add
            if left == 0:
                break
    return quotas


@dataclass
class ExemplarMemory:
    """Stored pseudo-bags: ``rows[ptr[e]:ptr[e+1]]`` are the bank rows of entry ``e``.

    Attributes:
        budget: the instance budget.
        per_bag: target instances per stored bag.
        bag_ids: (E,) bag id per entry.
        labels: (E,) int64 global label per entry.
        tasks: (E,) int64 task index per entry.
        ptr: (E+1,) int64 offsets into ``rows``.
        rows: (M,) int64 global bank rows, each entry's rows in priority order.
    """

    budget: int
    per_bag: int = 32
    bag_ids: list[str] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    tasks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ptr: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise InvalidArgumentError(f"memory budget must be >= 1 instance, got {self.budget}")

    def __len__(self) -> int:
        return len(self.bag_ids)

    @property
    def num_instances(self) -> int:
        """Stored instances (never more than the budget)."""
        return int(self.ptr[-1])

    def groups(self) -> list[tuple[int, int]]:
        """The ``(task, label)`` groups stored, in order of arrival."""
        seen: list[tuple[int, int]] = []
        for key in zip(self.tasks.tolist(), self.labels.tolist(), strict=True):
            if key not in seen:
                seen.append(key)
        return seen

    def entry_rows(self, e: int) -> np.ndarray:
        """(n,) bank rows of entry ``e``."""
        return self.rows[self.ptr[e] : self.ptr[e + 1]]

    def update(self, new_groups: Sequence[tuple[int, int, Sequence[tuple[str, np.ndarray]]]]) -> None:
        """Add groups and shrink every group to its share of the budget.

        Args:
            new_groups: ``(task, label, candidates)`` where candidates are ``(bag_id, rows)`` in priority
                order, each ``rows`` the bag's global bank rows in priority order.

        Raises:
            InvalidArgumentError: the budget is smaller than one instance per group.
        """
        old = {key: [] for key in self.groups()}
        for e, key in enumerate(zip(self.tasks.tolist(), self.labels.tolist(), strict=True)):
            old[key].append((self.bag_ids[e], self.entry_rows(e)))
        for task, label, cands in new_groups:
            old[(int(task), int(label))] = [(str(b), np.asarray(r, dtype=np.int64)) for b, r in cands]
        budgets = group_budgets(self.budget, len(old))
        ids, labels, tasks, sizes, chunks = [], [], [], [], []
        for (task, label), budget in zip(old, budgets, strict=True):
            cands = old[(task, label)]
            quotas = bag_quotas(budget, [len(r) for _, r in cands], self.per_bag)
            for (bag, rows), q in zip(cands, quotas, strict=True):
                if q > 0:
                    ids.append(bag)
                    labels.append(label)
                    tasks.append(task)
                    sizes.append(int(q))
                    chunks.append(rows[:q])
        self.bag_ids = ids
        self.labels = np.asarray(labels, dtype=np.int64)
        self.tasks = np.asarray(tasks, dtype=np.int64)
        self.ptr = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64))).astype(np.int64)
        self.rows = np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, dtype=np.int64)

    def validate(self, bank: Any) -> None:
        """Check that every stored bag is in ``bank`` and every row inside its bag.

        Raises:
            UserError: naming the missing bags (or the first bag with rows outside it).
        """
        missing = sorted({b for b in self.bag_ids if b not in bank})
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise UserError(f"{bank.path}: the exemplar memory points to {len(missing)} bag(s) missing from this "
                            f"bank: {shown}")  # fmt: skip
        offsets = bank.offsets()
        for e, bag in enumerate(self.bag_ids):
            i = bank.index_of(bag)
            rows = self.entry_rows(e)
            if len(rows) and (rows.min() < offsets[i] or rows.max() >= offsets[i + 1]):
                raise UserError(f"{bank.path}: the exemplar memory's rows for bag {bag} fall outside the bag "
                                f"(rows {offsets[i]}..{offsets[i + 1] - 1})")  # fmt: skip

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        """Plain lists and int64 arrays (safe for ``torch.save`` loaded with ``weights_only=True``)."""
        return {"budget": self.budget, "per_bag": self.per_bag, "bag_ids": list(self.bag_ids),
                "labels": self.labels.tolist(), "tasks": self.tasks.tolist(), "ptr": self.ptr.tolist(),
                "rows": self.rows.tolist()}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ExemplarMemory:
        """Inverse of :meth:`to_state`."""
        return cls(int(state["budget"]), int(state["per_bag"]), [str(b) for b in state["bag_ids"]],
                   np.asarray(state["labels"], dtype=np.int64), np.asarray(state["tasks"], dtype=np.int64),
                   np.asarray(state["ptr"], dtype=np.int64), np.asarray(state["rows"], dtype=np.int64))  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write a ``.npz`` (no pickled objects) atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, budget=np.int64(self.budget), per_bag=np.int64(self.per_bag),
                 bag_ids=np.asarray(self.bag_ids, dtype=np.str_), labels=self.labels, tasks=self.tasks,
                 ptr=self.ptr, rows=self.rows)  # fmt: skip
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExemplarMemory:
        """Read a memory written by :meth:`save` (``allow_pickle=False``)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(int(z["budget"]), int(z["per_bag"]), [str(b) for b in z["bag_ids"]],
                           z["labels"].astype(np.int64), z["tasks"].astype(np.int64), z["ptr"].astype(np.int64),
                           z["rows"].astype(np.int64))  # fmt: skip
        except (OSError, KeyError, ValueError) as exc:
            raise UserError(f"{path}: not an exemplar memory ({exc})") from exc
