"""The inputs of a training run, read and checked together before anything is written.

:func:`load_inputs` opens the bank, reads the cohort table for the task, joins them and checks that
the result can be cross-validated (two classes or more, as many patients per class as folds), with
messages that name the cohort file, the task column and the bank. The fingerprints recorded in a
run's ``config.yaml`` (:func:`bank_fingerprint`, :func:`labels_fingerprint`) let ``--resume`` tell
whether the bank and the labels are still the ones the run was trained on, whatever their paths.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from feature_cache.errors import UserError
from milcore.data.cohort import Cohort, JoinReport, join_bank, read_cohort

if TYPE_CHECKING:
    from feature_cache.bank import BankReader

#: Bags whose feature bytes enter the bank fingerprint (spread over the sorted ids): enough to tell
#: a re-extracted bank from the original, cheap on a bank of any size.
SAMPLED_BAGS = 8


@dataclass(frozen=True)
class RunInputs:
    """A bank and a cohort table joined for one task.

    Attributes:
        bank: the open bank.
        cohort: the labelled bags the bank holds, in cohort order.
        join: how the two matched.
    """

    bank: BankReader
    cohort: Cohort
    join: JoinReport

    @property
    def classes(self) -> list[str]:
        """Class names, in label order."""
        return list(self.cohort.classes)


def _patients(cohort: Cohort, label: int) -> int:
    groups = cohort.groups if cohort.groups is not None else cohort.bag_ids
    return len({str(g) for g in groups[cohort.labels == label]})


def check_trainable(cohort: Cohort, bank_path: str | Path, folds: int) -> None:
    """Raise unless ``cohort`` (already joined with the bank) can be cross-validated in ``folds`` folds.

    Raises:
        UserError: fewer than two classes with a bag in the bank, or a class with fewer patients than
            folds; the message names the cohort file, the task column, the bank and the classes found.
    """
    counts = cohort.class_counts()
    present = {c: n for c, n in counts.items() if n > 0}
    where = f"{cohort.path}: column {cohort.label_column!r} joined with {bank_path}"
    if len(present) < 2:
        notes = []
        absent = [c for c, n in counts.items() if n == 0]
        if absent:
            notes.append(f"{', '.join(repr(c) for c in absent)} only on bags the bank lacks")
        if cohort.missing_labels:
            notes.append(f"{sum(cohort.missing_labels.values())} rows with a missing label left out")
        found = ", ".join(f"{c!r} ({n} bags)" for c, n in present.items()) or "none"
        raise UserError(f"{where}: {len(present)} class found ({found}); training needs at least 2 classes"
                        + (f" ({'; '.join(notes)})" if notes else ""))  # fmt: skip
    for i, name in enumerate(cohort.classes):
        n = _patients(cohort, i)
        if 0 < n < folds:
            raise UserError(f"{where}: class {name!r} has {n} patients, fewer than --folds {folds}; use fewer "
                            "folds or more patients")  # fmt: skip


def load_inputs(bank_path: str | Path, cohort_path: str | Path, task: str, *, folds: int,
                group_column: str | None = "patient") -> RunInputs:  # fmt: skip
    """Open the bank, read the cohort for ``task``, join them and check they can be cross-validated.

    Raises:
        UserError: an unreadable bank or table, a missing column, no bag in common, too few classes
            or patients (see :func:`check_trainable`).
    """
    from feature_cache.bank import open_reader

    bank = open_reader(bank_path)
    cohort, join = join_bank(read_cohort(cohort_path, task, group_column=group_column), bank.bag_ids(),
                             sizes=bank.bag_sizes())
    check_trainable(cohort, bank_path, folds)
    return RunInputs(bank, cohort, join)


def bank_fingerprint(bank: BankReader, bag_ids: Sequence[str]) -> str:
    """SHA-256 of what a run reads from the bank: the encoder's fingerprint, each used bag's id and cell
    count, the bank's per-bag checksums where it stores them, and the features of a few sampled bags."""
    h = hashlib.sha256()
    h.update(bank.info.fingerprint().encode())
    ids = sorted(str(b) for b in bag_ids)
    pos = np.asarray([bank.index_of(b) for b in ids], dtype=np.int64)
    sizes = bank.bag_sizes()[pos] if len(pos) else np.zeros(0, dtype=np.int64)
    h.update(json.dumps([ids, sizes.tolist()]).encode())
    checksums = bank.checksums
    if checksums is not None and len(pos):
        h.update(np.ascontiguousarray(np.asarray(checksums)[pos]).tobytes())
    if ids:
        for i in np.unique(np.linspace(0, len(ids) - 1, min(SAMPLED_BAGS, len(ids))).round().astype(int)):
            h.update(np.ascontiguousarray(bank.read(ids[i])).tobytes())
    return h.hexdigest()


def labels_fingerprint(cohort: Cohort) -> str:
    """SHA-256 of the classes (in label order) and every used bag's label and patient group."""
    groups = cohort.groups if cohort.groups is not None else cohort.bag_ids
    rows = sorted((str(b), cohort.classes[int(y)], str(g)) for b, y, g in
                  zip(cohort.bag_ids, cohort.labels, groups, strict=True))  # fmt: skip
    return hashlib.sha256(json.dumps([list(cohort.classes), rows]).encode()).hexdigest()


def read_run_config(run: str | Path, why: str = "") -> dict | None:
    """The ``config.yaml`` mapping of a run folder (what :func:`milcore.crossval.train_run` recorded).

    Args:
        run: the run folder.
        why: what the caller needs it for, appended to the error (``"cannot check what --resume would continue"``).

    Returns:
        The mapping, or ``None`` when the folder has no ``config.yaml``.

    Raises:
        UserError: the file is unreadable, not YAML, or not a mapping (naming it).
    """
    from feature_cache.config import read_yaml

    path = Path(run) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return read_yaml(path, what="run configuration")
    except UserError as exc:
        raise UserError(f"{exc}; {why}" if why else str(exc)) from None
