"""Cohort tables: labels and patient metadata, kept outside the feature bank and joined by bag id.

A cohort table is a CSV (or Parquet, with ``pyarrow`` installed) with one row per bag: a bag-id
column (``bag_id`` or ``patient_id``), the task's label column, and optional metadata such as
``age``, ``sex``, ``site``, ``date`` and a ``patient`` column that groups several smears of one patient.
Relabelling a cohort never rewrites features.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feature_cache.errors import UserError

log = logging.getLogger(__name__)

BAG_ID_COLUMNS = ("bag_id", "patient_id", "slide_id", "case_id")


@dataclass(frozen=True)
class CohortTable:
    """Bags with integer labels and their metadata columns, in table order.

    Attributes:
        path: where the table was read from.
        label_column: the task's label column.
        classes: class names; ``labels`` index into it.
        bag_ids: (B,) bag ids.
        labels: (B,) int64 labels.
        columns: every other column as an array of strings, by name.
        groups: (B,) patient grouping (the ``patient`` column, else the bag id).
    """

    path: Path
    label_column: str
    classes: tuple[str, ...]
    bag_ids: np.ndarray
    labels: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.bag_ids)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def subset(self, ids: Sequence[str]) -> CohortTable:
        """The rows of ``ids`` (in that order)."""
        pos = {b: i for i, b in enumerate(self.bag_ids)}
        idx = np.asarray([pos[b] for b in ids], dtype=np.int64)
        return CohortTable(
            path=self.path,
            label_column=self.label_column,
            classes=self.classes,
            bag_ids=self.bag_ids[idx],
            labels=self.labels[idx],
            columns={k: v[idx] for k, v in self.columns.items()},
            groups=None if self.groups is None else self.groups[idx],
        )

    def class_counts(self) -> dict[str, int]:
        """Bags per class."""
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.exists():
        raise UserError(f"{path}: cohort table not found")
    if path.suffix.lower() in {".parquet", ".pq"}:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise UserError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or give a CSV") from exc
        table = pq.read_table(path)
        header = list(table.column_names)
        data = table.to_pydict()
        rows = [{k: "" if data[k][i] is None else str(data[k][i]) for k in header} for i in range(table.num_rows)]
        return header, rows
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            sample = f.read(4096)
            f.seek(0)
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t") if sample else csv.excel
            reader = csv.DictReader(f, dialect=dialect)
            header = list(reader.fieldnames or [])
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable CSV table ({exc})") from exc
    return header, rows


def read_cohort(
    path: str | Path,
    label_column: str,
    *,
    classes: Sequence[str] | None = None,
    bag_column: str | None = None,
    group_column: str | None = "patient",
) -> CohortTable:
    """Read a cohort table for one task.

    Args:
        path: CSV (``,``, ``;`` or tab separated) or Parquet file.
        label_column: the task's label column (e.g. ``aml``).
        classes: the allowed classes in order; by default the sorted labels found, with a class
            named ``control`` (if any) first. Labels outside ``classes`` are an error.
        bag_column: the bag-id column; by default the first of ``bag_id``, ``patient_id``, ...
        group_column: column grouping several bags of one patient (used if present).

    Returns:
        The table. Rows with an empty label are dropped with a warning.

    Raises:
        UserError: missing file or column, duplicate bag ids, unknown classes, no labelled rows.
    """
    path = Path(path)
    header, rows = _read_rows(path)
    if bag_column is None:
        bag_column = next((c for c in BAG_ID_COLUMNS if c in header), None)
        if bag_column is None:
            raise UserError(f"{path}: no bag-id column (expected one of {', '.join(BAG_ID_COLUMNS)})")
    elif bag_column not in header:
        raise UserError(f"{path}: no column {bag_column!r} (columns: {', '.join(header)})")
    if label_column not in header:
        raise UserError(f"{path}: no label column {label_column!r} (columns: {', '.join(header)})")
    unlabelled = [r[bag_column] for r in rows if not r.get(label_column)]
    if unlabelled:
        log.warning("%s: %d rows without a %r label are ignored (e.g. %s)", path, len(unlabelled), label_column,
                    ", ".join(unlabelled[:3]))  # fmt: skip
    rows = [r for r in rows if r.get(label_column)]
    if not rows:
        raise UserError(f"{path}: no labelled rows in column {label_column!r}")
    ids = [r[bag_column] for r in rows]
    seen: set[str] = set()
    dupes = sorted({b for b in ids if b in seen or seen.add(b)})  # type: ignore[func-returns-value]
    if dupes:
        raise UserError(f"{path}: duplicate bag ids in {bag_column!r}: {', '.join(dupes[:5])}")
    found = sorted({r[label_column] for r in rows})
    if classes is None:
        classes = (["control"] if "control" in found else []) + [c for c in found if c != "control"]
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{path}: labels {', '.join(unknown)} in {label_column!r} are not among the classes "
                        f"{', '.join(classes)}")  # fmt: skip
    index = {c: i for i, c in enumerate(classes)}
    columns = {c: np.asarray([r.get(c, "") for r in rows], dtype=object) for c in header
               if c not in (bag_column, label_column)}  # fmt: skip
    groups = columns.get(group_column) if group_column else None
    return CohortTable(
        path=path,
        label_column=label_column,
        classes=tuple(classes),
        bag_ids=np.asarray(ids, dtype=object),
        labels=np.asarray([index[r[label_column]] for r in rows], dtype=np.int64),
        columns=columns,
        groups=groups if groups is not None else np.asarray(ids, dtype=object),
    )


@dataclass(frozen=True)
class JoinReport:
    """How a cohort table and a bank matched.

    Attributes:
        matched: bag ids in both, in cohort order.
        only_in_cohort: labelled bags the bank lacks.
        only_in_bank: bank bags without a label.
    """

    matched: list[str]
    only_in_cohort: list[str]
    only_in_bank: list[str]

    def summary(self) -> str:
        """One line for the log."""
        return (f"{len(self.matched)} bags matched; {len(self.only_in_cohort)} in the cohort but not the bank; "
                f"{len(self.only_in_bank)} in the bank but not the cohort")  # fmt: skip


def join_bank(cohort: CohortTable, bank_ids: Sequence[str], *, strict: bool = False) -> tuple[CohortTable, JoinReport]:
    """Keep the cohort's bags that the bank holds, reporting both mismatches with counts.

    Args:
        cohort: the labelled table.
        bank_ids: bag ids stored in the bank.
        strict: raise instead of warning when cohort bags are missing from the bank.

    Raises:
        UserError: no bag in common, or (``strict``) labelled bags missing from the bank.
    """
    in_bank = set(bank_ids)
    matched = [b for b in cohort.bag_ids if b in in_bank]
    labelled = set(cohort.bag_ids)
    report = JoinReport(matched, [b for b in cohort.bag_ids if b not in in_bank],
                        [b for b in bank_ids if b not in labelled])  # fmt: skip
    if not matched:
        raise UserError(f"{cohort.path}: no bag id in common with the bank (e.g. cohort {cohort.bag_ids[0]!r}, "
                        f"bank {bank_ids[0] if len(bank_ids) else 'empty'!r})")  # fmt: skip
    if report.only_in_cohort:
        message = (f"{cohort.path}: {len(report.only_in_cohort)} labelled bags are not in the bank "
                   f"(e.g. {', '.join(report.only_in_cohort[:3])})")  # fmt: skip
        if strict:
            raise UserError(message)
        log.warning(message)
    if report.only_in_bank:
        log.info("%d bank bags have no %r label and are not used", len(report.only_in_bank), cohort.label_column)
    return cohort.subset(matched), report
