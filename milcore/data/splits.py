"""Patient-level, stratified cross-validation splits with a separate validation fold, saved with the run.

The default protocol rotates ``k`` stratified parts (as in SCEMILA's 3/1/1 scheme for k = 5): in
fold ``i`` part ``i`` is the test set, part ``i + 1`` the validation set (early stopping, model
selection, calibration) and the remaining parts train. Several bags of one patient (a ``patient``
group) always fall in the same part, so no patient is in two partitions of one fold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from feature_cache.errors import UserError

SPLITS_FORMAT = "milcore-splits"


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold of bag ids.

    Attributes:
        index: fold number.
        train: training bags.
        val: validation bags (early stopping, selection, calibration).
        test: held-out test bags.
    """

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def _assign_parts(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Part index per bag: whole groups assigned so that every part gets its share of every class."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups.astype(str), return_inverse=True)
    # a group's class is its most frequent label (groups rarely mix labels)
    group_label = np.array([np.bincount(labels[inverse == g]).argmax() for g in range(len(uniq))])
    group_size = np.bincount(inverse, minlength=len(uniq))
    part_of_group = np.empty(len(uniq), dtype=np.int64)
    load = np.zeros((k, int(labels.max()) + 1))
    for cls in np.unique(group_label):
        members = np.flatnonzero(group_label == cls)
        members = members[rng.permutation(len(members))]
        members = members[np.argsort(-group_size[members], kind="stable")]  # big groups first
        for g in members:  # greedy: the part with the fewest bags of this class (ties: random order)
            order = rng.permutation(k)
            p = order[np.argmin(load[order, cls])]
            part_of_group[g] = p
            load[p, cls] += group_size[g]
    return part_of_group[inverse]


def make_folds(
    bag_ids: Sequence[str],
    labels: np.ndarray,
    k: int = 5,
    seed: int = 0,
    groups: np.ndarray | None = None,
    classes: Sequence[str] | None = None,
) -> list[Fold]:
    """Stratified, patient-grouped k-fold with a rotating validation part.

    Args:
        bag_ids: (B,) bag ids.
        labels: (B,) int labels.
        k: number of folds (>= 3: train, validation and test parts).
        seed: random seed; same inputs and seed give the same folds.
        groups: (B,) patient of each bag; defaults to one patient per bag.
        classes: class names, for error messages.

    Raises:
        UserError: ``k`` < 3, or a class has fewer patients than folds.
    """
    labels = np.asarray(labels, dtype=np.int64)
    ids = np.asarray(bag_ids, dtype=object)
    if k < 3:
        raise UserError(f"cross-validation needs at least 3 folds (train, validation, test), got {k}")
    groups = ids if groups is None else np.asarray(groups, dtype=object)
    for cls in np.unique(labels):
        n_patients = len(np.unique(groups[labels == cls].astype(str)))
        if n_patients < k:
            name = classes[cls] if classes is not None else str(cls)
            raise UserError(f"class {name!r} has {n_patients} patients, fewer than the {k} folds; "
                            f"use fewer folds or more patients")  # fmt: skip
    parts = _assign_parts(labels, groups, k, seed)
    folds = []
    for i in range(k):
        test, val = parts == i, parts == (i + 1) % k
        train = ~(test | val)
        folds.append(Fold(i, tuple(ids[train]), tuple(ids[val]), tuple(ids[test])))
    check_no_leakage(folds, dict(zip(ids, groups, strict=True)))
    return folds


def check_no_leakage(folds: Sequence[Fold], group_of: dict[str, str] | None = None) -> None:
    """Raise if a bag, or a patient (via ``group_of``), appears in two partitions of one fold."""
    for fold in folds:
        parts = {"train": fold.train, "val": fold.val, "test": fold.test}
        owner: dict[str, str] = {}
        for name, ids in parts.items():
            for b in ids:
                key = str(group_of.get(b, b)) if group_of else b
                if key in owner and owner[key] != name:
                    raise UserError(f"fold {fold.index}: patient {key!r} is in both {owner[key]} and {name}")
                owner[key] = name


def save_folds(folds: Sequence[Fold], path: str | Path, meta: dict | None = None) -> None:
    """Write folds as JSON (with a format tag and optional metadata such as seed and k)."""
    payload = {"format": SPLITS_FORMAT, "format_version": 1, "meta": meta or {},
               "folds": [asdict(f) for f in folds]}  # fmt: skip
    Path(path).write_text(json.dumps(payload, indent=1))


def load_folds(path: str | Path) -> list[Fold]:
    """Read folds written by :func:`save_folds`."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable splits file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != SPLITS_FORMAT:
        raise UserError(f"{path}: not a milcore splits file")
    return [Fold(int(f["index"]), tuple(f["train"]), tuple(f["val"]), tuple(f["test"])) for f in payload["folds"]]
