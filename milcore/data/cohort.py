"""Cohort tables: labels and patient metadata, kept outside the feature bank and joined by bag id.

A cohort table is a CSV (or Parquet, with ``pyarrow`` installed) with one row per bag: a bag-id
column (``bag_id`` or ``patient_id``), the task's label column, and optional metadata such as
``age``, ``sex``, ``site``, ``date`` and a ``patient`` column that groups several smears of one patient.
Relabelling a cohort never rewrites features.

Missing values: a cell whose stripped, lower-cased text is one of :data:`MISSING_VALUES` (the empty
cell, ``NA``, ``N/A``, ``n.a.``, ``#N/A``, ``#NA``, ``<NA>``, ``NaN``, ``-NaN``, ``null``, ``-``, ``--``,
``?``, ``.``) is missing, in every column except the bag id. A row whose label is missing is left out
of the task (counted per spelling in the log); a missing metadata value reads as ``""``. Words such
as ``none``, ``unknown`` or ``other`` are *not* missing: they may be real categories ("mutation:
none", "no anemia"), and reading a real class as missing would silently drop its patients.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feature_cache.errors import UserError

log = logging.getLogger(__name__)

BAG_ID_COLUMNS = ("bag_id", "patient_id", "slide_id", "case_id")

#: Spellings of a missing value (compared after stripping whitespace and lower-casing). Chosen from
#: what spreadsheets, R, pandas, SQL exports and hand-typed tables write for "no value"; the pandas
#: default list minus its numeric artefacts (``-1.#IND``, ``1.#QNAN``) and minus ``None`` (a real class
#: in many diagnosis tables: "mutation: none"), plus ``-``, ``--``, ``?``, ``.``.
MISSING_VALUES: frozenset[str] = frozenset(
    {"", "-", "--", "?", ".", "na", "n/a", "n.a.", "#n/a", "#na", "<na>", "nan", "-nan", "null"}
)

#: Separators a CSV cohort table may use; the header line decides which (the one splitting it into
#: the most fields; ties go to the earlier one).
SEPARATORS = (",", ";", "\t")


def is_missing(value: object) -> bool:
    """Whether a cell's text is one of the :data:`MISSING_VALUES` spellings (``None`` is missing too)."""
    return value is None or str(value).strip().lower() in MISSING_VALUES


def missing_to_empty(value: object) -> str:
    """The stripped text of a cell, or ``""`` when it is a missing-value spelling."""
    return "" if is_missing(value) else str(value).strip()


@dataclass(frozen=True)
class Cohort:
    """Bags with integer labels and their metadata columns, in table order.

    Attributes:
        path: where the table was read from.
        label_column: the task's label column.
        classes: class names; ``labels`` index into it.
        bag_ids: (B,) bag ids.
        labels: (B,) int64 labels.
        columns: every other column as an array of strings, by name (missing values as ``""``).
        groups: (B,) patient grouping (the ``patient`` column, else the bag id).
        missing_labels: rows left out because their label was missing, by spelling as written.
        group_column: the column ``groups`` was read from (as asked; ``groups`` falls back to the bag ids
            where the table lacks it).
    """

    path: Path
    label_column: str
    classes: tuple[str, ...]
    bag_ids: np.ndarray
    labels: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    groups: np.ndarray | None = None
    missing_labels: dict[str, int] = field(default_factory=dict)
    group_column: str | None = None

    def __len__(self) -> int:
        return len(self.bag_ids)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def subset(self, ids: Sequence[str]) -> Cohort:
        """The rows of ``ids`` (in that order)."""
        pos = {b: i for i, b in enumerate(self.bag_ids)}
        idx = np.asarray([pos[b] for b in ids], dtype=np.int64)
        return Cohort(
            path=self.path,
            label_column=self.label_column,
            classes=self.classes,
            bag_ids=self.bag_ids[idx],
            labels=self.labels[idx],
            columns={k: v[idx] for k, v in self.columns.items()},
            groups=None if self.groups is None else self.groups[idx],
            missing_labels=dict(self.missing_labels),
            group_column=self.group_column,
        )

    def class_counts(self) -> dict[str, int]:
        """Bags per class."""
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}


@dataclass(frozen=True)
class RawTable:
    """A cohort file's cells as text, before any column is interpreted.

    Attributes:
        path: the file.
        header: column names (stripped; unnamed columns, such as a pandas index, are dropped).
        rows: one mapping per non-blank row, values stripped (absent trailing cells as ``""``).
        where: per row, its place in the file for messages (``line 7``, or ``row 6`` in Parquet).
    """

    path: Path
    header: list[str]
    rows: list[dict[str, str]]
    where: list[str]


def _decode(path: Path, data: bytes) -> str:
    """The file's text: UTF-16 with a BOM, else UTF-8 (BOM or not), else Windows-1252, else Latin-1."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not a readable text table (bad UTF-16: {exc.reason})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    for encoding in ("cp1252", "latin-1"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        log.info("%s: not UTF-8; read as %s", path, "Windows-1252" if encoding == "cp1252" else "Latin-1")
        return text
    raise UserError(f"{path}: not a readable text table")  # unreachable: Latin-1 decodes any bytes


def _separator(header_line: str) -> str:
    best, best_n = ",", 0
    for sep in SEPARATORS:
        try:
            n = len(next(csv.reader([header_line], delimiter=sep), []))
        except csv.Error:
            continue
        if n > best_n:
            best, best_n = sep, n
    return best


def _clean_header(path: Path, names: list[str]) -> tuple[list[str], list[int]]:
    """Stripped names and the positions kept (unnamed columns dropped); duplicates are an error."""
    stripped = [n.strip() for n in names]
    keep = [i for i, n in enumerate(stripped) if n]
    counts = Counter(stripped[i] for i in keep)
    dupes = sorted(n for n, c in counts.items() if c > 1)
    if dupes:
        raise UserError(f"{path}: column name(s) {', '.join(repr(d) for d in dupes)} appear more than once in "
                        "the header")  # fmt: skip
    return [stripped[i] for i in keep], keep


def _read_csv(path: Path) -> RawTable:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a cohort table") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    text = _decode(path, data)
    if "\x00" in text:
        raise UserError(f"{path}: a binary file, not a CSV table")
    first = next((ln for ln in re.split(r"\r\n|\r|\n", text) if ln.strip()), None)
    if first is None:
        raise UserError(f"{path}: empty file (no header line)")
    sep = _separator(first)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    header: list[str] | None = None
    keep: list[int] = []
    rows: list[dict[str, str]] = []
    where: list[str] = []
    try:
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue  # a blank line, or one of only separators
            if header is None:
                header, keep = _clean_header(path, fields)
                width = len(fields)
                continue
            if len(fields) > width and any(f.strip() for f in fields[width:]):
                raise UserError(f"{path}: line {reader.line_num} has {len(fields)} fields but the header has "
                                f"{width} (separator {sep!r}; a value holding the separator must be quoted)")
            fields = fields + [""] * (width - len(fields))
            rows.append({header[j]: fields[i].strip() for j, i in enumerate(keep)})
            where.append(f"line {reader.line_num}")
    except csv.Error as exc:
        raise UserError(f"{path}: not a readable CSV table (line {reader.line_num}: {exc})") from None
    if header is None:  # e.g. a lone quote character
        raise UserError(f"{path}: empty file (no header line)")
    return RawTable(path, header, rows, where)


def _read_parquet(path: Path) -> RawTable:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UserError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or give a CSV") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError) for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    header, keep = _clean_header(path, list(table.column_names))
    data = table.to_pydict()
    names = list(table.column_names)
    rows = [{header[j]: "" if data[names[i]][r] is None else str(data[names[i]][r]).strip()
             for j, i in enumerate(keep)} for r in range(table.num_rows)]  # fmt: skip
    return RawTable(path, header, rows, [f"row {r + 1}" for r in range(table.num_rows)])


def read_table(path: str | Path) -> RawTable:
    """Read a cohort file (CSV or Parquet) as text cells, without interpreting any column.

    CSV files may be UTF-8 (with or without BOM), UTF-16 with a BOM, or Windows-1252/Latin-1; the
    separator is ``,``, ``;`` or tab, decided by the header line. Blank lines are skipped, cells are
    stripped, every value stays a string (``007`` stays ``007``).

    Raises:
        UserError: a missing, empty, binary or malformed file (a row with more fields than the header,
            a repeated column name), naming the file and the line.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: cohort table not found")
    if path.suffix.lower() in {".parquet", ".pq"}:
        return _read_parquet(path)
    return _read_csv(path)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """``(header, rows)`` of :func:`read_table` (cells as written, missing values not mapped)."""
    table = read_table(path)
    return table.header, table.rows


def _spellings(counts: Counter[str]) -> str:
    return ", ".join(f"{(repr(k) if k else 'empty')} x{n}" for k, n in counts.most_common())


def read_cohort(
    path: str | Path,
    label_column: str,
    *,
    classes: Sequence[str] | None = None,
    bag_column: str | None = None,
    group_column: str | None = "patient",
) -> Cohort:
    """Read a cohort table for one task.

    Args:
        path: CSV (``,``, ``;`` or tab separated; UTF-8, UTF-16 with BOM, Windows-1252 or Latin-1)
            or Parquet file.
        label_column: the task's label column (e.g. ``aml``).
        classes: the allowed classes in order; by default the sorted labels found, with a class
            named ``control`` (if any) first. Labels outside ``classes`` are an error.
        bag_column: the bag-id column; by default the first of ``bag_id``, ``patient_id``, ...
        group_column: column grouping several bags of one patient (used if present; a bag whose
            group is missing is its own patient).

    Returns:
        The table. Rows whose label is missing are left out with a warning that counts them by
        spelling. Missing values are the empty cell and, case-insensitively, ``NA``, ``N/A``,
        ``n.a.``, ``#N/A``, ``#NA``, ``<NA>``, ``NaN``, ``-NaN``, ``null``, ``-``, ``--``,
        ``?`` and ``.`` (:data:`MISSING_VALUES`); they apply to every column except the bag id,
        which is kept exactly as written (stripped).

    Raises:
        UserError: missing file or column, a labelled row without a bag id, duplicate bag ids (with
            their lines), labels that differ only in case, unknown classes, no labelled rows.
    """
    raw = read_table(path)
    path, header, rows = raw.path, raw.header, raw.rows
    if bag_column is None:
        bag_column = next((c for c in BAG_ID_COLUMNS if c in header), None)
        if bag_column is None:
            raise UserError(f"{path}: no bag-id column (expected one of {', '.join(BAG_ID_COLUMNS)}; "
                            f"columns: {', '.join(header)})")  # fmt: skip
    elif bag_column not in header:
        raise UserError(f"{path}: no column {bag_column!r} (columns: {', '.join(header)})")
    if label_column not in header:
        raise UserError(f"{path}: no label column {label_column!r} (columns: {', '.join(header)})")
    no_id = [w for r, w in zip(rows, raw.where, strict=True) if not r[bag_column] and not is_missing(r[label_column])]
    if no_id:
        raise UserError(f"{path}: labelled rows without a bag id in {bag_column!r} ({', '.join(no_id[:5])})")
    lines: dict[str, list[str]] = {}
    for r, w in zip(rows, raw.where, strict=True):
        if r[bag_column]:
            lines.setdefault(r[bag_column], []).append(w)
    dupes = [(b, w) for b, w in lines.items() if len(w) > 1]
    if dupes:
        listed = "; ".join(f"{b!r} ({', '.join(w)})" for b, w in dupes[:5])
        more = f" and {len(dupes) - 5} more" if len(dupes) > 5 else ""
        raise UserError(f"{path}: duplicate bag ids in {bag_column!r}: {listed}{more}")
    missing = Counter(r[label_column] for r in rows if r[bag_column] and is_missing(r[label_column]))
    if missing:
        examples = [r[bag_column] for r in rows if r[bag_column] and is_missing(r[label_column])][:3]
        log.warning("%s: %d rows have no %r label and are left out as missing (%s; e.g. %s)", path,
                    sum(missing.values()), label_column, _spellings(missing), ", ".join(examples))  # fmt: skip
    rows = [r for r in rows if r[bag_column] and not is_missing(r[label_column])]
    if not rows:
        raise UserError(f"{path}: no labelled rows in column {label_column!r}"
                        + (f" (missing: {_spellings(missing)})" if missing else ""))  # fmt: skip
    ids = [r[bag_column] for r in rows]
    found = sorted({r[label_column] for r in rows})
    by_case: dict[str, list[str]] = {}
    for c in found:
        by_case.setdefault(c.casefold(), []).append(c)
    clash = [v for v in by_case.values() if len(v) > 1]
    if clash:
        raise UserError(f"{path}: labels in {label_column!r} that differ only in case: "
                        f"{'; '.join(' / '.join(repr(c) for c in v) for v in clash)} (one class or two? fix the "
                        "table)")  # fmt: skip
    if classes is None:
        classes = (["control"] if "control" in found else []) + [c for c in found if c != "control"]
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{path}: labels {', '.join(unknown)} in {label_column!r} are not among the classes "
                        f"{', '.join(classes)}")  # fmt: skip
    index = {c: i for i, c in enumerate(classes)}
    columns = {c: np.asarray([missing_to_empty(r[c]) for r in rows], dtype=object) for c in header
               if c not in (bag_column, label_column)}  # fmt: skip
    groups = None
    if group_column and group_column in columns:
        groups = np.asarray([g or b for g, b in zip(columns[group_column], ids, strict=True)], dtype=object)
    return Cohort(
        path=path,
        label_column=label_column,
        classes=tuple(classes),
        bag_ids=np.asarray(ids, dtype=object),
        labels=np.asarray([index[r[label_column]] for r in rows], dtype=np.int64),
        columns=columns,
        groups=groups if groups is not None else np.asarray(ids, dtype=object),
        missing_labels=dict(missing),
        group_column=group_column,
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
    empty: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        empty = f"; {len(self.empty)} labelled bags left out: no cell in the bank" if self.empty else ""
        return (f"{len(self.matched)} bags matched; {len(self.only_in_cohort)} in the cohort but not the bank; "
                f"{len(self.only_in_bank)} in the bank but not the cohort{empty}")  # fmt: skip


def join_bank(cohort: Cohort, bank_ids: Sequence[str], *, strict: bool = False,
              sizes: Sequence[int] | None = None) -> tuple[Cohort, JoinReport]:  # fmt: skip
    """Keep the cohort's bags that the bank holds, reporting both mismatches with counts.

    A bag stored with no cell (a field where nothing was detected, a patient whose images were all
    unreadable) carries no evidence: it is left out with a warning rather than given a prediction
    from the model's bias alone.

    Args:
        cohort: the labelled table.
        bank_ids: bag ids stored in the bank.
        strict: raise instead of warning when cohort bags are missing from the bank.
        sizes: cells per bank bag, aligned with ``bank_ids`` (``bank.bag_sizes()``); bags with none are
            left out and listed in :attr:`JoinReport.empty`.

    Raises:
        UserError: no bag in common, or (``strict``) labelled bags missing from the bank.
    """
    in_bank = set(bank_ids)
    empty_in_bank = set() if sizes is None else {b for b, n in zip(bank_ids, sizes, strict=True) if int(n) == 0}
    empty = [b for b in cohort.bag_ids if b in empty_in_bank]
    matched = [b for b in cohort.bag_ids if b in in_bank and b not in empty_in_bank]
    labelled = set(cohort.bag_ids)
    report = JoinReport(matched, [b for b in cohort.bag_ids if b not in in_bank],
                        [b for b in bank_ids if b not in labelled], empty)  # fmt: skip
    if empty:
        log.warning("%s: %d labelled bags have no cell in the bank and are left out (e.g. %s)", cohort.path,
                    len(empty), ", ".join(empty[:5]))  # fmt: skip
    if not matched:
        if empty:
            raise UserError(f"{cohort.path}: every labelled bag in the bank has no cell (e.g. {empty[0]!r})")
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
